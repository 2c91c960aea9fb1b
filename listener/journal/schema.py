"""
The journal's file format: tables, statuses, typed rows, and how a connection opens.

One SQLite file in WAL mode (https://sqlite.org/wal.html) holds

* ``events`` - every accepted event and quarantined payload, with its :class:`Status`;
* ``cursors`` - stream positions, written in the same transaction as their events;
* ``tombstones`` - (source, event id) of events pruned by retention while still within
  ``journal.dedupe_window`` of their receipt, kept that long from the prune, so a
  captured webhook replayed later is still a duplicate;
* ``poll_state`` / ``poll_aliases`` / ``poll_resources`` - what poll sources last saw
  (content per key, renamed items, resources polled once), written in the same
  transaction as the change events it produced.

Schema changes are additive and applied on open (:func:`migrate`, in one transaction),
so an older file opens as it is. The file's ``PRAGMA user_version`` says which schema it
has (:data:`SCHEMA_VERSION`; 0 before the number was kept): a build refuses a file a
newer one wrote, whose rows it could misread (a rollback after an upgrade: a build
that knew no deferred rows left them unpublished without a word).
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from listener.envelope import Entry
from listener.exceptions import JournalCorrupt, JournalError

__all__ = [
    "COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Cursor",
    "Status",
    "StoredEntry",
    "connect",
    "error_code",
    "is_corrupt",
    "migrate",
    "row_to_entry",
]

log = structlog.get_logger("listener.journal")

BUSY_TIMEOUT_MS = 30_000
# The schema this build writes, kept as the file's PRAGMA user_version. Raise it with
# every change to the tables, columns or indexes (and migrate to it below).
SCHEMA_VERSION = 2  # 2: poll_state.changes
# What SQLite says of a file that is not (or no longer) a database it can read.
_CORRUPT = re.compile(r"not a database|malformed|corrupt", re.IGNORECASE)


def error_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of ``exc`` (``SQLITE_READONLY``...), 0 if it has none."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged (or no database at all)."""
    damaged = error_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return damaged or bool(_CORRUPT.search(str(exc)))


