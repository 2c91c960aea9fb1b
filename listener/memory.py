"""
Giving memory back to the system after a burst, and keeping the garbage collector's
pauses off the event path.

glibc's allocator keeps what the process frees for its own reuse: after a broker
outage (the backlog drained at full speed: thousands of messages in flight, rows read
back in batches) or a large replay, the process kept the high-water mark of that
burst for good, tens of MiB above its steady state (the soak benchmark's "RSS steps
up after the broker restart"). Nothing leaked; the free memory just stayed mapped.
``malloc_trim(0)`` hands the free pages back. It takes a few milliseconds and holds
the allocator's locks meanwhile, so it runs on a worker thread and only when the
resident size grew by :data:`TRIM_GROWTH` since the last trim, which in a steady
state is never. Where the C library has no ``malloc_trim`` (musl, macOS) this does
nothing. Python's small-object arenas are out of its reach: one is returned only
when nothing in it lives, so about 10 MiB of the burst stays (measured: the live
objects as many as before, spread over a third more arenas); later bursts reuse it.

:func:`settle_heap` tunes Python's cyclic garbage collector once the daemon has started
(``listener run`` calls it; tests and the other commands keep CPython's defaults).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
from collections.abc import Callable

import structlog

__all__ = ["GC_YOUNG", "TRIM_GROWTH", "Trimmer", "resident_bytes", "settle_heap"]

log = structlog.get_logger("listener.memory")

TRIM_GROWTH = 8 * 1024 * 1024  # bytes of resident growth that make a trim worth it
# Net new container objects that start a young collection (CPython's default: 700).
GC_YOUNG = 20_000


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
    Tune the cyclic garbage collector for the running daemon; return the objects frozen.

    Events rarely make reference cycles: what the pipeline allocates is freed by its
    reference count. With CPython's default young threshold (700 net new container
    objects) the collector still ran ~110 times a second at full webhook load (each
    upswing of the messages in flight starts one), promoting in-flight messages to the
    old generation, which then set off a full collection every second or so: ~35 ms
    with the loop stopped, over the ~67k objects that imports, configuration and
    schemas leave behind. Measured in ``python -m bench --only webhooks``: ~800 ms of
    collection per 10 s run, and the accepted requests' p99 at 33-45 ms.

    * ``gc.collect()`` then ``gc.freeze()``: what start-up built is live for good;
      moved to the permanent generation, no collection walks it again.
    * a young threshold of :data:`GC_YOUNG`: 5 collections per run instead of ~1,100;
      ~50 ms in all, and the accepted p99 at 20-23 ms.

    What it costs: cycles wait for 20,000 net new objects instead of 700 (bad
    signatures, quarantined bodies and accepted events together left ~2,300 in 9,000
    requests; the resident size did not change), and a start-up object that later
    becomes part of a cycle is never collected. Call once, after start-up.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)
    frozen = gc.get_freeze_count()
    log.info("heap_settled", frozen=frozen, young_threshold=GC_YOUNG)
    return frozen
