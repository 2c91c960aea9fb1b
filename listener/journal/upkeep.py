"""
The journal's upkeep, a mixin of :class:`listener.journal.store.Journal`: deferred rows
made due again, the counts taken again, retention. Each runs on the writer thread
between commits (:meth:`~listener.journal.checkpoints.Checkpoints._on_writer`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from listener.config import JournalConfig
from listener.journal.checkpoints import Checkpoints
from listener.journal.retention import (
    Moments,
    prune_batch,
    prune_published,
    prune_tombstones,
    retention_bound,
)
from listener.journal.writes import count_open, measure_size, retry_now

__all__ = ["Stats", "Upkeep"]

# Making room (Upkeep.make_room) starts above this share of journal.max_size and stops
# below the next.
ROOM_HIGH, ROOM_LOW = 0.9, 0.8

# Retention deletes in transactions of up to ``batch`` rows, halved while one holds the
# writer longer than PRUNE_SLOW (a busy host: appends wait meanwhile), down to PRUNE_MIN,
# and doubled again while under half that. A round that has run PRUNE_PATIENCE is behind:
# small transactions on a saturated host (each waits for the GIL between statements)
# deleted fewer rows a second than arrived, and the journal grew without bound. From
# then on each may hold the writer up to PRUNE_BEHIND_SLOW, with up to PRUNE_MAX rows.
# For its first PRUNE_SPREAD seconds a round rests PRUNE_REST times as long as each
# transaction took before the next: back to back, a minute's rows (150,000 in the soak)
# kept the writer 70% busy for 3.5 s, the commits queued behind them, and the journal
# wait p99 of that minute went from 4 to 20 ms (9 ms with the rest).
PRUNE_SLOW = 0.005
PRUNE_MIN = 100
PRUNE_REST = 7.0
PRUNE_SPREAD = 30.0
PRUNE_PATIENCE = 45.0
PRUNE_BEHIND_SLOW = 0.05
PRUNE_MAX = 2000


@dataclass(slots=True)
class Stats:
    """The journal's counts, kept up to date by each commit."""

    pending: int = 0
    deferred: int = 0
    size: int = 0
    size_checked: float = 0.0
    commits: int = 0


