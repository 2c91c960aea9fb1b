"""
What the publisher sends next, in ``seq`` order, without reading back what it was just
handed.

While a publish session is on (from a :class:`Backlog`'s making to its
:meth:`~Backlog.close`), the journal keeps the rows this process appends, as they
commit, in :attr:`listener.journal.Journal.fresh`. The publisher takes them from there
while their seqs follow on from the last one it took; where one is missing it reads
the file (``status = 0 AND seq > after``), which covers the first rows after a start,
rows appended between sessions (the broker away or blocking: the journal keeps none
then, so an outage does not leave the process holding a full handoff's memory), rows
another process added (``listener quarantine redrive``), and rows that fell off the
bounded handoff. With nothing of its own
in hand it still looks at the file once every ``rescan`` seconds, for other
processes' rows.

Why skipping ahead is safe: seqs are allocated inside the write transaction, so
commit order is seq order, and a row in the handoff was committed before a read that
starts after it is taken: when that read finds nothing pending below the handoff's
first seq, nothing below it will ever be pending (rows never return to pending).
"""

from __future__ import annotations

import collections
import math
import time

from listener.journal import Journal, StoredEntry

__all__ = ["Backlog"]

# Seconds between reads of the file while the handoff has nothing (other processes' rows).
RESCAN = 1.0


class Backlog:
    """
    One publish session's queue of entries to send (see the module docstring). The
    journal keeps the handoff from when this is made until :meth:`close`.
    """

    def __init__(self, journal: Journal, *, rescan: float = RESCAN) -> None:
        self._journal = journal
        journal.hand_off(True)
        self._rescan = rescan
        self._after = 0
        self._read_at = -math.inf
        #: Taken and not yet sent, oldest first.
        self.items: collections.deque[StoredEntry] = collections.deque()
        #: Reads of the file so far (tests, benchmarks).
        self.reads = 0

    def close(self) -> None:
        """The session is over: the journal stops keeping rows for it and drops those held."""
        self._journal.hand_off(False)

    def __len__(self) -> int:
        return len(self.items)

    async def fill(self, limit: int) -> None:
        """Take up to ``limit`` more entries: from the handoff, or from the file."""
        fresh = self._journal.fresh
        after = self._after
        while fresh and fresh[0].seq <= after:
            fresh.popleft()
        if fresh and fresh[0].seq == after + 1:
            items = self.items
            while fresh and len(items) < limit and fresh[0].seq == after + 1:
                stored = fresh.popleft()
                items.append(stored)
                after = stored.seq
            self._after = after
            return
        if not fresh and time.monotonic() - self._read_at < self._rescan:
            return  # read to its end a moment ago, and nothing new of ours since
        horizon = fresh[0].seq if fresh else None  # committed before the read below starts
        self.reads += 1
        rows = await self._journal.pending(after_seq=after, limit=limit)
        if rows:
            self.items.extend(rows)
            self._after = rows[-1].seq
        if len(rows) < limit:  # read to the end: nothing below the handoff is pending
            self._read_at = time.monotonic()
            if horizon is not None:
                self._after = max(self._after, horizon - 1)
        # What the read took leaves the handoff now, not at the next fill: a row left
        # there could be published and marked, and taken again by the next session.
        while fresh and fresh[0].seq <= self._after:
            fresh.popleft()
        if len(rows) == limit and fresh and fresh[0].seq != self._after + 1:
            # Still behind (a backlog drains): the handoff's rows follow rows not read
            # yet, and the reads will reach them. Held meanwhile, they would be up to
            # FRESH_MAX more entries in memory at the drain's peak, beside the thousands
            # in flight: a high-water mark that Python's allocator partly keeps.
            fresh.clear()
