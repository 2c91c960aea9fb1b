"""
The journal's three SQLite connections (writer, reader, querier), each made, used and
closed on a thread of its own. A mixin of :class:`listener.journal.store.Journal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from listener.config import JournalConfig
from listener.exceptions import JournalError
from listener.journal.lock import JournalLock
from listener.journal.schema import BUSY_TIMEOUT_MS, connect

__all__ = ["Connections"]

Name = Literal["_writer", "_reader", "_querier"]
NAMES: tuple[Name, ...] = ("_writer", "_reader", "_querier")


class Connections:
    """Opening and closing the connections (the journal's lifecycle uses these)."""

    _config: JournalConfig
    _path: Path
    _lock: JournalLock | None
    _writer: sqlite3.Connection | None
    _reader: sqlite3.Connection | None
    _querier: sqlite3.Connection | None
    _write_thread: ThreadPoolExecutor
    _read_thread: ThreadPoolExecutor
    _query_thread: ThreadPoolExecutor

    def _connect(self, name: Name, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
        """Open the connection kept as ``self.<name>``; run on that connection's thread."""
        writer, synchronous = name == "_writer", self._config.synchronous
        conn = connect(self._path, synchronous=synchronous, writer=writer, busy_ms=busy_ms)
        setattr(self, name, conn)
        return conn

    def _disconnect(self, name: Name) -> None:
        if (conn := getattr(self, name)) is not None:
            setattr(self, name, None)
            conn.close()

    async def _close_connections(self) -> None:
        """
        Close each connection on its own thread, then the threads, then the lock.

        Each close runs after whatever was queued on its thread before, a connect
        included: an ``open()`` cancelled while one ran has that connection closed too
        (it was left for the garbage collector). All are queued at once and waited for
        through a cancellation (the threads' shutdown waits for them), so a second
        cancellation cannot leave one open or the lock held.

        Raises:
            JournalError: a close failed (the others still ran, the lock was released).
        """
        threads = (self._write_thread, self._read_thread, self._query_thread)
        closing: list[Future[None]] = []
        for name, thread in zip(NAMES, threads, strict=True):
            with contextlib.suppress(RuntimeError):  # (the thread shut down: closed before)
                closing.append(thread.submit(self._disconnect, name))
        try:
            for done in closing:
                await asyncio.shield(asyncio.wrap_future(done))
        except sqlite3.Error as exc:
            raise JournalError(f"closing the journal failed: {exc}") from exc
        finally:
            for thread in threads:
                thread.shutdown(wait=True)
            if self._lock is not None:
                self._lock.release()
