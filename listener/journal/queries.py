"""
Every read and write of the journal outside the daemon's store: the admin API,
replay, the quarantine commands and redrive. Typed rows in, typed rows out; the
callers hold no SQL.

A :class:`Reader` is the daemon's :class:`~listener.journal.store.Journal` (its own
query thread, never the publisher's) or a :class:`~listener.journal.file.JournalFile`
(the commands other than ``run``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from listener.envelope import Entry, rfc3339
from listener.journal.schema import COLUMNS, Status, StoredEntry, row_to_entry
from listener.selection import EventFilter

__all__ = [
    "MAX_OFFSET",
    "EventPage",
    "QuarantinedRow",
    "Reader",
    "SelectedEvents",
    "Writer",
    "events_page",
    "journal_outcomes",
    "last_seq",
    "list_quarantined",
    "mark_published",
    "missing_quarantine_ids",
    "pending_rows",
    "purge_quarantine",
    "quarantine_rows",
    "record_redrive",
    "replay_page",
    "select_events",
    "split_journaled",
]

#: Deepest ``offset`` served; past it, page with ``after`` (a seq), which costs nothing.
MAX_OFFSET = 10_000
_EVENT_COLUMNS = f"{COLUMNS}, status, published_at"
_ROW_COLUMNS = "seq, source, event_id, body, received_at, reason, detail, status"
_LABELS = {
    Status.PENDING: "pending",
    Status.PUBLISHED: "published",
    Status.REDRIVEN: "redriven",
    Status.DEFERRED: "deferred",
}
_QUARANTINE_LABELS = {
    Status.PENDING: "pending",
    Status.PUBLISHED: "quarantined",
    Status.REDRIVEN: "redriven",
    Status.DEFERRED: "deferred",
}


class Reader(Protocol):
    """Read access to the journal."""

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query."""
        ...


class Writer(Reader, Protocol):
    """Read and short-transaction write access (a writable ``JournalFile``)."""

    async def write(self, fn: Any) -> Any:
        """Run ``fn(connection)`` in one short ``BEGIN IMMEDIATE`` transaction."""
        ...


def _iso(moment: float | None) -> str | None:
    return rfc3339(datetime.fromtimestamp(moment, UTC)) if moment is not None else None


# -- selections of published events ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelectedEvents:
    """A ``WHERE`` clause for ``events`` with its arguments, and what it selects by type."""

    where: str
    args: tuple[Any, ...]
    by_type: dict[str, int]

    @property
    def total(self) -> int:
        """How many rows the clause selects."""
        return sum(self.by_type.values())


