"""
WAL checkpoints off the writer's path.

By default SQLite checkpoints the WAL inside the commit that takes it past 1,000 pages:
that commit copies those pages into the database file and fsyncs it before it returns.
On a journal of 1 GiB that was about half of a retention batch's time (500 rows: 33 ms
against 18 ms without) and the slow append commits that send commits to the writer
thread. Here a connection of its own, on a thread of its own, runs a ``PASSIVE``
checkpoint a short while after commits (it waits for neither the writer nor the readers,
and copies a page changed many times once). The writer keeps SQLite's automatic
checkpoint as a backstop at :data:`BACKSTOP_PAGES`: it copies what this one has not yet,
and lets the WAL start again from its beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

__all__ = ["BACKSTOP_PAGES", "CHECKPOINT_AFTER", "WalCheckpointer"]

log = structlog.get_logger("listener.journal")

CHECKPOINT_AFTER = 0.25  # seconds from a commit to the checkpoint that takes it in
BACKSTOP_PAGES = 20_000  # the writer's own wal_autocheckpoint (~80 MiB of WAL)


class WalCheckpointer:
    """Checkpoints the journal's WAL on its own connection and thread (see the module)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-checkpoint")
        self._conn: sqlite3.Connection | None = None
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: Checkpoints run, and how many frames the last one found in the WAL.
        self.checkpoints = 0
        self.wal_frames = 0

    async def start(self) -> None:
        """Open the connection and start checkpointing after commits (:meth:`poke`)."""
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._thread, self._connect)
        self._task = asyncio.create_task(self._run(), name="journal-checkpoint")

    def poke(self) -> None:
        """A commit happened: checkpoint within :data:`CHECKPOINT_AFTER`."""
        self._due.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._due.wait()
            await asyncio.sleep(CHECKPOINT_AFTER)
            self._due.clear()
            try:
                await loop.run_in_executor(self._thread, self._checkpoint)
            except sqlite3.Error as exc:  # the writer's backstop goes on meanwhile
                if not self._failing:
                    log.warning("journal_checkpoint_failed", error=str(exc))
                self._failing = True
            else:
                self._failing = False

    def _checkpoint(self) -> None:
        assert self._conn is not None  # opened in start()
        ((_, frames, _),) = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.checkpoints += 1
        self.wal_frames = max(int(frames), 0)

    async def stop(self) -> None:
        """Stop checkpointing; close the connection once a running checkpoint ends."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            # The thread runs one job at a time: this waits for a checkpoint under way.
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
        self._thread.shutdown(wait=True)
