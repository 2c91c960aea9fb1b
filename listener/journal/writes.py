"""
The journal's writes, as operations on one SQLite connection (the daemon's writer
thread runs them; :mod:`listener.journal.store` queues and group-commits them).

:func:`commit` runs a batch of operations in one transaction; an operation that fails
is rolled back alone (a ``SAVEPOINT`` each, taken only when one has failed) and reports
its error, the others commit (STYLE: "one bad operation never rolls back its neighbours").
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from listener.envelope import Entry
from listener.journal.schema import Cursor, Status, error_code

__all__ = [
    "Append",
    "Defer",
    "Mark",
    "Op",
    "PollWrite",
    "body_bytes",
    "commit",
    "count_open",
    "measure_size",
    "retry_now",
]

_INSERT = (
    "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at,"
    " reason, detail) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"
    " WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE source = ? AND event_id = ?)"
    " ON CONFLICT (source, event_id) DO NOTHING"
)
# Many rows in one statement (_insert_all): the ones a tombstone names are left out.
_INSERT_ROWS = (
    "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at,"
    " reason, detail) SELECT * FROM (VALUES {values}) AS v WHERE NOT EXISTS"
    " (SELECT 1 FROM tombstones t WHERE t.source = v.column1 AND t.event_id = v.column2)"
    " ON CONFLICT (source, event_id) DO NOTHING"
)
# 9 parameters a row (SQLite's oldest limit: 999). 1-8 rows, else 16, 32 or 64 each, so
# the statement cache holds 11 shapes, not one per batch size (those took up to 6.3 MiB).
_INSERTS = {
    n: _INSERT_ROWS.format(values=",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n))
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)
}
# The inserted rows' (source, event_id) in seq order, each length-prefixed.
_ORDER_CHECK = (
    "SELECT group_concat(length(source) || ':' || source || length(event_id) || ':' || event_id,"
    " '') FROM (SELECT source, event_id FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq)"
)
_CURSOR_SET = "UPDATE cursors SET seq = ?, updated_at = ? WHERE source = ? AND key = ? AND seq = ?"
_CURSOR_NEW = (
    "INSERT INTO cursors (source, key, seq, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (source, key) DO NOTHING"
)
# One statement per run of consecutive seqs (confirms come mostly in seq order).
_MARK = "UPDATE events SET status = 1, published_at = ? WHERE seq BETWEEN ? AND ? AND status = ?"
# Retry after base * 2^attempts seconds, capped (the old attempts: SET reads old values).
_DEFER = (
    "UPDATE events SET status = 3, attempts = attempts + 1,"
    " retry_at = ? + min(?, ? * (1 << min(attempts, 20))), error = ?"
    " WHERE seq = ? AND status IN (0, 3)"
)
_POLL_STATE = (
    "INSERT INTO poll_state (source, key, hash, content, updated_at, changes)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source, key) DO UPDATE SET hash = excluded.hash,"
    " content = excluded.content, updated_at = excluded.updated_at, changes = excluded.changes"
)
_POLLED = (
    "INSERT INTO poll_resources (source, resource, polled_at, primed_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (source, resource) DO UPDATE SET polled_at = excluded.polled_at"
)
_POLL_ALIAS = (
    "INSERT INTO poll_aliases (source, item, current, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (source, item) DO UPDATE SET current = excluded.current,"
    " updated_at = excluded.updated_at"
)


@dataclass(frozen=True, slots=True)
class PollWrite:
    """
    What a poll learned, written with the events it produced: the content (hash and
    canonical JSON) now seen per key, and renamed items.
    """

    source: str
    states: Sequence[tuple[str, str, bytes, int]] = ()  # (key, hash, content, changes)
    aliases: Sequence[tuple[str, str]] = ()  # (configured item, current id)
    #: (resource label, when it started) of a whole successful poll: the resource is
    #: primed (first sight is a change from now on), and its next poll is due an
    #: interval after that start, also after a restart.
    polled: tuple[str, float] | None = None
    #: Forget the state of keys last changed before this (Unix time): no poll asks
    #: for them any more (PollProvider.state_ttl).
    forget_before: float | None = None


@dataclass(slots=True)
class Append:
    entries: Sequence[Entry]
    cursors: Sequence[Cursor]
    done: asyncio.Future[list[bool]] | None
    poll: PollWrite | None = None
    queued: float = 0.0  # time.monotonic() when queued


@dataclass(slots=True)
class Mark:
    seqs: Sequence[int]
    at: float
    deferred: bool = False
    done: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Defer:
    seqs: Sequence[int]
    at: float
    base: float
    cap: float
    error: str
    done: asyncio.Future[None] | None = None


Op = Append | Mark | Defer


@dataclass(slots=True)
class Committed:
    """One transaction's outcome: per operation a result or its error, and the counts."""

    results: list[Any] = field(default_factory=list)
    pending: int = 0
    deferred: int = 0
    #: The rows this transaction added, ``(seq, entry)`` in seq order (the publisher's
    #: in-memory handoff, :attr:`listener.journal.store.Journal.fresh`).
    fresh: list[tuple[int, Entry]] = field(default_factory=list)


