"""The journal: durable group-committed appends, dedupe, ordered pending, cursors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from listener.config import JournalConfig
from listener.envelope import Entry
from listener.exceptions import JournalCorrupt, JournalError, JournalFull, JournalLocked
from listener.journal import Cursor, Journal, inline
from listener.journal.file import JournalFile
from listener.journal.inline import InlineCommits
from listener.journal.queries import purge_quarantine, record_redrive
from listener.journal.retention import retention_bound
from listener.journal.schema import connect, migrate
from listener.journal.upkeep import (
    PRUNE_BEHIND_SLOW,
    PRUNE_MAX,
    PRUNE_MIN,
    PRUNE_PATIENCE,
    PRUNE_REST,
    PRUNE_SLOW,
    PRUNE_SPREAD,
)
from listener.journal.writes import Append, PollWrite, commit
from listener.metrics import Metrics


def entry(i: int, *, source: str = "s", kind: str = "event") -> Entry:
    return Entry(
        source=source,
        event_id=f"evt_{i}",
        kind=kind,  # type: ignore[arg-type]  # tests build both kinds from one helper
        routing_key="p.thing" if kind == "event" else source,
        body=b'{"n": %d}' % i,
        time=time.time(),
        received_at=time.time(),
        reason=None if kind == "event" else "invalid_json",
        detail=None if kind == "event" else "bad",
    )


def config(tmp_path: Path, **kw: object) -> JournalConfig:
    return JournalConfig.model_validate({"path": str(tmp_path / "j.db"), **kw})


async def test_append_reports_new_and_duplicate(tmp_path: Path) -> None:
    """A second append of the same (source, event id) is reported as a duplicate and not stored."""
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.append([entry(1), entry(2)]) == [True, True]
        assert await journal.append([entry(1)]) == [False]
        assert await journal.append([entry(1, source="other")]) == [True]
        assert journal.pending_count == 3


async def test_pending_in_order_and_marking(tmp_path: Path) -> None:
    """Pending entries come back oldest first; marked ones leave the pending set."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(10)])
        rows = await journal.pending(after_seq=0, limit=100)
        assert [r.entry.event_id for r in rows] == [f"evt_{i}" for i in range(10)]
        await journal.mark_published([r.seq for r in rows[:4]], wait=True)
        rest = await journal.pending(after_seq=0, limit=100)
        assert [r.entry.event_id for r in rest] == [f"evt_{i}" for i in range(4, 10)]
        assert journal.pending_count == 6
        assert [r.entry.body for r in rest] == [b'{"n": %d}' % i for i in range(4, 10)]


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Many concurrent appends are group-committed into far fewer transactions."""
    async with Journal(config=config(tmp_path)) as journal:
        results = await asyncio.gather(*(journal.append([entry(i)]) for i in range(500)))
        assert all(r == [True] for r in results)
        assert journal._stats.commits < 250
        assert journal.pending_count == 500


async def test_survives_reopen_with_cursors(tmp_path: Path) -> None:
    """Events and stream cursors written together are there after reopening the file."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(1)], cursors=[Cursor("lx", "trades?mint=A", 41)])
        await journal.append([entry(2)], cursors=[Cursor("lx", "trades?mint=A", 42, prev=41)])
        # A position is set only over the one it follows: never back, never past a gap.
        await journal.append([], cursors=[Cursor("lx", "trades?mint=A", 7)])
        await journal.append([], cursors=[Cursor("lx", "trades?mint=A", 7, prev=41)])
    async with Journal(config=config(tmp_path)) as journal:
        assert journal.pending_count == 2
        assert await journal.cursors("lx") == {"trades?mint=A": 42}


async def test_over_pending_limit_refuses(tmp_path: Path) -> None:
    """Past max_pending an append raises JournalFull and nothing more is stored."""
    async with Journal(config=config(tmp_path, max_pending=3), retry_after=7) as journal:
        await journal.append([entry(i) for i in range(3)])
        assert journal.over_limit() == "max_pending"
        with pytest.raises(JournalFull) as caught:
            await journal.append([entry(9)])
        assert caught.value.retry_after == 7
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([rows[0].seq], wait=True)
        assert journal.over_limit() is None
        await asyncio.wait_for(journal.wait_for_capacity(), 1)
        assert await journal.append([entry(9)]) == [True]


async def test_prune_keeps_pending_and_quarantine(tmp_path: Path) -> None:
    """Retention deletes only published events older than the retention."""
    async with Journal(config=config(tmp_path, retention="1h")) as journal:
        await journal.append([entry(1), entry(2), entry(3, kind="quarantine")])
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([r.seq for r in rows], wait=True)
        await journal.append([entry(4)])
        assert await journal.prune(now=time.time() + 7200, batch=1) == 2
        left = await journal.query("SELECT event_id FROM events ORDER BY seq")
        assert [r[0] for r in left] == ["evt_3", "evt_4"]


