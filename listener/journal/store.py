"""
The journal: SQLite in WAL mode as store-and-forward (CONTRACT §8).

Data flows one way: intake → :meth:`Journal.append` (durable) → the publisher takes
the committed rows from :attr:`Journal.fresh` in memory (or reads
:meth:`Journal.pending` where one is missing), in ``seq`` order →
:meth:`Journal.mark_published`.

Writes go through one writer task that takes every operation queued while the
previous transaction was committing or in the next few turns of the event loop, and
commits them together (group commit): under concurrency many webhooks share one fsync,
and nobody hears "accepted" before the transaction holding their event is committed.
An operation that fails (a value SQLite cannot store, a constraint) is rolled back
alone (a ``SAVEPOINT`` each, taken only once one failed) and fails only its own waiter;
its neighbours commit (STYLE: "advance only from durable outcomes").

Threads: one writer connection, whose commits run on the event loop's thread while they
are quick and on the writer thread otherwise (:meth:`Journal._commit` says why), and
whose upkeep (retention, counts) always runs on the writer thread, never beside a
commit; one reader for the publisher and the sources (rows missing from the handoff,
cursors); one more for the admin API and replays, so a long admin query never holds up
publishing (WAL lets all three proceed beside a commit).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from listener.config import JournalConfig
from listener.envelope import Entry
from listener.exceptions import JournalError, JournalFull
from listener.journal.identity import FileIdentity
from listener.journal.inline import InlineCommits
from listener.journal.lock import JournalLock, writable
from listener.journal.schema import BUSY_TIMEOUT_MS, Cursor, StoredEntry, error_code
from listener.journal.upkeep import Stats, Upkeep
from listener.journal.writes import (
    Append,
    Defer,
    Mark,
    Op,
    PollWrite,
    body_bytes,
    commit,
    count_open,
)

__all__ = ["Journal"]

_T = TypeVar("_T")


# How many appended rows wait in memory for the publisher (:attr:`Journal.fresh`).
FRESH_MAX = 2048
FRESH_BODY = 16 * 1024  # bytes: at most 32 MiB in the handoff
# On the loop's thread, another process's write lock is waited for this long at most.
INLINE_BUSY_MS = 5
# Turns of the event loop the writer lets pass after the first queued operation: the
# appends of requests already read off their sockets join this commit (one fsync for
# more events; measured: -15% CPU per webhook, and a lower accept latency at half load).
COALESCE_TURNS = 2


class Journal(Upkeep):
    """
    The durable local store of every accepted event.

    Use as an async context manager; the writer task runs inside it. ``lock=True`` (the
    daemon) takes the file's lock first: a second daemon gets :class:`JournalLocked`.
    """

    def __init__(self, *, config: JournalConfig, retry_after: int = 5, lock: bool = False) -> None:
        self._config = config
        self._retry_after = retry_after
        self._path = Path(config.path)
        self._lock = JournalLock(self._path) if lock else None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._querier: sqlite3.Connection | None = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-write")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-read")
        self._query_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-query")
        self._queue: asyncio.Queue[Op] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._inline = InlineCommits()
        self._identity = FileIdentity(self._path)
        self._busy_ms = BUSY_TIMEOUT_MS  # the writer connection's busy_timeout
        self._writing = asyncio.Lock()
        self._stats = Stats()
        self._appending = 0  # appends queued or committing (Journal.appending)
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._listeners: list[Callable[[], None]] = []
        self._failed: BaseException | None = None
        self._failed_until = 0.0
        #: The rows this process appended, as they commit, oldest first: the publisher
        #: takes them from here instead of reading them back (it reads the file when a
        #: seq is missing: the first rows after a start, rows appended while no publish
        #: session took them (:meth:`hand_off`), rows another process added, rows with
        #: a large body, rows that fell off this bounded deque, and the seqs a
        #: duplicate used up: SQLite's AUTOINCREMENT spends one on a conflicting insert).
        self.fresh: collections.deque[StoredEntry] = collections.deque(maxlen=FRESH_MAX)
        self._handoff = False  # whether a publish session takes from fresh (hand_off)
        #: After each commit: its own seconds, and each append's from queued to durable
        #: (the service observes them; the journal knows no metrics).
        self.timed: Callable[[float, list[float]], None] | None = None

    def hand_off(self, on: bool) -> None:
        """
        Keep the rows appended from now on in :attr:`fresh` (``on``: a publish session
        takes them), or let go of those held: with nobody taking them (the broker away,
        blocked, or none yet) they would fill the deque, their memory kept after the outage.
        """
        self._handoff = on
        if not on:
            self.fresh.clear()

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        if self._task is None:  # (not opened before)
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """
        Create or open the journal file and start the writer.

        Raises:
            JournalLocked: another daemon holds this journal.
            JournalCorrupt: the file is not a readable database.
        """
        try:
            if self._lock is not None:
                self._lock.acquire()
            # (each kept by its thread as it opens: _connect, _close_connections)
            await writable(
                self._path, lambda ms: self._on(self._write_thread, self._connect, "_writer", ms)
            )
            await self._on(self._read_thread, self._connect, "_reader")
            await self._on(self._query_thread, self._connect, "_querier")
            assert self._reader is not None  # connected just above
            self._stats.pending, self._stats.deferred = await self._on(
                self._read_thread, count_open, self._reader
            )
            await self._on(self._write_thread, self._measure_size)
            self._identity.lost()  # (the files opened, as they are now)
        except BaseException:
            await self._close_connections()
            raise
        self._update_capacity()
        self._task = asyncio.create_task(self._write_loop(), name="journal-writer")

    async def close(self) -> None:
        """Commit what is queued, then close the connections and the lock."""
        if self._task is not None:
            await self.settled()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_connections()

    # -- capacity ---------------------------------------------------------------

    def over_limit(self) -> str | None:
        """Why the journal takes no more right now, or ``None`` while it has room."""
        if self._failed is not None and time.monotonic() < self._failed_until:
            # Shed load briefly after a failed commit (disk full, I/O error), then try again.
            return "journal_error"
        if self._stats.pending + self._stats.deferred >= self._config.max_pending:
            return "max_pending"
        if self._stats.size >= self._config.max_size:
            return "max_size"
        return None

    async def wait_for_capacity(self) -> None:
        """Return once the journal is under its limits (streams pause here)."""
        while self.over_limit() is not None:
            self._update_capacity()
            # Only a commit sets the event, but the shedding after a failed commit ends
            # with time alone, and a paused stream may be the only writer (the broker
            # down: nothing to mark published): look again at least once a second.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._capacity.wait()

    def _update_capacity(self) -> None:
        if self.over_limit() is None:
            self._capacity.set()
        else:
            self._capacity.clear()

    # -- writes -----------------------------------------------------------------

    async def append(
        self,
        entries: Sequence[Entry],
        *,
        cursors: Sequence[Cursor] = (),
        poll: PollWrite | None = None,
    ) -> list[bool]:
        """
        Store ``entries`` durably, with the stream ``cursors`` or the ``poll`` state they
        advance in the same transaction.

        Returns:
            One flag per entry: ``True`` if it was new, ``False`` if (source, event id)
            was already in the journal, or pruned within ``dedupe_window`` (a
            duplicate, not stored again).

        Raises:
            JournalFull: over the size or pending limit; nothing was stored.
            JournalError: the write failed; nothing was stored.
        """
        return await self.submit(entries, cursors=cursors, poll=poll)

    def submit(
        self,
        entries: Sequence[Entry],
        *,
        cursors: Sequence[Cursor] = (),
        poll: PollWrite | None = None,
    ) -> asyncio.Future[list[bool]]:
        """
        Queue an append without waiting: the future resolves as :meth:`append` returns.

        Streams keep several appends in flight so one fsync covers many frames.

        Raises:
            JournalFull: over the size or pending limit; nothing was queued.
        """
        if (reason := self.over_limit()) is not None:
            raise JournalFull(retry_after=self._retry_after, reason=reason)
        done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Append(entries, cursors, done, poll, time.monotonic()))
        self._appending += 1
        return done

    @property
    def appending(self) -> int:
        """Appends queued or committing: not yet in :attr:`pending_count`, nor failed."""
        return self._appending

    async def settled(self) -> None:
        """Return once every operation queued so far is committed (or has failed)."""
        await self._queue.join()

    async def mark_published(
        self, seqs: Sequence[int], *, wait: bool = False, deferred: bool = False
    ) -> None:
        """Record broker confirms (of pending rows, or of ``deferred`` ones); group-committed."""
        if not seqs:
            return
        done = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(Mark(seqs, time.time(), deferred, done))
        if done is not None:
            await done

    async def defer(
        self, seqs: Sequence[int], *, error: str, base: float = 1.0, cap: float = 300.0
    ) -> None:
        """
        Set rows aside as deferred (returned or nacked by the broker): each is due again
        after ``base * 2^attempts`` seconds, at most ``cap``; ``error`` says why.
        """
        if not seqs:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Defer(seqs, time.time(), base, cap, error[:500], done))
        await done

    async def _write_loop(self) -> None:
        limit = self._config.batch_max
        while True:
            ops: list[Op] = [await self._queue.get()]
            for _ in range(COALESCE_TURNS):
                await asyncio.sleep(0)
            count = len(ops[0].entries) if isinstance(ops[0], Append) else 0
            while count < limit and not self._queue.empty():
                op = self._queue.get_nowait()
                ops.append(op)
                if isinstance(op, Append):
                    count += len(op.entries)
            try:
                async with self._writing:
                    began = time.monotonic()
                    results, fresh = await self._commit(ops)
            except Exception as exc:  # the whole transaction rolled back: fail every waiter
                self._whole_failure(ops, exc)
                continue
            self._failed = None
            if self.timed is not None:
                end = time.monotonic()
                self.timed(end - began, [end - op.queued for op in ops if isinstance(op, Append)])
            if self._handoff:  # (large bodies are read back from the file instead)
                self.fresh.extend(
                    StoredEntry(seq, e) for seq, e in fresh if len(e.body) <= FRESH_BODY
                )
            retry: list[Mark] = []
            for op, result in zip(ops, results, strict=True):
                if isinstance(result, Exception):
                    error = JournalError(f"journal write failed: {result}")
                    if op.done is not None and not op.done.done():
                        op.done.set_exception(error)
                    elif isinstance(op, Mark):
                        retry.append(op)
                elif op.done is not None and not op.done.done():
                    op.done.set_result(result)
                self._appending -= isinstance(op, Append)
                self._queue.task_done()
            if retry:
                asyncio.get_running_loop().call_later(1.0, self._requeue, retry)
            self._update_capacity()
            for listener in self._listeners:
                listener()

    async def _commit(self, ops: list[Op]) -> tuple[list[Any], list[tuple[int, Entry]]]:
        """
        Commit ``ops`` on this thread while commits are quick, else on the writer thread.

        On the writer thread each SQLite call gives up Python's lock and must win it
        back from the busy event loop (up to ``sys.getswitchinterval()`` each time): a
        commit took several times its work. Here a commit of a few dozen events blocks
        the loop about a millisecond, fsync and now and then a WAL checkpoint included.
        A slow disk, a large batch or another process holding the write lock
        (``INLINE_BUSY_MS``) sends the commits to the thread for a while
        (:mod:`listener.journal.inline`).
        """
        now = time.monotonic()
        if self._inline.allowed(body_bytes(ops), now):
            try:
                self._busy_timeout(INLINE_BUSY_MS)
                return self._write(ops)
            except sqlite3.OperationalError as exc:
                if error_code(exc) != sqlite3.SQLITE_BUSY:
                    raise
                # Another process holds the write lock (a redrive): wait for it on the
                # writer thread, not here. BEGIN failed: nothing of ops was written.
                self._inline.pause(time.monotonic())
            finally:
                end = time.monotonic()
                self._inline.took(end - now, end)
        return await self._writer_job(self._write_waiting, ops)

    def _busy_timeout(self, ms: int) -> None:
        """How long the writer waits for another process's write lock (a PRAGMA, on change)."""
        if self._busy_ms != ms:
            assert self._writer is not None  # opened first
            self._writer.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms

    def _write_waiting(self, ops: list[Op]) -> tuple[list[Any], list[tuple[int, Entry]]]:
        self._busy_timeout(BUSY_TIMEOUT_MS)
        return self._write(ops)

    def _whole_failure(self, ops: list[Op], exc: Exception) -> None:
        self._failed = exc
        self._failed_until = time.monotonic() + self._retry_after
        error = JournalError(f"journal write failed: {exc}; check disk space and {self._path}")
        unwaited: list[Mark] = []
        for op in ops:
            if op.done is not None and not op.done.done():
                op.done.set_exception(error)
            elif isinstance(op, Mark) and op.done is None:
                # A broker confirm nobody waits for (mark_published(wait=False)): dropped,
                # its event would stay pending for good (pending never back to 0, the
                # shutdown drain waiting in vain, a duplicate after the next start).
                unwaited.append(op)
            self._appending -= isinstance(op, Append)
            self._queue.task_done()
        if unwaited:
            asyncio.get_running_loop().call_later(1.0, self._requeue, unwaited)
        self._update_capacity()

    def _requeue(self, ops: list[Mark]) -> None:
        if self._task is not None:  # not closed meanwhile
            for op in ops:
                self._queue.put_nowait(op)

    def _write(self, ops: list[Op]) -> tuple[list[Any], list[tuple[int, Entry]]]:
        conn = self._writer
        assert conn is not None  # opened before the writer task starts
        committed = commit(conn, ops)
        if (lost := self._identity.lost()) is not None:
            raise JournalError(lost)  # committed into a file no start will read
        self._stats.pending += committed.pending
        self._stats.deferred += committed.deferred
        self._stats.commits += 1
        if self._stats.pending < 0 or self._stats.deferred < 0:
            # Marked rows this daemon did not count (a redrive's, added by another
            # process since the last recount): count them all again, now.
            with contextlib.suppress(sqlite3.Error):
                self._stats.pending, self._stats.deferred = count_open(conn)
        now = time.monotonic()
        if now - self._stats.size_checked > 1.0:
            self._stats.size_checked = now
            # After the commit: an error here (SQLITE_BUSY) must not look like the
            # commit's own, which would write the operations again.
            with contextlib.suppress(sqlite3.Error):
                self._measure_size()
        return committed.results, committed.fresh

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every successful commit (the publisher's wake-up)."""
        self._listeners.append(listener)

    def state(self) -> dict[str, Any]:
        """Component status for ``/readyz``."""
        reason = self.over_limit()
        status: Literal["ok", "full", "error"] = (
            "ok" if reason is None else "error" if reason == "journal_error" else "full"
        )
        return {
            "status": status,
            "pending": self._stats.pending,
            "deferred": self._stats.deferred,
            "size_bytes": self._stats.size,
            **({"reason": reason} if reason else {}),
        }