_OP_ERRORS = (sqlite3.Error, OverflowError, ValueError, TypeError)


class _OneFailed(Exception):
    """An operation of the fast path failed: redo the batch a savepoint each."""


# The database's failures, not an operation's: the whole batch fails, and the journal
# reports an error (before, a read-only file failed each append alone while /readyz
# said the journal was ok).
_WHOLE = {
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_CANTOPEN,
}


def _one_failed(exc: Exception) -> _OneFailed:
    """``exc`` as one operation's failure, or raised as it is when it is the database's."""
    if isinstance(exc, sqlite3.Error) and error_code(exc) in _WHOLE:
        raise exc
    return _OneFailed()


class _RowByRow(Exception):
    """Not every event of the batch is new: redo it a row at a time."""


def commit(conn: sqlite3.Connection, ops: Sequence[Op]) -> Committed:
    """
    Run ``ops`` in one transaction; one that fails is undone alone.

    The common case pays nothing for that: the batch runs as it is, its events inserted
    by a few statements (:func:`_insert_all`), and only when an event is not new does
    the batch run again a row at a time, and only when an operation fails is the
    transaction rolled back and run again with a ``SAVEPOINT`` around each operation.

    Raises:
        sqlite3.Error: the transaction itself failed (nothing was committed).
    """
    try:
        return _run(conn, ops, savepoints=False, together=True)
    except _RowByRow:
        pass
    except _OneFailed:
        return _run(conn, ops, savepoints=True)
    try:
        return _run(conn, ops, savepoints=False)
    except _OneFailed:
        return _run(conn, ops, savepoints=True)


def _run(
    conn: sqlite3.Connection, ops: Sequence[Op], *, savepoints: bool, together: bool = False
) -> Committed:
    out = Committed()
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        seqs: Iterator[int] | None = None
        if together:
            try:
                seqs = iter(
                    _insert_all(
                        cur, [e for op in ops if isinstance(op, Append) for e in op.entries]
                    )
                )
            except _OP_ERRORS as exc:
                raise _one_failed(exc) from exc
        for op in ops:
            if not savepoints:
                try:
                    result, pending, deferred = _apply(cur, op, out.fresh, seqs)
                except _OP_ERRORS as exc:
                    raise _one_failed(exc) from exc
            else:
                cur.execute("SAVEPOINT op")
                mark = len(out.fresh)
                try:
                    result, pending, deferred = _apply(cur, op, out.fresh)
                except _OP_ERRORS as exc:
                    # This operation alone is undone; the transaction goes on. If SQLite
                    # already rolled the whole transaction back (a full disk), ROLLBACK
                    # TO fails and the whole batch fails.
                    _one_failed(exc)
                    cur.execute("ROLLBACK TO op")
                    cur.execute("RELEASE op")
                    del out.fresh[mark:]
                    out.results.append(exc)
                    continue
                cur.execute("RELEASE op")
            out.results.append(result)
            out.pending += pending
            out.deferred += deferred
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


def _row(e: Entry) -> tuple[Any, ...]:
    """An entry's values in the order of the events columns the inserts name."""
    return (
        e.source,
        e.event_id,
        e.kind,
        e.routing_key,
        e.body,
        e.time,
        e.received_at,
        e.reason,
        e.detail,
    )


def _insert_all(cur: sqlite3.Cursor, entries: Sequence[Entry]) -> range:
    """
    Insert every one of ``entries`` in a few statements; return their seqs, in order.

    Each statement the writer thread runs gives up Python's lock while SQLite works and must win
    it back from the busy event loop (up to ``sys.getswitchinterval()``, 5 ms, each time):
    thirty one-row statements made a commit ten times slower than one of thirty rows. The seqs
    are consecutive (one writer, AUTOINCREMENT); that they follow the entries' order is checked.

    Raises:
        _RowByRow: one of them is not new (a duplicate, or pruned within the dedupe
            window), or the order check failed: the caller undoes this and goes row by
            row (the common path pays one statement for the check).
    """
    if not entries:
        return range(0)
    added = start = 0
    while start < len(entries):
        size = max(n for n in _INSERTS if n <= len(entries) - start)  # the largest that fits
        chunk, start = entries[start : start + size], start + size
        params = [value for e in chunk for value in _row(e)]
        added += cur.execute(_INSERTS[size], params).rowcount
    if added != len(entries) or cur.lastrowid is None:
        raise _RowByRow
    seqs = range(cur.lastrowid - added + 1, cur.lastrowid + 1)
    ((stored,),) = cur.execute(_ORDER_CHECK, (seqs[0], seqs[-1])).fetchall()
    expected = "".join(f"{len(e.source)}:{e.source}{len(e.event_id)}:{e.event_id}" for e in entries)
    if stored != expected:
        raise _RowByRow
    return seqs