async def test_file_is_wal_and_readable_by_other_processes(tmp_path: Path) -> None:
    """The journal is a WAL-mode SQLite file another connection can read while it runs."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(1)])
        other = sqlite3.connect(tmp_path / "j.db")
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        finally:
            other.close()


async def test_one_bad_operation_does_not_roll_back_its_group(tmp_path: Path) -> None:
    """An append SQLite cannot store fails alone; the appends committed with it stay."""
    async with Journal(config=config(tmp_path)) as journal:
        good = [journal.submit([entry(i)]) for i in range(5)]
        bad = journal.submit([entry(99)], cursors=[Cursor("lx", "k", 2**63)])  # overflows
        more = [journal.submit([entry(i)]) for i in range(5, 10)]
        assert [await f for f in good + more] == [[True]] * 10
        with pytest.raises(JournalError):
            await bad
        left = await journal.query("SELECT event_id FROM events ORDER BY seq")
        assert [r[0] for r in left] == [f"evt_{i}" for i in range(10)]
        assert journal.pending_count == 10
        assert await journal.cursors("lx") == {}


async def test_cursor_never_skips_a_failed_append(tmp_path: Path) -> None:
    """A failed append of seq 1 followed by a good one of seq 2 leaves the cursor before 1."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(0)], cursors=[Cursor("lx", "k", 0)])
        broken = dataclasses.replace(entry(1), body=object())  # type: ignore[arg-type]  # cannot be bound
        first = journal.submit([broken], cursors=[Cursor("lx", "k", 1, prev=0)])
        second = journal.submit([entry(2)], cursors=[Cursor("lx", "k", 2, prev=1)])
        with pytest.raises(JournalError):
            await first
        assert await second == [True]
        # Event 2 is on disk, but the cursor stays at 0: a reconnect asks for 1 again.
        assert await journal.cursors("lx") == {"k": 0}


async def test_second_daemon_on_one_file_is_refused(tmp_path: Path) -> None:
    """A journal held by one daemon refuses a second, naming the holder's pid."""
    async with Journal(config=config(tmp_path), lock=True):
        with pytest.raises(JournalLocked) as caught:
            async with Journal(config=config(tmp_path), lock=True):
                pass
        assert f"pid {os.getpid()}" in str(caught.value)
        assert str(tmp_path / "j.db") in str(caught.value)
    async with Journal(config=config(tmp_path), lock=True):  # released on close
        pass


async def test_corrupt_file_is_named(tmp_path: Path) -> None:
    """A file that is not a database gives JournalCorrupt naming it and what to do."""
    (tmp_path / "j.db").write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(JournalCorrupt) as caught:
        async with Journal(config=config(tmp_path), lock=True):
            pass
    assert str(tmp_path / "j.db") in str(caught.value)
    assert "move it aside" in str(caught.value)


async def test_pruned_ids_stay_duplicates(tmp_path: Path) -> None:
    """An event pruned by retention is still a duplicate within dedupe_window."""
    async with Journal(config=config(tmp_path, retention="1h", dedupe_window="2h")) as journal:
        await journal.append([entry(1)])
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([r.seq for r in rows], wait=True)
        assert await journal.prune(now=time.time() + 4000) == 1
        assert await journal.append([entry(1)]) == [False]
        await journal.prune(now=time.time() + 4000 + 7300)  # past the window: forgotten
        assert await journal.append([entry(1)]) == [True]


async def test_an_id_received_before_the_dedupe_window_gets_no_tombstone(tmp_path: Path) -> None:
    """
    Retention keeps a tombstone only for an id still within ``dedupe_window`` of its
    receipt: one received earlier (a backlog published late) goes with its row.
    """
    async with Journal(config=config(tmp_path, retention="1h", dedupe_window="2h")) as journal:
        now = time.time()
        late = dataclasses.replace(entry(1), received_at=now - 7300)  # over 2 h ago
        await journal.append([late, entry(2)])
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([r.seq for r in rows], wait=True)
        # At now + 4000 both were published over an hour ago; the window began at
        # now - 3200, after evt_1's receipt and before evt_2's.
        assert await journal.prune(now=now + 4000) == 2
        assert await journal.query("SELECT event_id FROM tombstones") == [("evt_2",)]
        assert await journal.append([entry(1), entry(2)]) == [True, False]


async def test_tombstones_expire_in_batches_oldest_first(tmp_path: Path) -> None:
    """Retention forgets every expired tombstone, a batch at a time, and no other."""
    async with Journal(config=config(tmp_path, retention="1h", dedupe_window="2h")) as journal:
        now = time.time()
        for moment, ids in ((now + 4000, range(10)), (now + 8000, range(10, 15))):
            # (each group received 4000 s before its prune: inside the window)
            received = moment - 4000
            await journal.append([dataclasses.replace(entry(i), received_at=received) for i in ids])
            rows = await journal.pending(after_seq=0, limit=100)
            await journal.mark_published([r.seq for r in rows], wait=True)
            assert await journal.prune(now=moment, batch=3) == len(ids)
        # At now + 11300 the first ten are past the window (pruned at +4000), the last
        # five (pruned at +8000) are not.
        assert await journal.prune(now=now + 11300, batch=3) == 0
        (left,) = await journal.query("SELECT count(*) FROM tombstones")
        assert left == (5,)
        again = await journal.append([entry(i) for i in range(15)])
        assert again == [True] * 10 + [False] * 5


