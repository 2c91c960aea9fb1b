"""Webhook load for chaos scenarios: signed posts at a fixed concurrency, fed to a ledger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp

from tests.chaos.ledger import Ledger
from tests.conftest import UNIT
from tests.webhook_sender import Sender, gst_event

__all__ = ["Load", "load"]


class Load:
    """
    ``concurrency`` workers post distinct events until stopped; every 2xx is acknowledged
    in the ledger. ``statuses`` counts answers, ``errors`` connection failures and
    ``timeouts`` requests with no answer within ``request_timeout`` (a hang).
    """

    def __init__(
        self,
        sender: Sender,
        book: Ledger,
        *,
        prefix: str,
        source: str = "gst",
        concurrency: int = 8,
        pace: float = 0.0,
        request_timeout: float = 15.0,
    ) -> None:
        self.sender = sender
        self.ledger = book
        self.prefix = prefix
        self.source = source
        self.concurrency = concurrency
        self.pace = pace
        self.request_timeout = request_timeout * UNIT
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.timeouts = 0
        self._numbers = itertools.count()
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []

    @property
    def acknowledged(self) -> int:
        """Requests answered 2xx so far."""
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def start(self) -> None:
        """Start the workers."""
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Let in-flight requests finish (their answers still count), then stop."""
        self._stopping.set()
        async with asyncio.timeout(self.request_timeout + 5 * UNIT):
            await asyncio.gather(*self._workers)

    async def wait_acknowledged(self, n: int, timeout: float = 20.0) -> None:
        """Wait until ``n`` more requests than now were answered 2xx."""
        target = self.acknowledged + n
        async with asyncio.timeout(timeout * UNIT):
            while self.acknowledged < target:
                await asyncio.sleep(0.02)

    async def _work(self) -> None:
        while not self._stopping.is_set():
            event_id = f"{self.prefix}-{next(self._numbers)}"
            try:
                async with asyncio.timeout(self.request_timeout):
                    status, _, _ = await self.sender.post(gst_event(event_id))
            except TimeoutError:
                self.timeouts += 1
                continue
            except (aiohttp.ClientError, OSError):
                self.errors += 1
                # The peer is down or restarting: do not spin.
                await asyncio.sleep(0.02)
                continue
            self.statuses[status] += 1
            if 200 <= status < 300:
                self.ledger.acknowledge(self.source, [event_id])
            elif status >= 500:
                await asyncio.sleep(0.02)
            if self.pace:
                await asyncio.sleep(self.pace)


@contextlib.asynccontextmanager
async def load(
    url: str, book: Ledger, *, prefix: str, concurrency: int = 8, pace: float = 0.0
) -> AsyncIterator[Load]:
    """Run a :class:`Load` against the webhook ``url`` for the duration of the block."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    ) as session:
        generator = Load(
            Sender(session, url), book, prefix=prefix, concurrency=concurrency, pace=pace
        )
        generator.start()
        try:
            yield generator
        finally:
            await generator.stop()
