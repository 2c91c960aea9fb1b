"""
The journal: SQLite in WAL mode as store-and-forward (CONTRACT §8).

Data flows one way: intake → :meth:`Journal.append` (durable) → the publisher reads
:meth:`Journal.pending` in ``seq`` order → :meth:`Journal.mark_published`.

Writes go through one writer task that takes every operation queued while the
previous transaction was committing and commits them together (group commit): under
concurrency many webhooks share one fsync, and nobody hears "accepted" before the
transaction holding their event is committed. All writes run on one dedicated
thread with one connection; reads use a second connection on another thread, which
WAL lets proceed while a write commits (https://sqlite.org/wal.html).

Other processes (``listener replay``, ``listener quarantine``) open the same file;
``busy_timeout`` makes them wait for the writer instead of failing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from listener.config import JournalConfig
from listener.envelope import Entry
from listener.exceptions import JournalError, JournalFull

__all__ = ["Cursor", "Journal", "StoredEntry"]

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,                     -- 'event' | 'quarantine'
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    time REAL NOT NULL,
    received_at REAL NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,      -- 0 pending, 1 published, 2 redriven
    published_at REAL,
    reason TEXT,
    detail TEXT,
    UNIQUE (source, event_id)
);
CREATE INDEX IF NOT EXISTS events_pending ON events (seq) WHERE status = 0;
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
"""

PENDING, PUBLISHED, REDRIVEN = 0, 1, 2

_INSERT = (
    "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at,"
    " reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (source, event_id) DO NOTHING"
)
_CURSOR = (
    "INSERT INTO cursors (source, key, seq, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (source, key) DO UPDATE SET seq = max(seq, excluded.seq),"
    " updated_at = excluded.updated_at"
)
_MARK = "UPDATE events SET status = 1, published_at = ? WHERE seq = ? AND status = 0"
_COLUMNS = "seq, source, event_id, kind, routing_key, body, time, received_at, reason, detail"