async def test_deferred_rows_leave_the_head(tmp_path: Path) -> None:
    """A deferred row is not pending; it comes back when due and is marked on confirm."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(3)])
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.defer([rows[0].seq], base=60, error="returned")
        assert journal.pending_count == 2 and journal.deferred_count == 1
        assert [r.entry.event_id for r in await journal.pending(after_seq=0, limit=10)] == [
            "evt_1",
            "evt_2",
        ]
        assert await journal.due_deferred(now=time.time(), limit=10, longest=61) == []
        due = await journal.due_deferred(now=time.time() + 61, limit=10, longest=61)
        assert [r.entry.event_id for r in due] == ["evt_0"]
        await journal.mark_published([due[0].seq], wait=True, deferred=True)
        assert journal.deferred_count == 0
    async with Journal(config=config(tmp_path)) as journal:
        assert (journal.pending_count, journal.deferred_count) == (2, 0)


async def test_deferred_rows_come_back_after_the_clock_stepped_back(tmp_path: Path) -> None:
    """
    Their retry time is wall-clock: after a step back of two hours (NTP, a VM resumed)
    they waited two hours, well past the longest backoff, the publisher's readiness
    and a cluster hand-over held up with them.
    """
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(2)])
        rows = await journal.pending(after_seq=0, limit=10)
        await journal.defer([rows[0].seq], base=30, cap=60, error="returned")
        stepped_back = time.time() - 7200
        due = await journal.due_deferred(now=stepped_back, limit=10, longest=61)
        assert [r.entry.event_id for r in due] == ["evt_0"]
        assert await journal.due_deferred(now=time.time(), limit=10, longest=61) == []


async def test_handoff_holds_each_new_row_with_its_seq(tmp_path: Path) -> None:
    """
    Group commits insert many rows a statement; the in-memory handoff names each new
    row with the seq the file gave it, whether the batch went in together or, because
    a duplicate or a tombstoned id was among it, a row at a time.
    """
    async with Journal(config=config(tmp_path, retention="1h", dedupe_window="2h")) as journal:
        journal.hand_off(True)  # (as while a publish session is on)
        await journal.append([entry(0)])
        (first,) = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([first.seq], wait=True)
        assert await journal.prune(now=time.time() + 4000) == 1  # evt_0 is a tombstone now
        journal.fresh.clear()
        together = await asyncio.gather(*(journal.append([entry(i)]) for i in range(1, 150)))
        mixed = await asyncio.gather(
            journal.append([entry(150), entry(151)]),
            journal.append([entry(0)]),  # pruned within the dedupe window
            journal.append([entry(7)]),  # a duplicate
            journal.append([entry(152, source="other"), entry(152, source="other")]),
        )
        assert all(r == [True] for r in together)
        assert mixed == [[True, True], [False], [False], [True, False]]
        handed = [(s.seq, s.entry.source, s.entry.event_id) for s in journal.fresh]
        stored = await journal.query(
            "SELECT seq, source, event_id FROM events WHERE status = 0 ORDER BY seq"
        )
        assert handed == [tuple(row) for row in stored]
        assert len(handed) == 149 + 3


class _Recorded(sqlite3.Cursor):
    """A cursor that keeps the text of every statement it runs."""

    statements: list[str] = []  # noqa: RUF012 - one list for the test that sets it

    def execute(self, sql: str, parameters: object = (), /) -> _Recorded:
        self.statements.append(sql)
        return super().execute(sql, parameters)  # type: ignore[arg-type]  # passed through


class _Recording(sqlite3.Connection):
    def cursor(self, factory: object = None) -> _Recorded:  # type: ignore[override]  # always ours
        return super().cursor(_Recorded)


def test_batches_of_any_size_insert_with_few_statement_shapes(tmp_path: Path) -> None:
    """
    Each batch goes in as statements of 1 to 8 rows, or 16, 32 or 64, so the
    connection's statement cache holds 11 insert shapes. One shape per batch size (1
    to 100 rows) held up to 6.3 MiB of prepared statements, filling in over minutes as
    rarer sizes came: the soak's resident size crept. A batch of up to 8 is one
    statement, and every row still gets its seq in batch order.
    """
    conn = sqlite3.connect(tmp_path / "j.db", isolation_level=None, factory=_Recording)
    migrate(conn)
    _Recorded.statements = []
    shapes: set[int] = set()
    first = 0
    for size in range(1, 131):
        _Recorded.statements.clear()
        batch = [entry(i) for i in range(first, first + size)]
        committed = commit(conn, [Append(batch, (), None)])
        inserts = [s for s in _Recorded.statements if "(VALUES" in s]
        rows = [s.count("(?, ?, ?, ?, ?, ?, ?, ?, ?)") for s in inserts]
        assert sum(rows) == size
        assert len(inserts) == 1 if size <= 8 else (len(inserts) <= size // 64 + 4)
        shapes.update(rows)
        assert [e.event_id for _, e in committed.fresh] == [e.event_id for e in batch]
        seqs = [seq for seq, _ in committed.fresh]
        assert seqs == list(range(seqs[0], seqs[0] + size))
        first += size
    assert shapes == {1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64}
    stored = conn.execute("SELECT event_id FROM events ORDER BY seq").fetchall()
    assert [r[0] for r in stored] == [f"evt_{i}" for i in range(first)]
    conn.close()


async def test_settled_waits_for_the_queued_appends(tmp_path: Path) -> None:
    """
    An append still queued is not pending yet: settled() returns once it is committed
    (the shutdown drain waits on it before it reads the pending count).
    """
    async with Journal(config=config(tmp_path)) as journal:
        queued = [journal.submit([entry(i)]) for i in range(5)]
        assert journal.pending_count == 0 and not any(f.done() for f in queued)
        await journal.settled()
        assert journal.pending_count == 5 and all(f.done() for f in queued)


async def test_another_process_writing_never_stalls_the_loop(tmp_path: Path) -> None:
    """
    Commits run on the event loop's thread while they are quick; while another
    connection (a redrive command) holds the write lock, the append waits for it on the
    writer thread instead, and the loop goes on meanwhile.
    """
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.append([entry(1)]) == [True]  # (inline)
        other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        append = asyncio.create_task(journal.append([entry(2)]))
        await asyncio.sleep(0.5)
        assert not append.done()  # waiting for the lock...
        assert ticks >= 10  # ...and not on the loop's thread
        other.execute("COMMIT")
        assert await append == [True]
        ticker.cancel()
        other.close()
        rows = await journal.pending(after_seq=0, limit=10)
        assert [r.entry.event_id for r in rows] == ["evt_1", "evt_2"]


async def test_work_on_the_writer_thread_waits_for_another_process_as_commits_do(
    tmp_path: Path,
) -> None:
    """
    After an inline commit the writer connection waits only a few milliseconds for
    another process's write lock (the loop must not stall); the writer thread's other
    work (a retry of deferred rows, retention) waits for it as long as a commit there
    would. It used to fail at once with ``database is locked``, which ended the service.
    """
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.append([entry(1)]) == [True]  # (inline)
        other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        retry = asyncio.create_task(journal.retry_now(["getstoken.badge.issued"]))
        await asyncio.sleep(0.3)
        assert not retry.done()  # waiting for the lock
        other.execute("COMMIT")
        other.close()
        await retry


async def test_a_failing_read_is_a_journal_error(tmp_path: Path) -> None:
    """SQLite's own errors leave the journal as JournalError, which its callers handle."""
    async with Journal(config=config(tmp_path)) as journal:
        with pytest.raises(JournalError, match="journal access failed") as caught:
            await journal.query("SELECT seq FROM no_such_table")
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        assert await journal.pending(after_seq=0, limit=1) == []  # and it goes on


