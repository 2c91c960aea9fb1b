"""
A downstream consumer of the listener's events: the pattern to copy (aio-pika).

What it shows, each in a few lines:

* its **own durable queue** (a quorum queue: replicated, and it counts deliveries), bound
  to the listener's topic exchange **by pattern** (``getstoken.badge.*``, ``layerx402.#``);
* **manual acks** and a **prefetch**: a message is acknowledged only after it was
  handled, and at most ``prefetch`` are in flight;
* **deduplication on** ``message_id`` (= the CloudEvent ``id``, stable across retries,
  reconnects and replays) with a **bounded** store of recent ids: a redelivery or a
  replayed copy (header ``x-replayed``) is acknowledged and skipped;
* a **dead-letter queue**: a message the handler can never process (not JSON, or it
  raises :class:`Permanent`) is rejected without requeue and lands in ``<queue>.dead``;
  a transient failure is requeued, and the broker dead-letters it after
  ``x-delivery-limit`` attempts, so one bad message never blocks the queue.

The in-memory id store forgets at a restart. When an effect must happen exactly once,
record the id in the same transaction as the effect (a unique key in your database)
instead: the listener delivers at least once, so a consumer deduplicates.

Run it next to ``make run``::

    python examples/consumer.py --bind 'getstoken.#' --bind 'layerx402.trade'

Each handled event is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

__all__ = ["Consumer", "Permanent", "RecentIds", "Stats"]

Handler = Callable[[dict[str, Any], bool], Awaitable[None]]


class Permanent(Exception):
    """Raised by a handler for an event it can never process: dead-letter it now."""


class RecentIds:
    """The ids handled most recently, at most ``size`` (oldest forgotten first)."""

    def __init__(self, size: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


@dataclass
class Stats:
    handled: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retried: int = 0


class Consumer:
    """One queue of events, bound by patterns, handled with acks, dedup and a DLQ."""

    def __init__(
        self,
        *,
        url: str,
        exchange: str,
        queue: str,
        bindings: Sequence[str],
        handler: Handler,
        prefetch: int = 64,
        delivery_limit: int = 5,
        remember: int = 100_000,
    ) -> None:
        self.url, self.exchange, self.queue = url, exchange, queue
        self.bindings = list(bindings)
        self.handler = handler
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.seen = RecentIds(remember)
        self.stats = Stats()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        """Connect, declare the queues and bindings, and start consuming."""
        # connect_robust reconnects and re-declares what was declared on its channels.
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        dead = await channel.declare_exchange(
            f"{self.queue}.dlx", aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(
            f"{self.queue}.dead", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        queue = await channel.declare_queue(
            self.queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": dead.name,
            },
        )
        # The listener declares its exchange; declaring it the same way here is harmless
        # and lets the consumer start first.
        events = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for pattern in self.bindings:
            await queue.bind(events, routing_key=pattern)
        await queue.consume(self._on_message)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        message_id = message.message_id or ""
        if message_id in self.seen:
            self.stats.duplicates += 1
            await message.ack()  # a redelivery or a replayed copy: already handled
            return
        try:
            event = json.loads(message.body)
        except ValueError:
            self.stats.dead_lettered += 1
            await message.reject(requeue=False)
            return
        replayed = (message.headers or {}).get("x-replayed") is True
        try:
            await self.handler(event, replayed)
        except Permanent:
            self.stats.dead_lettered += 1
            await message.reject(requeue=False)
        except Exception:  # a transient failure: the broker redelivers it, up to the limit
            self.stats.retried += 1
            await message.reject(requeue=True)
        else:
            self.seen.add(message_id)
            self.stats.handled += 1
            await message.ack()


async def _print(event: dict[str, Any], replayed: bool) -> None:
    line = {"id": event["id"], "type": event["type"], "time": event["time"], "replayed": replayed}
    print(json.dumps(line), flush=True)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="events")
    parser.add_argument("--queue", default="example-consumer")
    parser.add_argument("--bind", action="append", default=[], help="routing key pattern")
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args(argv)
    consumer = Consumer(
        url=args.url,
        exchange=args.exchange,
        queue=args.queue,
        bindings=args.bind or ["#"],
        handler=_print,
        prefetch=args.prefetch,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await consumer.start()
    try:
        await stop.wait()
    finally:
        await consumer.close()
    print(json.dumps({"stats": consumer.stats.__dict__}), file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
