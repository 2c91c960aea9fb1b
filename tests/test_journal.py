"""The journal: durable group-committed appends, dedupe, ordered pending, cursors."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from listener.config import JournalConfig
from listener.envelope import Entry
from listener.exceptions import JournalFull
from listener.journal import Cursor, Journal


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
        await journal.append([entry(2)], cursors=[Cursor("lx", "trades?mint=A", 42)])
        await journal.append([], cursors=[Cursor("lx", "trades?mint=A", 7)])  # never goes back
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