class Status(enum.IntEnum):
    """An ``events`` row's state; the label is what ``/v1/events`` shows."""

    PENDING = 0  # accepted, not yet confirmed by the broker
    PUBLISHED = 1  # confirmed (for a quarantine row: sent to the quarantine exchange)
    REDRIVEN = 2  # a quarantine row whose payload now passes and was published
    DEFERRED = 3  # returned or nacked by the broker: retried with backoff, off the head

    @property
    def label(self) -> str:
        """The lower-case name used in the API."""
        return self.name.lower()


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
    status INTEGER NOT NULL DEFAULT 0,      -- Status
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
CREATE TABLE IF NOT EXISTS tombstones (
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    pruned_at REAL NOT NULL,
    PRIMARY KEY (source, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS poll_state (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    hash TEXT NOT NULL,
    content BLOB NOT NULL,
    updated_at REAL NOT NULL,
    changes INTEGER NOT NULL DEFAULT 0,     -- changes of the key seen since its first sight
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS poll_resources (
    source TEXT NOT NULL,
    resource TEXT NOT NULL,
    primed_at REAL NOT NULL,                -- the first successful poll's time
    PRIMARY KEY (source, resource)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS poll_aliases (
    source TEXT NOT NULL,
    item TEXT NOT NULL,
    current TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, item)
) WITHOUT ROWID;
"""

# Columns added after the tables were first released: (table, name, declaration).
_ADDED_COLUMNS = (
    ("events", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("events", "retry_at", "REAL"),
    ("events", "error", "TEXT"),
    # The start of the resource's last whole successful poll: the next waits for its
    # interval after that, across restarts and hand-overs too.
    ("poll_resources", "polled_at", "REAL"),
    # How many changes of the key were seen since its first sight (a change event's id
    # names it from the third: handlers.polling.change_id).
    ("poll_state", "changes", "INTEGER NOT NULL DEFAULT 0"),
)
_ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS events_deferred ON events (retry_at) WHERE status = 3",
    "CREATE INDEX IF NOT EXISTS events_type ON events (routing_key, seq)",
    # Retention forgets expired tombstones through it, not by scanning them all.
    "CREATE INDEX IF NOT EXISTS tombstones_pruned ON tombstones (pruned_at)",
)

COLUMNS = "seq, source, event_id, kind, routing_key, body, time, received_at, reason, detail"


@dataclass(frozen=True, slots=True)
class Cursor:
    """
    A stream position to store in the same transaction as its event.

    Written as a compare-and-set: ``seq`` is stored only where the stored position is
    ``prev`` (``None``: none stored yet). When an earlier append of the same
    subscription failed, the position it would have moved to is missing, so later
    ones do not move it either: a cursor never skips an event that is not on disk.
    """

    source: str
    key: str
    seq: int
    prev: int | None = None


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as read back from the journal, with its journal ``seq``."""

    seq: int
    entry: Entry
    status: Status = Status.PENDING


def row_to_entry(row: Sequence[Any], status: Status = Status.PENDING) -> StoredEntry:
    """A :class:`StoredEntry` from a row whose first ten columns are :data:`COLUMNS`."""
    seq, source, event_id, kind, routing_key, body, moment, received_at, reason, detail = row[:10]
    kind_: Literal["event", "quarantine"] = "event" if kind == "event" else "quarantine"
    # Interned: a drain's thousands of rows in hand share a few sources and keys, not a
    # copy each (Python's allocator keeps part of such a high-water mark for good).
    return StoredEntry(
        seq=seq,
        entry=Entry(
            source=sys.intern(source),
            event_id=event_id,
            kind=kind_,
            routing_key=sys.intern(routing_key),
            body=bytes(body),
            time=moment,
            received_at=received_at,
            reason=reason,
            detail=detail,
        ),
        status=status,
    )


def _statements(script: str) -> list[str]:
    """``script`` as single statements (``executescript`` would commit first)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    return out


_SCHEMA_STATEMENTS = _statements(SCHEMA)


def schema_version(conn: sqlite3.Connection) -> int:
    """
    The file's schema (``PRAGMA user_version``).

    Raises:
        JournalError: a newer build wrote it.
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"was written by a newer listener (its schema {version}; this build knows"
            f" {SCHEMA_VERSION} at most): run that build or a newer one on it"
        )
    return int(version)


def migrate(conn: sqlite3.Connection) -> None:
    """
    Bring the file to :data:`SCHEMA_VERSION` in one transaction: tables, columns added
    since, indexes. Another process migrating at the same time waits for it (the write
    lock), then finds nothing to do; an interrupted migration leaves the file as it was.

    Raises:
        JournalError: a newer build wrote the file.
    """
    if schema_version(conn) == SCHEMA_VERSION:
        return
    began = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)  # (again, under the write lock)
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if found < SCHEMA_VERSION and tables:
            log.info("journal_migrating", from_schema=found, to_schema=SCHEMA_VERSION)
        if found < SCHEMA_VERSION:
            _migrate(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if found < SCHEMA_VERSION and tables:
        seconds = round(time.monotonic() - began, 3)
        log.info("journal_migrated", from_schema=found, to_schema=SCHEMA_VERSION, seconds=seconds)


def _migrate(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_STATEMENTS:
        conn.execute(statement)
    for table, name, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if name not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
    for statement in _ADDED_INDEXES:
        conn.execute(statement)


def connect(
    path: Path,
    *,
    synchronous: str = "full",
    create: bool = True,
    read_only: bool = False,
    writer: bool = False,
    busy_ms: int = BUSY_TIMEOUT_MS,
) -> sqlite3.Connection:
    """
    Open the journal file in WAL mode, with ``busy_timeout`` so writers wait their turn.
    ``writer``: the daemon's writer connection, whose temporary files stay in memory.
    ``busy_ms``: how long opening waits for another process's write lock (then
    ``BUSY_TIMEOUT_MS`` again).

    Raises:
        JournalCorrupt: the file is not a readable SQLite database.
        JournalError: it cannot be written (``create``), or a newer build wrote it.
        sqlite3.Error: anything else (permissions, a full disk).
    """
    if create:
        # Every event is in it (and what a provider sent with it): its owner's alone. A
        # new file only; SQLite gives its WAL and shared-memory files the same mode.
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise JournalError(f"the journal {path} cannot be created: {exc}") from exc
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=busy_ms / 1000, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        if create:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # Reading the schema proves the file is a database before the first query.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        schema_version(conn)
        if not read_only:
            migrate(conn)
        if read_only:
            conn.execute("PRAGMA query_only=1")
        if writer:
            # Statement journals (and the temp table retention uses) in memory: a
            # multi-row insert's undo record outgrows SQLite's 64 KiB and went to a temp
            # file, a third of the bytes the writer wrote on the soak's 1 GiB journal.
            conn.execute("PRAGMA temp_store=MEMORY")
            # SQLite opens a file it may not write read-only, quietly: a daemon that
            # could not journal anything started and said it was ready.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM cursors WHERE 0")
            finally:
                conn.execute("ROLLBACK")
        if busy_ms != BUSY_TIMEOUT_MS:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    except JournalError as exc:  # (a newer build's file)
        conn.close()
        raise JournalError(f"the journal {path} {exc}") from exc
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_corrupt(exc):
            raise JournalCorrupt(path, str(exc)) from exc
        if error_code(exc) == sqlite3.SQLITE_READONLY:
            raise JournalError(
                f"the journal {path} cannot be written ({exc}); check its permissions,"
                " attributes and file system"
            ) from exc
        raise
    return conn