def _apply(
    cur: sqlite3.Cursor,
    op: Op,
    fresh: list[tuple[int, Entry]],
    inserted: Iterator[int] | None = None,
) -> tuple[Any, int, int]:
    """
    Run one operation; return its result and how it moves (pending, deferred); the
    rows an append adds go to ``fresh``. ``inserted``: the appends' events are in
    already (:func:`_insert_all`), these are their seqs.
    """
    if isinstance(op, Append):
        flags = []
        for e in op.entries if inserted is None else ():
            cur.execute(_INSERT, (*_row(e), e.source, e.event_id))
            added = cur.rowcount == 1
            flags.append(added)
            if added:
                fresh.append((cur.lastrowid or 0, e))
        if inserted is not None:
            for e in op.entries:
                fresh.append((next(inserted), e))
                flags.append(True)
        now = time.time()
        for c in op.cursors:
            if c.prev is None:
                cur.execute(_CURSOR_NEW, (c.source, c.key, c.seq, now))
            else:
                cur.execute(_CURSOR_SET, (c.seq, now, c.source, c.key, c.prev))
        if op.poll is not None:
            source = op.poll.source
            cur.executemany(
                _POLL_STATE, ((source, k, h, c, now, n) for k, h, c, n in op.poll.states)
            )
            cur.executemany(_POLL_ALIAS, ((source, i, c, now) for i, c in op.poll.aliases))
            if op.poll.polled is not None:
                cur.execute(_POLLED, (source, *op.poll.polled, now))
            if op.poll.forget_before is not None:
                cur.execute(
                    "DELETE FROM poll_state WHERE source = ? AND updated_at < ?",
                    (source, op.poll.forget_before),
                )
        return flags, sum(flags), 0
    if isinstance(op, Mark):
        status = Status.DEFERRED if op.deferred else Status.PENDING
        marked = 0
        for first, last in _runs(op.seqs):
            marked += cur.execute(_MARK, (op.at, first, last, status)).rowcount
        return None, (0 if op.deferred else -marked), (-marked if op.deferred else 0)
    # Defer: from pending (a first return) or deferred (a retry returned again).
    placeholders = ",".join("?" * len(op.seqs))
    ((from_pending,),) = cur.execute(
        f"SELECT count(*) FROM events WHERE status = 0 AND seq IN ({placeholders})",  # noqa: S608 - placeholders only
        tuple(op.seqs),
    ).fetchall()
    cur.executemany(_DEFER, ((op.at, op.cap, op.base, op.error, seq) for seq in op.seqs))
    return None, -from_pending, from_pending


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """``seqs`` as runs of consecutive numbers, ``(first, last)`` each."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def measure_size(conn: sqlite3.Connection) -> int:
    """Bytes of the database in use (pages minus free pages)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def count_open(conn: sqlite3.Connection) -> tuple[int, int]:
    """(pending, deferred) rows, each counted in its partial index (one statement for
    both read the whole table: it runs every maintenance round, the writer held)."""
    ((pending,),) = conn.execute("SELECT count(*) FROM events WHERE status = 0").fetchall()
    ((deferred,),) = conn.execute("SELECT count(*) FROM events WHERE status = 3").fetchall()
    return int(pending), int(deferred)


def retry_now(conn: sqlite3.Connection, routing_keys: Sequence[str]) -> None:
    """Make every deferred row of these routing keys due now."""
    marks = ",".join("?" * len(routing_keys))
    conn.execute(
        f"UPDATE events SET retry_at = 0 WHERE status = 3 AND routing_key IN ({marks})",  # noqa: S608 - placeholders only
        tuple(routing_keys),
    )


def body_bytes(ops: Sequence[Op]) -> int:
    """Bytes of the event bodies the appends among ``ops`` carry."""
    # (a body that is not bytes fails its own operation in commit(), not this sum)
    return sum(
        len(e.body)
        for op in ops
        if isinstance(op, Append)
        for e in op.entries
        if isinstance(e.body, bytes)
    )
