"""
The journal's upkeep, a mixin of :class:`listener.journal.store.Journal`: deferred rows
made due again, the counts taken again, retention. Each runs on the writer thread
between commits (:meth:`~listener.journal.checkpoints.Checkpoints._on_writer`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from listener.config import JournalConfig
from listener.journal.checkpoints import Checkpoints
from listener.journal.writes import (
    count_open,
    prune_batch,
    prune_tombstones,
    retention_bound,
    retry_now,
)

__all__ = ["Stats", "Upkeep"]

# Retention deletes in transactions of up to ``batch`` rows, halved while one holds the
# writer longer than PRUNE_SLOW (a busy host: appends wait meanwhile), down to PRUNE_MIN,
# and doubled again while they are quick.
PRUNE_SLOW = 0.005
PRUNE_MIN = 100


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
        raise NotImplementedError  # (the Journal's)

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

    async def _in_batches(self, fn: Callable[..., int], *args: float, batch: int) -> int:
        """
        Run ``fn(writer, *args, size)`` until it deletes fewer than ``size``, the size
        kept between :data:`PRUNE_MIN` and ``batch`` by how long each took; the total.
        """
        total, size = 0, batch

        def timed(size: int) -> tuple[int, float]:
            began = time.perf_counter()
            return fn(self._writer, *args, size), time.perf_counter() - began

        while True:
            deleted, took = await self._on_writer(timed, size)
            total += deleted
            if deleted < size:
                return total
            if took > PRUNE_SLOW:
                size = max(size // 2, min(PRUNE_MIN, batch))
            elif took < PRUNE_SLOW / 4:
                size = min(size * 2, batch)
            await asyncio.sleep(0)  # (commits waiting for the writer go first)

    async def prune(self, *, now: float | None = None, batch: int = 500) -> int:
        """
        Delete published events older than ``journal.retention``, ``batch`` rows per
        transaction so ingestion never waits long, keeping their ids as tombstones for
        ``journal.dedupe_window``. Quarantined rows are kept.
        """
        moment = now if now is not None else time.time()
        cutoff = moment - self._config.retention
        bound = await self._on(self._read_thread, retention_bound, self._reader, cutoff, moment)
        total = await self._in_batches(prune_batch, cutoff, moment, bound, batch=batch)
        await self._in_batches(prune_tombstones, moment - self._config.dedupe_window, batch=batch)
        if total:
            # Deleted rows free pages: re-measure now, or a journal held over max_size
            # would wait for a commit that its own limit refuses.
            await self._on_writer(self._measure_size)
            self._update_capacity()
        return total
