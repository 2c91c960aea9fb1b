"""
The demo's pieces: its configuration, the tap that reads back what reached the
broker, and small helpers (:mod:`listener.dev.demo` runs the demo).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from prometheus_client import Counter
from pydantic import SecretStr

from handlers.layerx402 import event_id
from listener.config import (
    AdminConfig,
    Config,
    HttpConfig,
    JournalConfig,
    LogConfig,
    PollSourceConfig,
    SignatureConfig,
    StreamSourceConfig,
    SubscriptionConfig,
    WebhookSourceConfig,
)
from listener.dev.simulators.terrapin import generate_isins
from listener.metrics import LoopCounter

GST: Final = "gst"
LX: Final = "lx"
WEBHOOK_PATH: Final = "/webhooks/gst"
MINT: Final = "So11111111111111111111111111111111111111112"
WALLET: Final = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
SUBSCRIPTIONS: Final = (
    ("trades", {"mint": MINT}),
    ("token", {"mint": MINT}),
    ("portfolio", {"wallet": WALLET}),
)
WEBHOOK_RATE: Final = 20.0  # deliveries/s
WEBHOOK_SEED: Final = 1  # its first bad payload and redelivery come within the first second
STREAM_RATE: Final = 10.0  # events/s per subscription
BROKER_WAIT: Final = 3.0  # the publisher must connect this soon, else journal-only
SUBSCRIBE_WAIT: Final = 10.0
JOURNAL_WAIT: Final = 10.0  # produced stream events must reach the journal
DRAIN_WAIT: Final = 15.0  # the journal must empty into the broker
REFRESH: Final = 0.25  # seconds between live table refreshes
TT: Final = "tt"
BONDS: Final = "bonds"
POLLS: Final = (TT, BONDS)
TT_PROJECTS: Final = ("aave", "uniswap")
ISINS: Final = tuple(generate_isins(20, seed=7))
POLL_INTERVAL: Final = "3s"  # a demo poll every few seconds (production: hours)
CHANGE_EVERY: Final = 2.0  # the simulators restate data this often while producing


def demo_config(
    base: Config,
    *,
    journal: Path,
    exchange: str,
    stream_url: str,
    api_key: str,
    whsec: str,
    poll_urls: tuple[str, str] | None = None,
) -> Config:
    """``base``'s broker settings with the demo's exchange, sources, ports and journal."""
    return Config(
        log=LogConfig(level="warning", format="console"),
        http=HttpConfig(host="127.0.0.1", port=0),
        admin=AdminConfig(host="127.0.0.1", port=0),
        broker=base.broker.model_copy(update={"exchange": exchange}),
        journal=JournalConfig(path=journal),
        sources=(
            WebhookSourceConfig(
                name=GST,
                kind="webhook",
                provider="getstoken",
                path=WEBHOOK_PATH,
                signature=SignatureConfig(secrets=(SecretStr(whsec),)),
            ),
            StreamSourceConfig(
                name=LX,
                kind="websocket",
                provider="layerx402",
                url=stream_url,
                api_key=SecretStr(api_key),
                subscriptions=tuple(
                    SubscriptionConfig(channel=c, params=p) for c, p in SUBSCRIPTIONS
                ),
            ),
            *(_poll_sources(*poll_urls, api_key) if poll_urls else ()),
        ),
        # The demo drains before it stops; with no broker there is nothing to wait for.
        shutdown_timeout=2.0,
    )


def _poll_sources(tt_url: str, bonds_url: str, api_key: str) -> tuple[PollSourceConfig, ...]:
    common: dict[str, Any] = {"kind": "poll", "api_key": api_key, "interval": POLL_INTERVAL}
    return (
        PollSourceConfig.model_validate(
            {
                **common,
                "name": TT,
                "provider": "tokenterminal",
                "url": tt_url,
                "rate_limit": "1000/1m",
                "resources": [
                    {
                        "endpoint": "project_metrics",
                        "projects": list(TT_PROJECTS),
                        "metrics": ["fees", "revenue"],
                        "lookback": "3d",
                    }
                ],
            }
        ),
        PollSourceConfig.model_validate(
            {
                **common,
                "name": BONDS,
                "provider": "terrapin",
                "url": bonds_url,
                "rate_limit": "100/1m",
                "resources": [{"endpoint": "bond_reference", "isins": list(ISINS)}],
            }
        ),
    )


def stream_event_id(channel: str, data: dict[str, Any]) -> str:
    """The id the listener must give a Layerx402 event: CONTRACT §6's "id from" column."""
    if channel == "token":
        return event_id(channel, data["mint"], data["updated_at"])
    if channel == "trades":
        return event_id(channel, data["signature"], data["mint"])
    return event_id(channel, data["wallet"], data["mint"], data["ts"])


class Tap:
    """An exclusive, auto-delete queue bound ``#`` to the demo exchange: what arrived."""

    def __init__(self, connection: AbstractConnection, exchange: str) -> None:
        self.connection = connection
        self.exchange = exchange
        #: (source, message_id) → type, for every distinct message that arrived.
        self.seen: dict[tuple[str, str], str] = {}

    @classmethod
    async def open(cls, url: str, exchange: str) -> Tap:
        """Declare the demo exchange (as the publisher will) and start consuming."""
        async with asyncio.timeout(BROKER_WAIT):
            connection = await aio_pika.connect(url)
        tap = cls(connection, exchange)
        try:
            channel = await connection.channel()
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(ex, "#")
            await queue.consume(tap._on_message, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        return tap

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            source = str(orjson.loads(message.body).get("source"))
        except (orjson.JSONDecodeError, AttributeError):
            source = "?"
        self.seen[(source, message.message_id or "")] = message.type or message.routing_key or "?"

    async def delete_topology(self) -> None:
        """Delete what the demo declared: exchange, quarantine exchange and queue, archive."""
        channel = await self.connection.channel()
        for queue in (f"{self.exchange}.quarantine", f"{self.exchange}.archive"):
            await channel.queue_delete(queue)
        for name in (self.exchange, f"{self.exchange}.quarantine"):
            await channel.exchange_delete(name)
        await channel.close()


def counts(counter: Counter | LoopCounter, *labels: str) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels[name] for name in labels)] = int(sample.value)
    return out


def by_source(counts: dict[tuple[str, ...], int]) -> dict[str, int]:
    out = {GST: 0, LX: 0, TT: 0, BONDS: 0}
    for key, n in counts.items():
        out[key[0]] = out.get(key[0], 0) + n
    return out


def quiet(level: int) -> None:
    """Set the level of the loggers that report broker connection problems."""
    for name in ("listener.publisher", "aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(level)


async def wait(
    predicate: Callable[[], bool | Awaitable[bool]], limit: float, give_up: asyncio.Event
) -> bool:
    """Whether ``predicate`` came to hold within ``limit`` seconds (polled, cut by Ctrl-C)."""
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline or give_up.is_set():
            return False
        await asyncio.sleep(0.05)