def test_one_slow_commit_keeps_the_commits_inline_a_slow_disk_does_not() -> None:
    """
    One commit over 20 ms (SQLite's WAL checkpoint on a virtual disk) keeps commits on
    the loop's thread; three within 10 s, or one that stalls over 100 ms, send them to
    the writer thread for 10 s; a batch over 256 KiB always goes there.
    """
    policy = InlineCommits()
    assert policy.allowed(1000, now=0.0) and not policy.allowed(inline.MAX_BYTES + 1, now=0.0)
    policy.took(0.03, now=1.0)
    policy.took(0.001, now=1.1)
    policy.took(0.03, now=5.0)
    assert policy.allowed(1000, now=5.1)
    policy.took(0.03, now=12.0)  # the first slow one is over 10 s old by now
    assert policy.allowed(1000, now=12.1)
    policy.took(0.03, now=13.0)  # three within 10 s: 5.0, 12.0, 13.0
    assert not policy.allowed(1000, now=13.1) and not policy.allowed(1000, now=22.9)
    assert policy.allowed(1000, now=23.1)
    policy.took(0.03, now=24.0)  # the count starts over after a pause
    policy.took(0.03, now=25.0)
    assert policy.allowed(1000, now=25.1)
    policy.took(0.15, now=26.0)  # a stall
    assert not policy.allowed(1000, now=26.1) and policy.allowed(1000, now=36.1)


async def test_a_slow_disk_sends_the_commits_to_the_writer_thread(tmp_path: Path) -> None:
    """The journal follows that policy: the commit after three slow ones runs on the thread."""
    threads: list[str] = []
    async with Journal(config=config(tmp_path)) as journal:
        write = journal._write

        def slow_write(ops: list[Any]) -> Any:
            threads.append(threading.current_thread().name)
            time.sleep(0.03)
            return write(ops)

        journal._write = slow_write  # type: ignore[method-assign] # a slow disk
        for i in range(5):
            assert await journal.append([entry(i)]) == [True]
    main = threading.main_thread().name
    assert threads[:3] == [main] * 3, threads
    assert threads[3].startswith("journal-write") and threads[4].startswith("journal-write")


async def test_backlog_never_takes_a_row_twice_across_sessions(tmp_path: Path) -> None:
    """
    The publisher takes rows from the handoff, or reads the file where seqs are
    missing; rows a read took leave the handoff at once, so a later session (a new
    Backlog) never takes them again once they are published.
    """
    from listener.broker.backlog import Backlog

    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(1, 6)])  # (no session: file only)
        journal.hand_off(True)
        await journal.append([entry(i) for i in range(6, 11)])
        assert [s.seq for s in journal.fresh] == list(range(6, 11))
        first = Backlog(journal)
        await first.fill(100)
        assert [s.seq for s in first.items] == list(range(1, 11))
        assert first.reads == 1 and not journal.fresh
        await journal.mark_published([s.seq for s in first.items], wait=True)
        first.close()
        second = Backlog(journal, rescan=0.0)
        for _ in range(3):
            await second.fill(100)
        assert list(second.items) == []
        await journal.append([entry(11)])
        await second.fill(100)
        assert [s.entry.event_id for s in second.items] == ["evt_11"]


