"""
Retry policy as data (after websockets' ``backoff()``): one generator of jittered,
capped delays. Callers make a new generator after a healthy period to reset it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Generator

__all__ = ["backoff", "stop_if_cancelled"]


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


def stop_if_cancelled(cause: BaseException | None = None) -> None:
    """
    Raise ``CancelledError`` if the running task has been asked to stop.

    ``asyncio.wait_for`` (Python 3.11; aio-pika and aiormq use it) raises the awaited
    operation's own error instead of the cancellation when both come together: a retry
    loop that catches that error then goes on for ever, and the ``TaskGroup`` waiting for
    it too (a port in use at start left the daemon retrying the broker, never exiting).
    Retry loops call this before they retry.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause
