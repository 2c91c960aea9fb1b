"""
Giving memory back to the system after a burst, and keeping the garbage collector's
pauses off the event path.

glibc's allocator keeps what the process frees for its own reuse: after a broker
outage (the backlog drained at full speed: thousands of messages in flight, rows read
back in batches) or a large replay, the process kept the high-water mark of that
burst for good, tens of MiB above its steady state (the soak benchmark's "RSS steps
up after the broker restart"). Nothing leaked; the free memory just stayed mapped.
``malloc_trim(0)`` hands the free pages back. It takes 0.2-1.6 ms (measured after a
drain) and holds the allocator's locks meanwhile, so it runs on a worker thread, at
most once a minute (the maintenance round) and only when the resident size grew by
:data:`TRIM_GROWTH` since the last trim: 2 MiB. Measured in the 30-minute soak, the
same day: with 8 MiB, the trim after the broker restart took the resident size from 85
to 77 MiB, it grew back to 82 within a minute and stayed there (+10.4% over the run);
with 2 MiB the next round trimmed again and it stayed at 79 (+3.9%). Where the C
library has no ``malloc_trim`` (musl, macOS) this does nothing. Python's small-object
arenas are out of its reach: one is returned only when nothing in it lives, so part of
a burst stays (measured: the live objects as many as before, spread over a third more
arenas); later bursts reuse it.

:func:`settle_heap` freezes start-up's objects out of Python's cyclic garbage collector
once the daemon has started (``listener run`` calls it; tests and the other commands
keep CPython's defaults: a freeze in a test process would pin every test's leftovers).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
from collections.abc import Callable

import structlog

__all__ = ["TRIM_GROWTH", "TRIM_NOTABLE", "Trimmer", "resident_bytes", "settle_heap"]

log = structlog.get_logger("listener.memory")

TRIM_GROWTH = 2 * 1024 * 1024  # bytes of resident growth that make a trim worth it
TRIM_NOTABLE = 4 * 1024 * 1024  # a trim that handed back this much is logged at info


def resident_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), else ``None``."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The symbols the process already has (its C library among them): no search.
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # a C library without malloc_trim
        return None
    return trim


class Trimmer:
    """Trims the allocator when the resident size grew (see the module docstring)."""

    def __init__(self, *, growth: int = TRIM_GROWTH) -> None:
        self._trim = _malloc_trim()
        self._growth = growth
        self._baseline = resident_bytes()

    @property
    def available(self) -> bool:
        """Whether this platform can trim at all."""
        return self._trim is not None and self._baseline is not None

    async def maybe_trim(self) -> tuple[int, int] | None:
        """
        Trim if the resident size grew by ``growth`` since the last trim (or the start).

        Returns:
            ``(before, after)`` in bytes when it trimmed, else ``None``.
        """
        trim = self._trim
        before = resident_bytes()
        if trim is None or before is None or self._baseline is None:
            return None
        if before - self._baseline < self._growth:
            return None
        await asyncio.to_thread(trim, 0)
        after = resident_bytes() or before
        self._baseline = after
        return before, after


def settle_heap() -> int:
    """
    Freeze what start-up built out of the cyclic garbage collector; return the count.

    Events rarely make reference cycles: what the pipeline allocates is freed by its
    reference count. But at full webhook load the collector's young generation (700 net
    new container objects) fills ~80 times a second with the messages in flight; those
    that outlive two young collections reach the old generation and set off a full
    collection every second or so, which walked the ~67k objects that imports,
    configuration and schemas leave behind: 25-35 ms each with the loop stopped.
    ``gc.collect()`` then ``gc.freeze()`` moves them to the permanent generation, which
    no collection walks again: measured in ``python -m bench --only webhooks``, the
    full collections of a 10 s run took 13 ms in all (1-4 ms each) instead of 183 ms.

    The young threshold stays CPython's: a raised one (20,000) cut the collector's time
    in the webhook bench further, but made each young collection ~4 ms and the 30-minute
    soak's loop lag and accept latency worse. What freezing costs: a start-up object
    that later ends up in an unreachable cycle is never collected. Call once, after
    start-up.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap_settled", frozen=frozen)
    return frozen
