"""
Retention's statements on the writer connection: where the rows due for pruning end
(:func:`retention_bound`), the deletion of one batch of them (:func:`prune_batch`), and
of one batch of expired tombstones (:func:`prune_tombstones`).
:class:`listener.journal.upkeep.Upkeep` runs them between commits, sized by how long
each took.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

__all__ = ["Moments", "prune_batch", "prune_published", "prune_tombstones", "retention_bound"]


@dataclass(frozen=True, slots=True)
class Moments:
    """A retention round's times (epoch seconds)."""

    now: float  # when the round began: its tombstones' ``pruned_at``
    cutoff: float  # events published before it go (``now - retention``)
    expired: float  # ids received or pruned before it are forgotten (``now - dedupe_window``)


def retention_bound(conn: sqlite3.Connection, cutoff: float, now: float) -> int:
    """
    The first seq received at or after ``cutoff`` (one past the last row if none), by
    binary search: receipt times rise with seq, near enough. A row published before
    ``cutoff`` was received before it, so retention reads only the rows below this
    seq; its last batch used to scan the whole table for more (days of events, the
    writer held meanwhile). A row received out of order past it waits a round; one
    stamped after ``now`` (the clock was set back since) counts as old, so it cannot
    hold retention back until that time.
    """
    # Two statements: SQLite reads one end of the rowid b-tree for a lone MIN or MAX,
    # but scans a whole index for the pair.
    (low,) = conn.execute("SELECT MIN(seq) FROM events").fetchone()
    (high,) = conn.execute("SELECT MAX(seq) FROM events").fetchone()
    if low is None:
        return 0
    high += 1
    while low < high:
        mid = (low + high) // 2
        row = conn.execute(
            "SELECT seq, received_at FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
        ).fetchone()
        if row is None or cutoff <= row[1] <= now:
            high = mid
        else:
            low = row[0] + 1
    return int(low)


def prune_batch(conn: sqlite3.Connection, at: Moments, bound: int, batch: int) -> int:
    """
    Delete up to ``batch`` published events older than ``at.cutoff`` below seq ``bound``
    (:func:`retention_bound`) in one transaction, keeping as tombstones the ids received
    since ``at.expired`` (still within ``dedupe_window``); return how many went.

    An id received before ``at.expired`` gets none: nothing needs it as a duplicate any
    more, and writing then forgetting a tombstone is about two thirds of retention's
    cost per row (``bench/retention.py``; with ``dedupe_window`` equal to
    ``retention``, no row gets one).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (seq INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM doomed")
        conn.execute(
            "INSERT INTO doomed SELECT seq FROM events WHERE seq < ? AND status = 1"
            " AND kind = 'event' AND published_at < ? ORDER BY seq LIMIT ?",
            (bound, at.cutoff, batch),
        )
        conn.execute(
            "INSERT OR REPLACE INTO tombstones (source, event_id, pruned_at)"
            " SELECT source, event_id, ? FROM events WHERE seq IN (SELECT seq FROM doomed)"
            " AND received_at >= ?",
            (at.now, at.expired),
        )
        deleted = conn.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM doomed)").rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(deleted)


def prune_tombstones(conn: sqlite3.Connection, cutoff: float, batch: int) -> int:
    """
    Forget up to ``batch`` ids pruned before ``cutoff`` (older than ``dedupe_window``),
    found through ``tombstones_pruned``; return how many went. (One statement over the
    whole table scanned every tombstone each round and deleted a minute's worth of
    them in one transaction, the writer waiting meanwhile.)
    """
    return int(
        conn.execute(
            "DELETE FROM tombstones WHERE (source, event_id) IN (SELECT source, event_id"
            " FROM tombstones WHERE pruned_at < ? ORDER BY pruned_at LIMIT ?)",
            (cutoff, batch),
        ).rowcount
    )


def prune_published(conn: sqlite3.Connection, batch: int) -> int:
    """
    Delete the oldest ``batch`` published events whatever their age, leaving no
    tombstones: room made when the journal nears ``max_size`` (local replay's copies go
    before intake stops). Unpublished, deferred and quarantine rows are never touched.
    """
    return int(
        conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 1"
            " AND kind = 'event' ORDER BY seq LIMIT ?)",
            (batch,),
        ).rowcount
    )
