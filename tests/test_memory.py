"""Memory handed back after a burst (listener.memory)."""

from __future__ import annotations

import pytest

from listener.memory import Trimmer, resident_bytes

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