class Upkeep(Checkpoints):
    """Maintenance of the journal file (see the module docstring)."""

    _config: JournalConfig
    _stats: Stats

    @property
    def pending_count(self) -> int:
        """Entries waiting for their first confirm (status pending)."""
        return self._stats.pending

    @property
    def deferred_count(self) -> int:
        """Entries the broker returned or nacked, waiting for their retry."""
        return self._stats.deferred

    @property
    def size_bytes(self) -> int:
        """Bytes of the database in use (pages minus free pages), sampled."""
        return self._stats.size

    def _update_capacity(self) -> None:
        raise NotImplementedError  # (the Journal's)

    def _measure_size(self) -> None:
        assert self._writer is not None  # opened first
        self._stats.size = measure_size(self._writer)

    async def retry_now(self, routing_keys: Sequence[str]) -> None:
        """
        Make every deferred entry of these routing keys due now: one of them was just
        confirmed, so the others are likely routable again too (a binding came back).
        """
        if routing_keys:
            assert self._writer is not None  # opened first
            await self._on_writer(retry_now, self._writer, routing_keys)

    async def recount(self) -> None:
        """
        Count pending and deferred rows again (on the writer's thread, between commits):
        a command on the same file (redrive) may have added some.
        """

        def count() -> None:
            assert self._writer is not None  # opened first
            self._stats.pending, self._stats.deferred = count_open(self._writer)

        await self._on_writer(count)
        self._update_capacity()

    # -- maintenance --------------------------------------------------------------

    async def _in_batches(
        self,
        fn: Callable[..., int],
        *args: object,
        batch: int,
        began: float,
        rest: float = PRUNE_REST,
    ) -> int:
        """
        Run ``fn(writer, *args, size)`` until it deletes fewer than ``size``, the size
        kept between :data:`PRUNE_MIN` and ``batch`` by how long each took (up to
        :data:`PRUNE_MAX` once the round, begun at monotonic ``began``, is behind), and
        for the round's first :data:`PRUNE_SPREAD` seconds a rest of ``rest`` times as long
        as each took before the next (none while the journal is at ``max_size``); the
        total.
        """
        total, size = 0, batch

        def timed(size: int) -> tuple[int, float]:
            start = time.perf_counter()
            return fn(self._writer, *args, size), time.perf_counter() - start

        while True:
            deleted, took = await self._on_writer(timed, size)
            total += deleted
            if deleted < size:
                return total
            running = time.monotonic() - began
            behind = running > PRUNE_PATIENCE
            slow, most = (
                (PRUNE_BEHIND_SLOW, max(batch, PRUNE_MAX)) if behind else (PRUNE_SLOW, batch)
            )
            if took > slow:
                size = max(size // 2, min(PRUNE_MIN, batch))
            elif took < slow / 2:
                size = min(size * 2, most)
            # A journal at max_size refuses appends until this round frees pages: no
            # commits to make way for. (Commits waiting for the writer go first anyway.)
            full = self._stats.size >= self._config.max_size
            await asyncio.sleep(took * rest if running < PRUNE_SPREAD and not full else 0)

    async def make_room(self, *, batch: int = 500) -> tuple[int, int]:
        """
        Above :data:`ROOM_HIGH` of ``journal.max_size``, free pages down to
        :data:`ROOM_LOW`, oldest first: the ids kept for ``dedupe_window``
        (tombstones), then published events still inside ``retention``. Both are copies
        for dedupe and local replay; never an unpublished row (if those fill the journal,
        intake is refused, 503, as before). Tombstones alone outgrew ``max_size`` within
        weeks at defaults (30 days of them at ~120 bytes each) and stopped all intake
        with nothing pending. Returns (ids forgotten, events pruned).
        """
        limit = self._config.max_size
        if self._stats.size < limit * ROOM_HIGH:
            return 0, 0
        low = limit * ROOM_LOW
        forgotten = await self._shrink(prune_tombstones, math.inf, low=low, batch=batch)
        pruned = 0
        if self._stats.size >= low:
            pruned = await self._shrink(prune_published, low=low, batch=batch)
        self._update_capacity()
        return forgotten, pruned

    async def _shrink(self, fn: Callable[..., int], *args: object, low: float, batch: int) -> int:
        """Run ``fn(writer, *args, batch)`` until it deletes less, or the size is under ``low``."""
        total = 0
        while True:
            deleted = await self._on_writer(fn, self._writer, *args, batch)
            await self._on_writer(self._measure_size)
            total += deleted
            if deleted < batch or self._stats.size < low:
                return total

    async def prune(
        self, *, now: float | None = None, batch: int = 500, rest: float = PRUNE_REST
    ) -> int:
        """
        Delete published events older than ``journal.retention``, ``batch`` rows per
        transaction so ingestion never waits long (more once the round is behind: see
        :data:`PRUNE_PATIENCE`), keeping as tombstones, for ``journal.dedupe_window``,
        the ids received within it (:func:`prune_batch`). Quarantined rows are kept.
        ``rest``: see :data:`PRUNE_REST` (the retention benchmark measures with none).
        """
        began = time.monotonic()
        moment = now if now is not None else time.time()
        at = Moments(
            now=moment,
            cutoff=moment - self._config.retention,
            expired=moment - self._config.dedupe_window,
        )
        bound = await self._on(self._read_thread, retention_bound, self._reader, at.cutoff, at.now)
        total = await self._in_batches(prune_batch, at, bound, batch=batch, began=began, rest=rest)
        await self._in_batches(prune_tombstones, at.expired, batch=batch, began=began, rest=rest)
        if total:
            # Deleted rows free pages: re-measure now, or a journal held over max_size
            # would wait for a commit that its own limit refuses.
            await self._on_writer(self._measure_size)
            self._update_capacity()
        return total