@dataclass(frozen=True, slots=True)
class Cursor:
    """A stream position to store in the same transaction as its event."""

    source: str
    key: str
    seq: int


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as read back from the journal, with its journal ``seq``."""

    seq: int
    entry: Entry


@dataclass(slots=True)
class _Append:
    entries: Sequence[Entry]
    cursors: Sequence[Cursor]
    done: asyncio.Future[list[bool]]


@dataclass(slots=True)
class _Mark:
    seqs: Sequence[int]
    at: float
    done: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Stats:
    pending: int = 0
    size: int = 0
    size_checked: float = 0.0
    commits: int = 0
    commit_seconds: list[float] = field(default_factory=list)


def row_to_entry(row: Sequence[Any]) -> StoredEntry:
    """A :class:`StoredEntry` from a row whose first ten columns are ``_COLUMNS``."""
    seq, source, event_id, kind, routing_key, body, moment, received_at, reason, detail = row[:10]
    return StoredEntry(
        seq=seq,
        entry=Entry(
            source=source,
            event_id=event_id,
            kind=kind,
            routing_key=routing_key,
            body=bytes(body),
            time=moment,
            received_at=received_at,
            reason=reason,
            detail=detail,
        ),
    )


class Journal:
    """
    The durable local store of every accepted event.

    Use as an async context manager; the writer task runs inside it.
    """

    def __init__(self, *, config: JournalConfig, retry_after: int = 5) -> None:
        self._config = config
        self._retry_after = retry_after
        self._path = Path(config.path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-write")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-read")
        self._queue: asyncio.Queue[_Append | _Mark] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stats = _Stats()
        self._appended = asyncio.Event()
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._listeners: list[Callable[[], None]] = []
        self._failed: BaseException | None = None
        self._failed_until = 0.0

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create or open the journal file and start the writer."""
        self._writer = await self._on_writer(self._connect)
        self._reader = await self._on_reader(self._connect)
        self._stats.pending = await self._on_reader(self._count_pending)
        await self._on_writer(self._measure_size)
        self._update_capacity()
        self._task = asyncio.create_task(self._write_loop(), name="journal-writer")

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await self._on_writer(writer.close)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await self._on_reader(reader.close)
        self._write_thread.shutdown(wait=True)
        self._read_thread.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._config.synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(SCHEMA)
        return conn

    async def _on_writer(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)

    async def _on_reader(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._read_thread, fn, *args)

    # -- capacity ---------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Entries not yet confirmed by the broker."""
        return self._stats.pending

    @property
    def size_bytes(self) -> int:
        """Bytes of the database in use (pages minus free pages), sampled."""
        return self._stats.size

    def over_limit(self) -> str | None:
        """Why the journal takes no more right now, or ``None`` while it has room."""
        if self._failed is not None and time.monotonic() < self._failed_until:
            # Shed load briefly after a failed commit (disk full, I/O error), then try again.
            return "journal_error"
        if self._stats.pending >= self._config.max_pending:
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
            try:
                async with asyncio.timeout(1.0):
                    await self._capacity.wait()
            except TimeoutError:
                pass

    def _update_capacity(self) -> None:
        if self.over_limit() is None:
            self._capacity.set()
        else:
            self._capacity.clear()

    # -- writes -----------------------------------------------------------------

    async def append(
        self, entries: Sequence[Entry], *, cursors: Sequence[Cursor] = ()
    ) -> list[bool]:
        """
        Store ``entries`` durably (and the stream ``cursors`` in the same transaction).

        Returns:
            One flag per entry: ``True`` if it was new, ``False`` if (source, event id)
            was already in the journal (a duplicate, not stored again).

        Raises:
            JournalFull: over the size or pending limit; nothing was stored.
            JournalError: the write failed; nothing was stored.
        """
        return await self.submit(entries, cursors=cursors)

    def submit(
        self, entries: Sequence[Entry], *, cursors: Sequence[Cursor] = ()
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
        self._queue.put_nowait(_Append(entries, cursors, done))
        return done

    async def mark_published(self, seqs: Sequence[int], *, wait: bool = False) -> None:
        """Record broker confirms; batched into the next group commit."""
        if not seqs:
            return
        done = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Mark(seqs, time.time(), done))
        if done is not None:
            await done

    async def _write_loop(self) -> None:
        limit = self._config.batch_max
        while True:
            ops = [await self._queue.get()]
            count = len(ops[0].entries) if isinstance(ops[0], _Append) else 0
            while count < limit and not self._queue.empty():
                op = self._queue.get_nowait()
                ops.append(op)
                if isinstance(op, _Append):
                    count += len(op.entries)
            try:
                results = await self._on_writer(self._write, ops)
            except Exception as exc:  # the whole transaction rolled back: fail every waiter
                self._failed = exc
                self._failed_until = time.monotonic() + self._retry_after
                error = JournalError(
                    f"journal write failed: {exc}; check disk space and {self._path}"
                )
                unwaited: list[_Mark] = []
                for op in ops:
                    if op.done is not None and not op.done.done():
                        op.done.set_exception(error)
                    elif isinstance(op, _Mark) and op.done is None:
                        # A broker confirm nobody waits for (mark_published(wait=False)):
                        # dropped, its event would stay pending for good (pending_count
                        # never back to 0, the shutdown drain waiting in vain, a duplicate
                        # after the next start). Try it again a little later.
                        unwaited.append(op)
                    self._queue.task_done()
                if unwaited:
                    asyncio.get_running_loop().call_later(1.0, self._requeue, unwaited)
                self._update_capacity()
                continue
            self._failed = None
            for op, result in zip(ops, results, strict=True):
                if op.done is not None and not op.done.done():
                    op.done.set_result(result)
                self._queue.task_done()
            self._update_capacity()
            self._appended.set()
            for listener in self._listeners:
                listener()

    def _requeue(self, ops: list[_Mark]) -> None:
        if self._task is not None:  # not closed meanwhile
            for op in ops:
                self._queue.put_nowait(op)

    def _write(self, ops: list[_Append | _Mark]) -> list[Any]:
        conn = self._writer
        assert conn is not None  # opened before the writer task starts
        results: list[Any] = []
        inserted = marked = 0
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if isinstance(op, _Append):
                    flags = []
                    for e in op.entries:
                        cur.execute(
                            _INSERT,
                            (
                                e.source,
                                e.event_id,
                                e.kind,
                                e.routing_key,
                                e.body,
                                e.time,
                                e.received_at,
                                e.reason,
                                e.detail,
                            ),
                        )
                        flags.append(cur.rowcount == 1)
                    inserted += sum(flags)
                    now = time.time()
                    for c in op.cursors:
                        cur.execute(_CURSOR, (c.source, c.key, c.seq, now))
                    results.append(flags)
                else:
                    cur.executemany(
                        _MARK,
                        ((op.at, seq) for seq in op.seqs),
                    )
                    marked += cur.rowcount
                    results.append(None)
            cur.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._stats.pending += inserted - marked
        self._stats.commits += 1
        now = time.monotonic()
        if now - self._stats.size_checked > 1.0:
            self._stats.size_checked = now
            self._measure_size()
        return results

    def _measure_size(self) -> None:
        conn = self._writer
        assert conn is not None  # opened first
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self._stats.size = (pages - free) * page_size

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every successful commit (the publisher's wake-up)."""
        self._listeners.append(listener)

    # -- reads --------------------------------------------------------------------

    async def wait_appended(self, max_wait: float | None = None) -> None:
        """Wait until something new was committed (or ``max_wait`` passes)."""
        try:
            async with asyncio.timeout(max_wait):
                await self._appended.wait()
        except TimeoutError:
            pass
        self._appended.clear()

    async def pending(self, *, after_seq: int, limit: int) -> list[StoredEntry]:
        """Entries not yet published, oldest first, with ``seq > after_seq``."""
        rows = await self._on_reader(self._select_pending, after_seq, limit)
        return [row_to_entry(r) for r in rows]

    def _select_pending(self, after_seq: int, limit: int) -> list[tuple[Any, ...]]:
        conn = self._reader
        assert conn is not None  # opened first
        return conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE status = 0 AND seq > ? ORDER BY seq LIMIT ?",  # noqa: S608 - constant column list
            (after_seq, limit),
        ).fetchall()

    def _count_pending(self) -> int:
        conn = self._reader
        assert conn is not None  # opened first
        return int(conn.execute("SELECT count(*) FROM events WHERE status = 0").fetchone()[0])

    async def cursors(self, source: str) -> dict[str, int]:
        """The stored stream positions of ``source``: subscription key → last seq."""
        rows = await self._on_reader(
            lambda: self._query("SELECT key, seq FROM cursors WHERE source = ?", (source,))
        )
        return dict(rows)

    async def status_of(self, source: str, event_ids: Iterable[str]) -> dict[str, int]:
        """Journal status (0 pending, 1 published) of the given events that exist."""
        ids = list(event_ids)
        marks = ",".join("?" * len(ids))
        rows = await self._on_reader(
            lambda: self._query(
                f"SELECT event_id, status FROM events WHERE source = ? AND event_id IN ({marks})",  # noqa: S608 - placeholders only
                (source, *ids),
            )
        )
        return dict(rows)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._reader
        assert conn is not None  # opened first
        return conn.execute(sql, args).fetchall()

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on the reader connection (admin API, replay)."""
        result: list[tuple[Any, ...]] = await self._on_reader(self._query, sql, args)
        return result

    # -- maintenance --------------------------------------------------------------

    async def prune(self, *, now: float | None = None, batch: int = 500) -> int:
        """
        Delete published events older than ``journal.retention``, ``batch`` rows per
        transaction so ingestion never waits long. Quarantined rows are kept.
        """
        cutoff = (now if now is not None else time.time()) - self._config.retention
        total = 0
        while True:
            deleted: int = await self._on_writer(self._prune_batch, cutoff, batch)
            total += deleted
            if deleted < batch:
                break
            await asyncio.sleep(0)
        if total:
            # Deleted rows free pages: re-measure now, or a journal held over max_size
            # would wait for a commit that its own limit refuses.
            await self._on_writer(self._measure_size)
            self._update_capacity()
        return total

    def _prune_batch(self, cutoff: float, batch: int) -> int:
        conn = self._writer
        assert conn is not None  # opened first
        cur = conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 1"
            " AND kind = 'event' AND published_at < ? ORDER BY seq LIMIT ?)",
            (cutoff, batch),
        )
        return cur.rowcount

    def state(self) -> dict[str, Any]:
        """Component status for ``/readyz``."""
        reason = self.over_limit()
        status: Literal["ok", "full", "error"] = (
            "ok" if reason is None else "error" if reason == "journal_error" else "full"
        )
        return {
            "status": status,
            "pending": self._stats.pending,
            "size_bytes": self._stats.size,
            **({"reason": reason} if reason else {}),
            **({"error": str(self._failed)} if self._failed else {}),
        }