async def select_events(
    reader: Reader, selection: EventFilter, *, published_up_to: int | None = None
) -> SelectedEvents:
    """
    Build the clause selecting journaled events (``kind = 'event'``) by ``selection``
    (and, for a replay, published ones up to seq ``published_up_to``).

    Counts the candidates by type first (one grouped scan: there are few types), keeps
    the types the pattern matches, and selects ``routing_key IN (...)``, so pages and
    totals are exact without a pattern-matching function inside SQLite.
    """
    where = ["kind = 'event'"]
    values: list[Any] = []
    if published_up_to is not None:
        where.append("status = 1 AND seq <= ?")
        values.append(published_up_to)
    if selection.source is not None:
        where.append("source = ?")
        values.append(selection.source)
    if selection.since is not None:
        where.append("time >= ?")
        values.append(selection.since)
    if selection.until is not None:
        where.append("time < ?")
        values.append(selection.until)
    clause = " AND ".join(where)
    rows = await reader.query(
        f"SELECT routing_key, count(*) FROM events WHERE {clause} GROUP BY routing_key",  # noqa: S608 - constant fragments, values are ? arguments
        values,
    )
    by_type = {str(key): int(count) for key, count in rows}
    types = selection.types
    if types is not None:
        by_type = {key: count for key, count in by_type.items() if types.matches(key)}
        if by_type:
            clause += f" AND routing_key IN ({','.join('?' * len(by_type))})"
            values.extend(by_type)
        else:
            clause += " AND 0"
    return SelectedEvents(where=clause, args=tuple(values), by_type=by_type)


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of ``/v1/events``: the rows as JSON views, and the seq to page after."""

    data: list[dict[str, Any]]
    next_after: int | None


def _event_view(row: Sequence[Any]) -> dict[str, Any]:
    seq, source, event_id, _, routing_key, body, moment, received_at, _, _, status, published = row
    return {
        "seq": seq,
        "id": event_id,
        "source": source,
        "type": routing_key,
        "time": _iso(moment),
        "received_at": _iso(received_at),
        "status": _LABELS.get(status, str(status)),
        "published_at": _iso(published),
        # The stored body is the CloudEvent exactly as published: embed it unparsed.
        "event": orjson.Fragment(bytes(body)),
    }


async def events_page(
    reader: Reader, selected: SelectedEvents, *, limit: int, offset: int, after: int | None
) -> EventPage:
    """
    A page of selected events, oldest first: ``after`` a seq (keyset: as cheap deep in
    the journal as at its start), or at ``offset`` (at most :data:`MAX_OFFSET`).
    """
    if not limit:
        return EventPage([], None)
    clause, args = selected.where, list(selected.args)
    if after is not None:
        clause += " AND seq > ?"
        args.append(after)
        offset = 0
    rows = await reader.query(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE {clause} ORDER BY seq LIMIT ? OFFSET ?",  # noqa: S608 - constant fragments, ? arguments
        (*args, limit, offset),
    )
    return EventPage([_event_view(r) for r in rows], rows[-1][0] if len(rows) == limit else None)


async def last_seq(reader: Reader) -> int:
    """The highest seq in the journal now (0 when empty)."""
    ((seq,),) = await reader.query("SELECT coalesce(max(seq), 0) FROM events")
    return int(seq)


async def replay_page(
    reader: Reader, selected: SelectedEvents, *, after: int, limit: int
) -> list[StoredEntry]:
    """The next ``limit`` selected events after seq ``after``."""
    rows = await reader.query(
        f"SELECT {COLUMNS} FROM events WHERE {selected.where} AND seq > ?"  # noqa: S608 - constant fragments, ? arguments
        " ORDER BY seq LIMIT ?",
        (*selected.args, after, limit),
    )
    return [row_to_entry(r, Status.PUBLISHED) for r in rows]


# -- quarantine ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    """A quarantine row of the journal."""

    seq: int
    id: str
    source: str
    body: bytes
    received_at: float
    reason: str
    detail: str
    status: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> QuarantinedRow:
        seq, source, event_id, body, received_at, reason, detail, status = row
        return cls(
            seq, event_id, source, bytes(body), received_at, reason or "", detail or "", status
        )

    @property
    def received(self) -> str:
        """The received time, RFC 3339."""
        return rfc3339(datetime.fromtimestamp(self.received_at, UTC))

    def as_dict(self, *, payload_max: int = 4096) -> dict[str, Any]:
        """The JSON view: the payload as text, cut at ``payload_max`` characters."""
        text = self.body.decode("utf-8", errors="replace")
        return {
            "id": self.id,
            "seq": self.seq,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "received_at": self.received,
            "status": _QUARANTINE_LABELS.get(Status(self.status), str(self.status)),
            "size": len(self.body),
            "payload": text[:payload_max],
            "payload_truncated": len(text) > payload_max,
        }


async def list_quarantined(
    reader: Reader,
    *,
    limit: int,
    offset: int = 0,
    reason: str | None = None,
    source: str | None = None,
) -> tuple[list[QuarantinedRow], int]:
    """What is still quarantined (not redriven), oldest first, and how many in all."""
    where = "kind = 'quarantine' AND status != ?"
    args: list[Any] = [Status.REDRIVEN]
    if reason is not None:
        where += " AND reason = ?"
        args.append(reason)
    if source is not None:
        where += " AND source = ?"
        args.append(source)
    ((total,),) = await reader.query(f"SELECT count(*) FROM events WHERE {where}", args)  # noqa: S608 - constant fragments
    rows = await reader.query(
        f"SELECT {_ROW_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ? OFFSET ?",  # noqa: S608 - constant fragments
        [*args, limit, offset],
    )
    return [QuarantinedRow.from_row(r) for r in rows], int(total)


async def missing_quarantine_ids(reader: Reader, ids: Sequence[str]) -> list[str]:
    """Which of ``ids`` are no quarantine row of the journal."""
    marks = ",".join("?" * len(ids))
    found = await reader.query(
        f"SELECT event_id FROM events WHERE kind = 'quarantine' AND event_id IN ({marks})",  # noqa: S608 - placeholders only
        list(ids),
    )
    return sorted(set(ids) - {str(r[0]) for r in found})


async def quarantine_rows(
    reader: Reader, *, after: int, limit: int, ids: Sequence[str] = ()
) -> list[QuarantinedRow]:
    """Quarantine rows not yet redriven, after seq ``after`` (all, or those with ``ids``)."""
    where = "kind = 'quarantine' AND status != ? AND seq > ?"
    args: list[Any] = [Status.REDRIVEN, after]
    if ids:
        where += f" AND event_id IN ({','.join('?' * len(ids))})"
        args.extend(ids)
    rows = await reader.query(
        f"SELECT {_ROW_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ?",  # noqa: S608 - constant fragments
        [*args, limit],
    )
    return [QuarantinedRow.from_row(r) for r in rows]


async def split_journaled(reader: Reader, entries: Sequence[Entry]) -> tuple[list[int], list[int]]:
    """Indexes of ``entries`` not yet in the journal, and of those already there (or twice)."""
    if not entries:
        return [], []
    pairs = [(e.source, e.event_id) for e in entries]
    values = ",".join("(?, ?)" for _ in pairs)
    found = await reader.query(
        f"SELECT source, event_id FROM events WHERE (source, event_id) IN (VALUES {values})"  # noqa: S608 - placeholders only
        " UNION SELECT source, event_id FROM tombstones"
        f" WHERE (source, event_id) IN (VALUES {values})",
        [v for pair in pairs for v in pair] * 2,
    )
    seen = {(str(source), str(event_id)) for source, event_id in found}
    fresh: list[int] = []
    known: list[int] = []
    for index, key in enumerate(pairs):
        (known if key in seen else fresh).append(index)
        seen.add(key)
    return fresh, known


def record_redrive(
    conn: sqlite3.Connection,
    *,
    fresh: Sequence[tuple[int, Entry]],
    duplicates: Sequence[int],
    failing: Sequence[tuple[int, str, str]],
) -> list[int | None]:
    """
    In one transaction: journal each fresh event as pending (the daemon's order:
    journal first, publish after), mark its quarantine row (and those whose event was
    already journaled) redriven, and give still-failing rows their new reason.

    Args:
        fresh: ``(quarantine seq, new entry)``.
        duplicates: quarantine seqs whose event the journal holds already.
        failing: ``(quarantine seq, reason, detail)``.

    Returns:
        The seq of each of ``fresh``'s new pending events, in its order; ``None`` for
        one the journal took meanwhile (the daemon journaled the same id since).
    """
    now = time.time()
    seqs: list[int | None] = []
    for _, e in fresh:
        cur = conn.execute(
            "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at)"
            " VALUES (?, ?, 'event', ?, ?, ?, ?) ON CONFLICT (source, event_id) DO NOTHING"
            " RETURNING seq",
            (e.source, e.event_id, e.routing_key, e.body, e.time, e.received_at),
        )
        row = cur.fetchone()
        seqs.append(None if row is None else int(row[0]))
    conn.executemany(
        "UPDATE events SET status = ?, published_at = ? WHERE seq = ?",
        [(Status.REDRIVEN, now, seq) for seq in [*(q for q, _ in fresh), *duplicates]],
    )
    conn.executemany(
        "UPDATE events SET reason = ?, detail = ? WHERE seq = ?",
        [(reason, detail[:1000], seq) for seq, reason, detail in failing],
    )
    return seqs


def mark_published(conn: sqlite3.Connection, seqs: Sequence[int]) -> int:
    """Mark pending rows published (a command that published them itself)."""
    now = time.time()
    conn.executemany(
        "UPDATE events SET status = 1, published_at = ? WHERE seq = ? AND status = 0",
        [(now, seq) for seq in seqs],
    )
    return len(seqs)


async def pending_rows(reader: Reader, seqs: Sequence[int]) -> list[StoredEntry]:
    """The given rows, if still pending."""
    if not seqs:
        return []
    marks = ",".join("?" * len(seqs))
    rows = await reader.query(
        f"SELECT {COLUMNS} FROM events WHERE status = 0 AND seq IN ({marks}) ORDER BY seq",  # noqa: S608 - placeholders only
        list(seqs),
    )
    return [row_to_entry(r) for r in rows]


def journal_outcomes(path: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(source, event id) → (kind, status) of every row, read-only (after a run)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT source, event_id, kind, status FROM events").fetchall()
    return {(source, event): (kind, status) for source, event, kind, status in rows}


_PURGE = (
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE kind = 'quarantine'"
    " AND status IN (1, 2) AND received_at < ? ORDER BY seq LIMIT ?)"
)


async def purge_quarantine(journal: Writer, *, before: float, batch: int = 500) -> int:
    """
    Delete quarantine rows received before ``before``, ``batch`` per transaction.

    Rows not yet sent to the quarantine exchange are kept (the daemon still owes them).
    """
    total = 0
    while True:
        deleted: int = await journal.write(
            lambda conn: conn.execute(_PURGE, (before, batch)).rowcount
        )
        total += deleted
        if deleted < batch:
            return total
