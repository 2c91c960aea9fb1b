"""
The journal file as the commands other than ``run`` see it (CONTRACT §2).

``listener replay`` and ``listener quarantine`` run while a daemon may be writing the
same SQLite file. WAL lets their reads proceed beside its writes
(https://sqlite.org/wal.html); ``busy_timeout`` makes their few writes wait for the
daemon's group commit instead of failing, and each write is one short transaction so
the daemon never waits long for them. Read-only use sets ``query_only``, so a bug
cannot write. The file is never created here: a missing journal is an error.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from listener.exceptions import JournalError
from listener.journal.schema import connect

__all__ = ["JournalFile"]

_T = TypeVar("_T")


class JournalFile:
    """
    One connection to an existing journal, used from an async command.

    All SQLite calls run on one dedicated thread (a connection belongs to its thread).
    Use as an async context manager.
    """

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        self.path = path
        self._writable = writable
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-file")
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> JournalFile:
        """
        Raises:
            JournalError: there is no journal at ``path``, or it cannot be opened.
        """
        if not self.path.is_file():
            self._thread.shutdown(wait=False)
            raise JournalError(
                f"no journal at {self.path} (journal.path); has the daemon run with this config?"
            )
        try:
            self._conn = await self._run(self._connect)
        except sqlite3.Error as exc:
            self._thread.shutdown(wait=False)
            raise JournalError(f"cannot open the journal at {self.path}: {exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        self._thread.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, create=False, read_only=not self._writable)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query."""

        def run() -> list[tuple[Any, ...]]:
            assert self._conn is not None  # opened by __aenter__
            return self._conn.execute(sql, args).fetchall()

        return await self._run(run)

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """
        Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction; keep it short.

        Raises:
            JournalError: the transaction failed and was rolled back.
        """
        if not self._writable:
            raise JournalError("this journal file was opened read-only")

        def run() -> _T:
            conn = self._conn
            assert conn is not None  # opened by __aenter__
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        try:
            return await self._run(run)
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}; nothing was changed") from exc