async def test_a_backlog_behind_the_handoff_lets_go_of_it_until_it_catches_up(
    tmp_path: Path,
) -> None:
    """
    While the publisher reads a backlog from the file (full reads), the rows appended
    meanwhile wait on file, not in memory; each row is still taken once, in seq order,
    and once the reads catch up the handoff serves again without a read.
    """
    from listener.broker.backlog import Backlog

    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(1, 41)])  # (an outage's backlog)
        backlog = Backlog(journal, rescan=0.0)
        taken: list[int] = []
        held: list[int] = []
        for i in range(41, 56):
            await journal.append([entry(i)])
            held.append(len(journal.fresh))
            await backlog.fill(8)
            taken += [s.seq for s in backlog.items]
            backlog.items.clear()
        assert max(held) <= 2, held  # (before: each row appended stayed, up to FRESH_MAX)
        assert taken == list(range(1, 56))
        reads = backlog.reads
        for i in range(56, 60):
            await journal.append([entry(i)])
            await backlog.fill(8)
        assert [s.seq for s in backlog.items] == list(range(56, 60))
        assert backlog.reads == reads, "caught up: the handoff serves, no read"


async def test_no_publish_session_no_rows_held_in_memory(tmp_path: Path) -> None:
    """
    The handoff holds rows only while a publish session takes them: appended with
    none on (the broker away), they are on file only, and a session that ends lets go
    of what it had not taken; the next session reads them from the file, each once.
    """
    from listener.broker.backlog import Backlog

    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(1, 4)])
        assert not journal.fresh
        session = Backlog(journal)
        await journal.append([entry(i) for i in range(4, 7)])
        assert [s.seq for s in journal.fresh] == [4, 5, 6]
        session.close()  # (the connection was lost before it took them)
        assert not journal.fresh
        await journal.append([entry(i) for i in range(7, 9)])
        assert not journal.fresh
        following = Backlog(journal, rescan=0.0)
        await journal.append([entry(9)])
        for _ in range(3):
            await following.fill(100)
        assert [s.seq for s in following.items] == list(range(1, 10))
        assert following.reads >= 1 and not journal.fresh


async def test_timing_reports_each_commit_and_the_waits_queued_behind_upkeep(
    tmp_path: Path,
) -> None:
    """
    ``timed`` gets each commit's own time and every append's wait from queued to
    durable; an append queued while upkeep holds the writer waits that long, and the
    commit after it does not (the two histograms tell a slow disk from a queue).
    """
    seen: list[tuple[float, list[float]]] = []
    async with Journal(config=config(tmp_path)) as journal:
        journal.timed = lambda commit, waits: seen.append((commit, waits))
        await journal.append([entry(0)])
        assert len(seen) == 1 and len(seen[0][1]) == 1
        assert 0 < seen[0][0] <= seen[0][1][0]
        seen.clear()
        async with journal._writing:  # as a retention batch on the writer thread
            queued = [journal.submit([entry(i)]) for i in (1, 2, 3)]
            await asyncio.sleep(0.3)
        await asyncio.gather(*queued)
        await journal.mark_published([1], wait=True)  # a commit without an append
    waits = [w for _, ws in seen for w in ws]
    assert len(waits) == 3 and min(waits) >= 0.29, seen
    assert all(commit < 0.29 for commit, _ in seen), seen
    assert [ws for _, ws in seen][-1] == []


def test_metrics_observe_commits_and_waits() -> None:
    """Sub-millisecond commits land in their own buckets; each wait is one observation."""
    metrics = Metrics()
    metrics.journal_timed(0.0004, [0.0004, 0.3])

    def samples(name: str) -> dict[str | None, float]:
        histogram = getattr(metrics, name)
        return {
            s.labels.get("le"): s.value
            for s in histogram.collect()[0].samples
            if s.name.endswith(("_count", "_bucket"))
        }

    commit, wait = samples("journal_commit_seconds"), samples("journal_wait_seconds")
    assert commit[None] == 1 and commit["0.0005"] == 1 and commit["0.00025"] == 0
    assert wait[None] == 2 and wait["0.0005"] == 1 and wait["0.25"] == 1 and wait["0.5"] == 2


async def _upkeep_steps(tmp_path: Path, rows: int, upkeep: str) -> int:
    """SQLite VM steps (in hundreds, both connections) of a maintenance round's ``upkeep``."""
    async with Journal(config=config(tmp_path, retention="1h")) as journal:
        for start in range(0, rows, 1000):
            await journal.append([entry(i) for i in range(start, min(start + 1000, rows))])
        seqs = [r.seq for r in await journal.pending(after_seq=0, limit=rows)]
        await journal.mark_published(seqs, wait=True)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0  # (go on)

        for conn in (journal._writer, journal._reader):
            assert conn is not None
            conn.set_progress_handler(count, 100)
        if upkeep == "prune":
            assert await journal.prune() == 0  # everything was published just now
        else:
            await journal.recount()
            assert (journal.pending_count, journal.deferred_count) == (0, 0)
        for conn in (journal._writer, journal._reader):
            assert conn is not None
            conn.set_progress_handler(None, 100)
        return steps[0]


