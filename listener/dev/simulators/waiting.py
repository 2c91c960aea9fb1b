"""
``wait_until`` for the simulators: a test waits for a state (so many requests, a
subscriber, a delivery) without polling, re-checked each time the simulator marks a
change with :meth:`Waitable._pulse`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Waitable"]


class Waitable:
    """A simulator's ``wait_until``; it sets ``self._changed = asyncio.Event()`` at start."""

    #: Names the simulator in a timeout's message.
    _waiting_name = "simulator"
    _changed: asyncio.Event

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the deadline is built in so no caller forgets one
        what: str = "",
    ) -> None:
        """
        Wait until ``predicate()`` holds; it is re-checked on every change the simulator marks.

        Raises:
            TimeoutError: it did not hold within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            message = f"{self._waiting_name}: not {what or 'true'} after {timeout}s"
            raise TimeoutError(message) from None

    def _pulse(self) -> None:
        # Wake every wait_until; the next waiters get a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
