"""
The journal file's schema across builds: an older file is migrated in one transaction
(two processes at once, or one interrupted, leave it whole), and a file a newer build
wrote is refused with one line instead of misread (rows of a status the older build does
not know were left unpublished without a word).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from listener.exceptions import JournalError
from listener.journal import Journal
from listener.journal import schema as journal_schema
from listener.journal.schema import SCHEMA_VERSION, connect, migrate
from tests.test_config import run_cli, write
from tests.test_journal import config, entry

# The first release's file (2026-11-22): no deferred rows, tombstones or poll tables.
FIRST_RELEASE = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    time REAL NOT NULL,
    received_at REAL NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    published_at REAL,
    reason TEXT,
    detail TEXT,
    UNIQUE (source, event_id)
);
CREATE INDEX events_pending ON events (seq) WHERE status = 0;
CREATE INDEX events_time ON events (time);
CREATE TABLE cursors (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
"""


def first_release_journal(path: Path, pending: int = 3) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(FIRST_RELEASE)
        now = time.time()
        conn.executemany(
            "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at)"
            " VALUES ('s', ?, 'event', 'p.thing', ?, ?, ?)",
            [(f"evt_{i}", b'{"n": %d}' % i, now, now) for i in range(pending)],
        )
        conn.execute("INSERT INTO cursors VALUES ('lx', 'trades', 42, ?)", (now,))
    conn.close()


def columns(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        found = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    conn.close()
    return found


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.close()
    return int(version)


async def test_a_first_release_journal_is_migrated_and_says_so(tmp_path: Path) -> None:
    """Its pending rows and cursor are kept; the migration is logged with its time."""
    first_release_journal(tmp_path / "j.db")
    with capture_logs() as logs:
        async with Journal(config=config(tmp_path)) as journal:
            assert [s.entry.event_id for s in await journal.pending(after_seq=0, limit=10)] == [
                "evt_0",
                "evt_1",
                "evt_2",
            ]
            assert await journal.cursors("lx") == {"trades": 42}
            assert await journal.append([entry(0)]) == [False]  # (still a duplicate)
    assert {"attempts", "retry_at", "error"} <= columns(tmp_path / "j.db")
    assert user_version(tmp_path / "j.db") == SCHEMA_VERSION
    said = [e for e in logs if e["event"].startswith("journal_migrat")]
    assert [e["event"] for e in said] == ["journal_migrating", "journal_migrated"]
    assert said[1]["from_schema"] == 0 and said[1]["to_schema"] == SCHEMA_VERSION
    assert said[1]["seconds"] >= 0
    with capture_logs() as logs:  # once migrated, nothing more to do or say
        async with Journal(config=config(tmp_path)):
            pass
    assert not [e for e in logs if e["event"].startswith("journal_migrat")]


async def test_a_journal_a_newer_build_wrote_is_refused_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    """An older build refuses it (daemon and commands: exit 2, one line); nothing changes."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(1)])
    path = tmp_path / "j.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match=rf"written by a newer listener \(its schema {SCHEMA_VERSION + 1}"):
        async with Journal(config=config(tmp_path)):
            pass
    with pytest.raises(JournalError, match="newer listener"):
        connect(path, create=False, read_only=True)
    config_file = write(
        tmp_path,
        f"""
broker: {{url: "amqp://guest:guest@127.0.0.1:1/", exchange: journal-schema}}
journal: {{path: {path}}}
http: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
sources: []
""",
    )
    for argv, code in ((["run"], 2), (["quarantine", "list"], 1)):  # (its journal errors: 1)
        result = run_cli(*argv, "--config", str(config_file))
        assert result.returncode == code, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if "newer listener" in line]
        assert str(path) in line
    assert user_version(path) == SCHEMA_VERSION + 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
    conn.close()


def test_two_processes_migrating_one_file_at_once_both_open_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Both looked for the added columns, both found them missing, both added them: the
    second failed, "duplicate column name", a traceback at start. The two are made to
    meet at that look; now the second waits for the first's transaction and finds
    nothing left to do.
    """
    path = tmp_path / "j.db"
    first_release_journal(path)
    meet = threading.Barrier(2)

    class Meeting(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            result = super().execute(sql, *args)
            if sql.startswith("PRAGMA table_info(events)"):
                rows = result.fetchall()
                try:
                    meet.wait(1.0)
                except threading.BrokenBarrierError:
                    pass  # (the other one waits for the write lock: it cannot come)
                return iter(rows)  # type: ignore[return-value]  # only iterated
            return result

    real = sqlite3.connect

    def meeting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real(*args, factory=Meeting, **kwargs)

    monkeypatch.setattr(journal_schema.sqlite3, "connect", meeting)
    outcomes: dict[int, str] = {}

    def open_it(n: int) -> None:
        try:
            connect(path).close()
            outcomes[n] = "ok"
        except Exception as exc:  # (the outcome is what the test reads)
            outcomes[n] = repr(exc)

    threads = [threading.Thread(target=open_it, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == {0: "ok", 1: "ok"}
    assert user_version(path) == SCHEMA_VERSION


def test_an_interrupted_migration_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step failing half way (a full disk, a kill) undoes the steps before it."""
    path = tmp_path / "j.db"
    first_release_journal(path)
    monkeypatch.setattr(
        journal_schema, "_ADDED_INDEXES", (*journal_schema._ADDED_INDEXES, "CREATE INDEX x ON nowhere (y)")
    )
    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        migrate(conn)
    conn.close()
    assert "attempts" not in columns(path) and user_version(path) == 0
    monkeypatch.undo()
    connect(path).close()
    assert "attempts" in columns(path) and user_version(path) == SCHEMA_VERSION