async def test_retention_reads_only_rows_old_enough(tmp_path: Path) -> None:
    """
    A round with nothing to delete reads about as much of a 20,000-row journal as of a
    1,000-row one: the search for rows old enough stops at the first row received
    after the cutoff instead of scanning every newer row (days of them by default).
    """
    small = await _upkeep_steps(tmp_path / "small", 1_000, "prune")
    large = await _upkeep_steps(tmp_path / "large", 20_000, "prune")
    assert large < small + 20, (small, large)


async def test_recount_reads_only_the_open_rows(tmp_path: Path) -> None:
    """Counting pending and deferred rows (every round) reads their indexes, not the table."""
    small = await _upkeep_steps(tmp_path / "small", 1_000, "recount")
    large = await _upkeep_steps(tmp_path / "large", 20_000, "recount")
    assert large < small + 20, (small, large)


async def test_retention_bound_is_the_first_row_received_after_the_cutoff(
    tmp_path: Path,
) -> None:
    """The binary search skips deleted seqs and answers one past the end when all are older."""
    async with Journal(config=config(tmp_path)) as journal:
        assert journal._reader is not None
        assert retention_bound(journal._reader, time.time(), time.time()) == 0  # no rows
        base = time.time()
        rows = [dataclasses.replace(entry(i), received_at=base + i) for i in range(50)]
        await journal.append(rows)
        await journal.query("SELECT 1")  # (the reader sees the commit)
        await journal._on_writer(
            lambda: (
                journal._writer
                and journal._writer.execute("DELETE FROM events WHERE seq BETWEEN 10 AND 30")
            )
        )
        reader = journal._reader
        left = [(seq, at) for seq, at in reader.execute("SELECT seq, received_at FROM events")]
        end = base + 1000
        for cutoff in (base - 1, base + 5.5, base + 20, base + 30, base + 100):
            bound = retention_bound(reader, cutoff, end)
            assert all(at < cutoff for seq, at in left if seq < bound), cutoff
            after = [at for seq, at in left if seq >= bound]
            assert not after or after[0] >= cutoff, cutoff
        assert retention_bound(reader, base + 5.5, end) == 7  # evt_6 has seq 7
        assert retention_bound(reader, base + 100, end) == 51
        # Rows stamped in the future (the clock was set back since) do not stop the
        # search wherever the probes land: the bound passes them.
        writer = journal._writer
        assert writer is not None
        await journal._on_writer(
            lambda: writer.execute(
                "UPDATE events SET received_at = ? WHERE seq > 30 AND seq % 2 = 1",
                (end + 10**6,),
            )
        )
        await journal.query("SELECT 1")
        assert retention_bound(reader, base + 100, end) == 51


async def test_retention_batches_shrink_while_slow_and_grow_back(tmp_path: Path) -> None:
    """A delete that holds the writer long halves the next batch; quick ones double it back."""
    sizes: list[int] = []

    def fake_delete(conn: object, size: int) -> int:
        sizes.append(size)
        if len(sizes) <= 4:
            time.sleep(2 * PRUNE_SLOW)  # a busy host
        return size if len(sizes) < 7 else 0

    async with Journal(config=config(tmp_path)) as journal:
        total = await journal._in_batches(fake_delete, batch=800, began=time.monotonic())
    assert sizes == [800, 400, 200, PRUNE_MIN, PRUNE_MIN, 200, 400]
    assert total == sum(sizes[:-1])


async def test_a_round_that_is_behind_grows_its_batches_past_the_usual_bound(
    tmp_path: Path,
) -> None:
    """
    Once a round has run PRUNE_PATIENCE, a delete slow enough to halve the batch of a
    round on time grows it instead (up to PRUNE_MAX): a saturated host still keeps up.
    """
    sizes: list[int] = []

    def fake_delete(conn: object, size: int) -> int:
        sizes.append(size)
        time.sleep(1.2 * PRUNE_SLOW)  # slow for a round on time, quick for one behind
        return size if len(sizes) < 6 else 0

    assert 1.2 * PRUNE_SLOW < PRUNE_BEHIND_SLOW / 4
    async with Journal(config=config(tmp_path)) as journal:
        behind = time.monotonic() - PRUNE_PATIENCE - 1
        await journal._in_batches(fake_delete, batch=500, began=behind)
    assert sizes == [500, 1000, PRUNE_MAX, PRUNE_MAX, PRUNE_MAX, PRUNE_MAX]


@pytest.mark.parametrize("case", ["on time", "late", "full"])
async def test_a_round_rests_between_its_deletes_for_its_first_seconds(
    tmp_path: Path, case: str
) -> None:
    """
    For its first PRUNE_SPREAD seconds a round leaves the writer to the commits for
    PRUNE_REST times as long as each delete took; after that ("late"), or while the
    journal is at max_size and takes no appends ("full"), deletes follow each other at
    once.
    """
    spans: list[tuple[float, float]] = []
    work = 0.01

    def fake_delete(conn: object, size: int) -> int:
        start = time.monotonic()
        time.sleep(work)
        spans.append((start, time.monotonic()))
        return size if len(spans) < 4 else 0

    async with Journal(config=config(tmp_path, max_size=1 << 20)) as journal:
        if case == "full":
            journal._stats.size = 1 << 20
        began = time.monotonic() - (PRUNE_SPREAD + 1 if case == "late" else 0)
        await journal._in_batches(fake_delete, batch=PRUNE_MIN, began=began)
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    assert len(gaps) == 3
    if case == "on time":
        assert min(gaps) >= work * PRUNE_REST * 0.9
    else:
        assert max(gaps) < work * PRUNE_REST / 2


def _temp_files() -> set[str]:
    """SQLite's open temporary files in this process (unlinked ``etilqs_*`` files)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "etilqs_" in (target := os.readlink(f"/proc/self/fd/{fd}")):
                found.add(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
@pytest.mark.parametrize("writer", [True, False])
async def test_the_writers_statement_journals_stay_in_memory(tmp_path: Path, writer: bool) -> None:
    """
    A 64-row insert into a journal of a few thousand rows changes more index pages than
    SQLite keeps of a statement's undo record in memory (64 KiB); it went to a temp file,
    a third of the bytes the writer wrote. The writer's connection keeps them in memory;
    any other connection (``writer=False``, shown here to spill) keeps SQLite's default.
    """
    path = tmp_path / "j.db"
    conn = connect(path, writer=writer)
    ids = random.Random(7).sample(range(10**9), 6064)
    pad = b"x" * 900
    commit(conn, [Append([dataclasses.replace(entry(i), body=pad) for i in ids[:6000]], (), None)])
    seen: set[str] = set()

    def look() -> int:
        seen.update(_temp_files())
        return 0

    conn.set_progress_handler(look, 50)
    batch = [dataclasses.replace(entry(i), body=pad) for i in ids[6000:]]
    assert len(commit(conn, [Append(batch, (), None)]).fresh) == 64
    conn.set_progress_handler(None, 50)
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == (2 if writer else 0)
    options = {row[0] for row in conn.execute("PRAGMA compile_options")}
    if writer or "TEMP_STORE=1" in options:  # (a build that keeps temp files in memory anyway)
        assert bool(seen) is not writer
    conn.close()
    async with Journal(config=config(tmp_path)) as journal:  # the daemon's writer is one
        for conn, store in ((journal._writer, 2), (journal._reader, 0)):
            assert conn is not None
            assert conn.execute("PRAGMA temp_store").fetchone()[0] == store


def test_rows_read_back_share_their_source_and_routing_key() -> None:
    """A drain holds thousands of rows at once: each names its source and key, not a copy."""
    from listener.journal import row_to_entry

    def row(seq: int) -> tuple[Any, ...]:
        # Built at run time: equal strings, distinct objects, as each row from SQLite.
        source, key = "".join(["gst", "-", "hooks"]), ".".join(["gst", "user", str(seq % 2)])
        return (seq, source, f"e{seq}", "event", key, b"{}", 1.0, 2.0, None, None)

    first, second, third = (row_to_entry(row(seq)).entry for seq in (1, 2, 3))
    assert first.source is second.source is third.source
    assert first.routing_key is third.routing_key and first.routing_key != second.routing_key
    assert (first.source, first.routing_key) == ("gst-hooks", "gst.user.1")


async def test_a_file_from_before_polled_at_opens_and_keeps_its_primed_resources(
    tmp_path: Path,
) -> None:
    """poll_resources gained polled_at: an older file gets the column, its rows stay."""
    path = tmp_path / "j.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        "CREATE TABLE poll_resources (source TEXT NOT NULL, resource TEXT NOT NULL,"
        " primed_at REAL NOT NULL, PRIMARY KEY (source, resource)) WITHOUT ROWID;"
        "INSERT INTO poll_resources VALUES ('tt', 'project_metrics:aave', 1.0);"
    )
    conn.close()
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.poll_primed("tt") == {"project_metrics:aave": None}
        write = PollWrite("tt", polled=("project_metrics:aave", 123.0))
        await journal.append([], poll=write)
        assert await journal.poll_primed("tt") == {"project_metrics:aave": 123.0}


async def test_purge_keeps_quarantine_rows_not_yet_sent(tmp_path: Path) -> None:
    """
    `quarantine purge` deletes what was sent to the quarantine exchange (or redriven),
    never a row still owed: pending, or deferred (the broker returned it). Deferred ones
    used to go too.
    """
    rows = [entry(i, kind="quarantine") for i in range(4)]
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append(rows)
    with sqlite3.connect(tmp_path / "j.db") as conn:  # pending, published, redriven, deferred
        for i, status in enumerate((0, 1, 2, 3)):
            conn.execute("UPDATE events SET status = ? WHERE event_id = ?", (status, f"evt_{i}"))
    async with JournalFile(tmp_path / "j.db", writable=True) as file:
        assert await purge_quarantine(file, before=time.time() + 60) == 2
        left = await file.query("SELECT event_id, status FROM events ORDER BY seq")
    assert left == [("evt_0", 0), ("evt_3", 3)]


async def test_near_max_size_dedupe_ids_then_published_events_make_room(tmp_path: Path) -> None:
    """
    Past 90% of max_size, make_room frees pages down to 80%: first the ids kept for
    dedupe_window (oldest first), then published events still inside retention (oldest
    first), never a pending row. Tombstones alone (30 days of them at defaults) used
    to fill the journal and refuse all intake with nothing pending.
    """
    big = [
        dataclasses.replace(entry(i), body=b'{"n": %d, "pad": "%s"}' % (i, b"x" * 600))
        for i in range(3000)
    ]
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append(big)
        published = [s.seq for s in await journal.pending(after_seq=0, limit=3000)][:-10]
        await journal.mark_published(published)
    with sqlite3.connect(tmp_path / "j.db") as conn:  # 20,000 ids of pruned events
        conn.executemany(
            "INSERT INTO tombstones (source, event_id, pruned_at) VALUES ('s', ?, ?)",
            ((f"gone_{i:06d}", 1000.0 + i) for i in range(20_000)),
        )

    async def room(share: float) -> tuple[tuple[int, int], Journal, int]:
        # The journal opened with max_size set so that it is at `share` of it.
        async with Journal(config=config(tmp_path)) as probe:
            size = probe.size_bytes
        limit = int(size / share)
        async with Journal(config=config(tmp_path, max_size=limit)) as journal:
            made = await journal.make_room(batch=1000)
            return made, journal, limit

    (forgotten, pruned), journal, limit = await room(0.95)
    assert forgotten > 0 and pruned == 0  # the ids go first...
    assert journal.size_bytes < 0.8 * limit
    with sqlite3.connect(tmp_path / "j.db") as conn:
        (oldest,) = conn.execute("SELECT min(pruned_at) FROM tombstones").fetchone()
        assert oldest == 1000.0 + forgotten  # ...oldest first
    (forgotten, pruned), journal, limit = await room(0.99)
    assert pruned > 0  # then published events, oldest first
    assert journal.size_bytes < 0.8 * limit and journal.over_limit() is None
    with sqlite3.connect(tmp_path / "j.db") as conn:
        (pending,) = conn.execute("SELECT count(*) FROM events WHERE status = 0").fetchone()
        (first,) = conn.execute("SELECT min(seq) FROM events WHERE status = 1").fetchone()
    assert pending == 10 and first == published[0] + pruned


def test_record_redrive_answers_each_fresh_entry_in_its_place(tmp_path: Path) -> None:
    """
    An event the daemon journaled between a redrive's check and its write gets None in
    its place, so the report pairs every other row with its own seq (a shorter list
    used to shift the pairs and drop the last).
    """
    conn = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    migrate(conn)
    commit(conn, [Append([entry(1)], (), None)])  # the daemon got evt_1 meanwhile
    fresh = [(100, entry(0)), (101, entry(1)), (102, entry(2))]
    seqs = record_redrive(conn, fresh=fresh, duplicates=[], failing=[])
    assert seqs[1] is None and seqs[0] is not None and seqs[2] is not None
    assert seqs[0] < seqs[2]
    conn.close()


async def test_a_poll_keys_change_count_goes_with_its_state_to_another_replica(
    tmp_path: Path,
) -> None:
    """
    The count names a change's id from the third on: a replica taking the source over
    without it would give a flipping value's next change an id already used. A
    checkpoint of an older release (no counts) leaves the counts here as they are: one
    taken as 0 made the next changes repeat ids this journal had issued.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    async with Journal(config=config(one)) as journal:
        states = [("k1", "h1", b'{"v": 1}', 3), ("k2", "h2", b'{"v": 2}', 0)]
        await journal.append([], poll=PollWrite("tt", states=states))
        checkpoint = await journal.checkpoint("tt", None)
    assert checkpoint.state["changes"] == [("k1", 3)]
    async with Journal(config=config(two)) as journal:
        assert await journal.adopt("tt", None, checkpoint.state) == 2
        found = await journal.poll_states("tt", ["k1", "k2"])
        assert {k: v[2] for k, v in found.items()} == {"k1": 3, "k2": 0}
        older = {k: v for k, v in checkpoint.state.items() if k != "changes"}
        newer_states = [[k, h + "x", c, at + 1] for k, h, c, at in older["states"]]
        assert await journal.adopt("tt", None, {**older, "states": newer_states}) == 2
        found = await journal.poll_states("tt", ["k1", "k2"])
        assert {k: v[2] for k, v in found.items()} == {"k1": 3, "k2": 0}
        assert {k: v[0] for k, v in found.items()} == {"k1": "h1x", "k2": "h2x"}  # (taken)


@pytest.mark.parametrize(("setting", "expected"), [(None, 2), ("full", 2), ("normal", 1)])
async def test_the_writer_syncs_as_configured(
    tmp_path: Path, setting: str | None, expected: int
) -> None:
    """
    CONTRACT §8's 2xx-after-durable rests on ``synchronous=full`` (2), the default; no
    SIGKILL test could tell OFF from FULL, as the page cache survives a killed process.
    """
    options = {} if setting is None else {"synchronous": setting}
    async with Journal(config=config(tmp_path, **options)) as journal:
        writer = journal._writer  # (the connection every commit goes through)
        assert writer is not None
        assert writer.execute("PRAGMA synchronous").fetchone() == (expected,)
