"""Memory handed back after a burst (listener.memory); entries that hold what they use."""

from __future__ import annotations

import gc
import time
import tracemalloc
import weakref
from collections.abc import Callable

import orjson
import pytest

from handlers import Event, Quarantine
from listener.envelope import Entry, event_entry, quarantine_entry
from listener.memory import TRIM_GROWTH, Trimmer, resident_bytes, settle_heap

MIB = 1024 * 1024


async def test_a_burst_freed_is_handed_back_and_a_steady_state_is_left_alone() -> None:
    trimmer = Trimmer(growth=16 * MIB)
    if not trimmer.available:
        pytest.skip("no malloc_trim in this C library (glibc only)")
    assert await trimmer.maybe_trim() is None  # nothing grew: no trim
    # A burst: ~100 MiB of 1 KiB buffers (the size of an event), then most freed with
    # every 50th kept, so the free space is in holes the allocator does not give back.
    burst = [bytes(1000 + i % 7) for i in range(100_000)]
    kept = burst[::50]
    del burst
    grown = resident_bytes()
    assert grown is not None
    trimmed = await trimmer.maybe_trim()
    assert trimmed is not None
    before, after = trimmed
    assert before >= grown - MIB
    assert after < before - 32 * MIB  # the holes went back to the system
    assert await trimmer.maybe_trim() is None  # and the new baseline is where it ended
    assert len(kept) == 2000


async def test_the_default_trims_a_burst_the_size_a_broker_restart_leaves() -> None:
    # After the soak's broker restart and the trim that followed it, the daemon grew
    # ~5 MiB again and stayed there: the old default (8 MiB of growth) never trimmed
    # that again, TRIM_GROWTH (2 MiB) does. ~6 MiB here, with holes, as after a drain.
    trimmer = Trimmer()
    if not trimmer.available:
        pytest.skip("no malloc_trim in this C library (glibc only)")
    assert 6 * MIB > TRIM_GROWTH
    burst = [bytes(1000 + i % 7) for i in range(6_000)]  # ~6 MiB of event-sized buffers
    kept = burst[::50]
    del burst
    trimmed = await trimmer.maybe_trim()
    assert trimmed is not None
    before, after = trimmed
    assert after < before - 3 * MIB
    assert len(kept) == 120


class _Node:
    """A tracked object that can be put in a cycle and watched through a weak reference."""

    other: object = None


def test_settling_the_heap_collects_the_garbage_then_freezes_what_lives() -> None:
    before = gc.get_threshold()
    garbage = _Node()
    garbage.other = garbage  # a cycle nothing refers to: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    alive = _Node()
    try:
        frozen = settle_heap()
        assert frozen == gc.get_freeze_count() > 1000  # the test process's own modules
        assert gone() is None  # collected first, not frozen with the live objects
        # The live one is out of every generation: no collection walks it again.
        assert all(obj is not alive for obj in gc.get_objects())
        assert gc.get_threshold() == before  # CPython's thresholds are kept
    finally:
        gc.unfreeze()
    assert any(obj is alive for obj in gc.get_objects())  # (unfrozen: the test was not vacuous)


def _allocated(build: Callable[[int], Entry]) -> tuple[list[Entry], int]:
    """What 500 entries built by ``build(i)`` keep allocated (bytes, as traced)."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        entries = [build(i) for i in range(500)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return entries, sum(stat.size_diff for stat in after.compare_to(before, "filename"))


@pytest.mark.parametrize("text", [900, 5000])
def test_an_entry_body_holds_no_more_than_its_size(text: int) -> None:
    """
    An entry's CloudEvent is kept in a block of its own size, not in orjson's working
    buffer (8 KB for a 1 KB event, 64 KB for 5 KB): thousands are held at once while
    the publisher catches up after an outage.
    """
    now = time.time()

    def build(i: int) -> Entry:
        event = Event(id=f"evt_{i:08d}", type="p.t", time=None, data={"text": "x" * text})
        return event_entry(source="s", provider="p", event=event, received_at=now)

    entries, allocated = _allocated(build)
    body = sum(len(e.body) for e in entries)
    assert body > 500 * text
    # The bodies, and per entry its object and id: well under a KB (orjson's buffers
    # alone would be 8 KB and 64 KB each).
    assert allocated < body + 500 * 600, (allocated, body)


def test_a_quarantined_payload_made_by_orjson_is_held_at_its_size() -> None:
    verdict = Quarantine("schema_violation", "x")

    def build(i: int) -> Entry:
        payload = orjson.dumps({"i": i, "text": "x" * 900})
        return quarantine_entry(source="s", payload=payload, verdict=verdict, received_at=0.0)

    entries, allocated = _allocated(build)
    body = sum(len(e.body) for e in entries)
    assert allocated < body + 500 * 600, (allocated, body)
