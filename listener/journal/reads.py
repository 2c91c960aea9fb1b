"""
The journal's reads on its two reader threads: the publisher's and the sources' (pending
rows, due retries, cursors, poll state) on one, the admin API's and replays' on the
other, so a long admin query never holds up publishing. A mixin of
:class:`listener.journal.store.Journal`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from listener.exceptions import JournalCorrupt, JournalError
from listener.journal.connections import Connections
from listener.journal.schema import COLUMNS, Status, StoredEntry, is_corrupt, row_to_entry

__all__ = ["Reads"]

_T = TypeVar("_T")


class Reads(Connections):
    """Read access to the journal file."""

    async def _on(self, thread: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        """
        Run ``fn(*args)`` on ``thread``.

        Raises:
            JournalError: SQLite failed (an I/O error, a lock held past the busy timeout):
                the callers (the publisher, the sources, the admin API) handle the
                journal's errors, and a bare ``sqlite3.Error`` would end the service.
                ``JournalCorrupt`` when the file is damaged (at start: exit 2, one line).
        """
        try:
            return await asyncio.get_running_loop().run_in_executor(thread, fn, *args)
        except sqlite3.Error as exc:
            if is_corrupt(exc):
                raise JournalCorrupt(self._path, str(exc)) from exc
            raise JournalError(f"journal access failed: {exc}") from exc

    async def pending(self, *, after_seq: int, limit: int) -> list[StoredEntry]:
        """Entries not yet published, oldest first, with ``seq > after_seq``."""
        rows = await self._on(
            self._read_thread,
            self._read,
            f"SELECT {COLUMNS} FROM events WHERE status = 0 AND seq > ? ORDER BY seq LIMIT ?",  # noqa: S608 - constant column list
            (after_seq, limit),
        )
        return [row_to_entry(r) for r in rows]

    async def due_deferred(self, *, now: float, limit: int, longest: float) -> list[StoredEntry]:
        """
        Deferred entries whose retry time has come, oldest retry first; and those due
        more than ``longest`` (the longest backoff) from ``now``, which no backoff set:
        the wall clock stepped back since (an NTP step, a VM resumed), and they would
        have waited the size of the step.
        """
        rows = await self._on(
            self._read_thread,
            self._read,
            f"SELECT {COLUMNS} FROM events WHERE status = 3"  # noqa: S608 - constant column list
            " AND (retry_at <= ? OR retry_at > ?) ORDER BY retry_at LIMIT ?",
            (now, now + longest, limit),
        )
        return [row_to_entry(r, Status.DEFERRED) for r in rows]

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._reader
        assert conn is not None  # opened first
        return conn.execute(sql, args).fetchall()

    async def cursors(self, source: str) -> dict[str, int]:
        """The stored stream positions of ``source``: subscription key → last seq."""
        rows = await self._on(
            self._read_thread,
            self._read,
            "SELECT key, seq FROM cursors WHERE source = ?",
            (source,),
        )
        return {str(key): int(seq) for key, seq in rows}

    # -- reads: the admin API and replays, on their own thread -----------------------------

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on the admin connection (never the publisher's)."""
        return await self._on(self._query_thread, self._query, sql, args)

    def _query(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = self._querier
        assert conn is not None  # opened first
        return conn.execute(sql, args).fetchall()

    async def poll_states(
        self, source: str, keys: Sequence[str]
    ) -> dict[str, tuple[str, bytes, int]]:
        """
        The last content seen per key of a poll source: key → (hash, content JSON, the
        changes seen since its first sight).
        """
        found: dict[str, tuple[str, bytes, int]] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._on(
                self._read_thread,
                self._read,
                f"SELECT key, hash, content, changes FROM poll_state"  # noqa: S608 - placeholders only
                f" WHERE source = ? AND key IN ({marks})",
                (source, *chunk),
            )
            found.update({str(k): (str(h), bytes(c), int(n)) for k, h, c, n in rows})
        return found

    async def poll_aliases(self, source: str) -> dict[str, str]:
        """Renamed items of a poll source: configured item → the id polled now."""
        rows = await self._on(
            self._read_thread,
            self._read,
            "SELECT item, current FROM poll_aliases WHERE source = ?",
            (source,),
        )
        return {str(item): str(current) for item, current in rows}

    async def poll_primed(self, source: str) -> dict[str, float | None]:
        """
        The resources of a poll source polled successfully at least once, each with the
        start of its last such poll (``None``: written before that was kept).
        """
        rows = await self._on(
            self._read_thread,
            self._read,
            "SELECT resource, polled_at FROM poll_resources WHERE source = ?",
            (source,),
        )
        return {str(r): (None if at is None else float(at)) for r, at in rows}
