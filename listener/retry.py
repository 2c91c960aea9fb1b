"""
Retry policy as data (after websockets' ``backoff()``): one generator of jittered,
capped delays. Callers make a new generator after a healthy period to reset it.
"""

from __future__ import annotations

import random
from collections.abc import Generator

__all__ = ["backoff"]


def backoff(
    initial: float, maximum: float, *, factor: float = 2.0, jitter: float = 0.5
) -> Generator[float, None, None]:
    """
    Yield ``initial``, ``initial*factor``, ... capped at ``maximum``, each scaled by a
    random factor in ``[1-jitter, 1]`` so many clients do not retry in lockstep
    ("full jitter" lite; AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    delay = max(initial, 0.001)
    while True:
        # Not cryptographic: only spreads retries apart.
        yield min(delay, maximum) * (1.0 - jitter * random.random())  # noqa: S311
        delay = min(delay * factor, maximum)
