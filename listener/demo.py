"""
``listener demo``: the real pipeline against built-in simulators (CONTRACT §2).

The real :class:`~listener.service.Service` runs in-process for ``--seconds`` with

* a ``getstoken`` webhook source fed by a
  :class:`~listener.simulators.getstoken.GetSmartTokenSimulator` (fresh random
  ``whsec_`` secret; a few bad payloads and redeliveries), and
* a ``layerx402`` stream source connected to an in-process
  :class:`~listener.simulators.layerx402.Layerx402Simulator` (trades and token for one
  mint, portfolio for one wallet),

on ephemeral ports, a journal in a temporary directory and the exchange
``demo.<random>``, so it never touches real data. Only the broker URL (and its
settings) come from the configuration.

What reached the broker is read back through a tap: an exclusive, auto-delete queue
bound ``#`` to the demo exchange, declared before anything is published. At the end
``lost`` counts every event a simulator was told was accepted (webhook ids answered
2xx, stream events produced before the pause) that was not published - or, with no
broker, not even journaled. Exit 0; 1 when anything was lost. The demo's exchanges
and queues are deleted at the end.

Ctrl-C once ends production early (the summary still follows); twice also cuts the
waits for the journal and the broker short.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import click
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from prometheus_client import Counter
from pydantic import SecretStr
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from handlers.layerx402 import event_id, subscription_key
from listener.cli import CONFIG_OPTION, load_or_exit, run_async
from listener.config import (
    AdminConfig,
    Config,
    HttpConfig,
    JournalConfig,
    LogConfig,
    SignatureConfig,
    StreamSourceConfig,
    SubscriptionConfig,
    WebhookSourceConfig,
    config_path,
    load_config,
    mask_url,
    secret_values,
)
from listener.exceptions import ConfigError
from listener.logs import configure_logging
from listener.service import Service
from listener.simulators.getstoken import GetSmartTokenSimulator
from listener.simulators.layerx402 import Layerx402Simulator

__all__ = ["command", "demo_config"]

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


def demo_config(
    base: Config, *, journal: Path, exchange: str, stream_url: str, api_key: str, whsec: str
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
        ),
        # The demo drains before it stops; with no broker there is nothing to wait for.
        shutdown_timeout=2.0,
    )


def stream_event_id(channel: str, data: dict[str, Any]) -> str:
    """The id the listener must give a Layerx402 event: CONTRACT §6's "id from" column."""
    if channel == "token":
        return event_id(channel, data["mint"], data["updated_at"])
    if channel == "trades":
        return event_id(channel, data["signature"], data["mint"])
    return event_id(channel, data["wallet"], data["mint"], data["ts"])


class _Tap:
    """An exclusive, auto-delete queue bound ``#`` to the demo exchange: what arrived."""

    def __init__(self, connection: AbstractConnection, exchange: str) -> None:
        self.connection = connection
        self.exchange = exchange
        #: (source, message_id) → type, for every distinct message that arrived.
        self.seen: dict[tuple[str, str], str] = {}

    @classmethod
    async def open(cls, url: str, exchange: str) -> _Tap:
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


def _counts(counter: Counter, *labels: str) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels[name] for name in labels)] = int(sample.value)
    return out


def _by_source(counts: dict[tuple[str, ...], int]) -> dict[str, int]:
    out = {GST: 0, LX: 0}
    for key, n in counts.items():
        out[key[0]] = out.get(key[0], 0) + n
    return out


@dataclass
class _Demo:
    """The state of one demo run, shown live and summarised at the end."""

    base: Config
    seconds: float
    exchange: str = field(default_factory=lambda: f"demo.{secrets.token_hex(4)}")
    phase: str = "starting"
    started_at: float = 0.0
    ended_at: float = 0.0
    broker_up: bool | None = None
    interrupts: int = 0
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    whsec: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    )
    tap: _Tap | None = None
    tap_error: str | None = None
    service: Service | None = None
    gst: GetSmartTokenSimulator | None = None
    lx: Layerx402Simulator | None = None
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    give_up: asyncio.Event = field(default_factory=asyncio.Event)

    def redacted(self) -> list[str]:
        """What the log redaction must hide: the demo's keys and the broker password."""
        return [self.api_key, self.whsec, *secret_values(self.base)]

    def elapsed(self) -> float:
        """Seconds the simulators have been producing."""
        if not self.started_at:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def interrupt(self) -> None:
        """Ctrl-C: end production early; a second one also cuts the waits short."""
        self.interrupts += 1
        self.hurry.set()
        if self.interrupts > 1:
            self.give_up.set()

    # --- what is shown -------------------------------------------------------------

    def published(self) -> dict[tuple[str, ...], int]:
        if self.tap is not None:
            out: dict[tuple[str, ...], int] = {}
            for (source, _), kind in list(self.tap.seen.items()):
                out[source, kind] = out.get((source, kind), 0) + 1
            return out
        if self.service is not None:
            return _counts(self.service.metrics.events_published, "source", "type")
        return {}

    def table(self) -> Table:
        metrics = self.service.metrics if self.service is not None else None
        received = _counts(metrics.events_received, "source", "type") if metrics else {}
        quarantined = _counts(metrics.events_quarantined, "source", "reason") if metrics else {}
        published = self.published()
        broker = mask_url(self.base.broker.url.get_secret_value())
        table = Table(
            title=f"listener demo · exchange {self.exchange} on {broker}",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        table.add_column("source")
        table.add_column("type", min_width=32, no_wrap=True)  # getstoken.achievement.progressed
        for name in ("received", "published", "quarantined"):
            table.add_column(name, justify="right")
        for source, kind in sorted(set(received) | set(published)):
            table.add_row(
                source,
                kind,
                str(received.get((source, kind), 0)),
                str(published.get((source, kind), 0)),
                "",
            )
        for source, reason in sorted(quarantined):
            table.add_row(source, f"[yellow]{reason}[/]", "", "", str(quarantined[source, reason]))
        table.add_section()
        table.add_row(
            "total",
            "",
            str(sum(received.values())),
            str(sum(published.values())),
            str(sum(quarantined.values())),
        )
        table.caption = self._status(metrics is not None)
        return table

    def _status(self, running: bool) -> str:
        elapsed = self.elapsed()
        broker = {None: "connecting", True: "connected", False: "[red]no broker: journal-only[/]"}
        parts = [
            f"{self.phase} {elapsed:.1f}/{self.seconds:g}s",
            f"broker {broker[self.broker_up]}",
        ]
        if running and self.service is not None and self.service.journal is not None:
            parts.append(f"journal pending {self.service.journal.pending_count}")
            duplicates = sum(_counts(self.service.metrics.events_duplicate, "source").values())
            parts.append(f"duplicates {duplicates}")
        if self.gst is not None:
            parts.append(f"webhooks sent {self.gst.sent}")
        if self.lx is not None:
            parts.append(f"stream events {sum(len(v) for v in self.lx.produced.values())}")
        return " · ".join(parts)

    # --- the run -------------------------------------------------------------------

    async def run(self, show: Callable[[], None]) -> tuple[str, int]:
        """Run the pipeline and the simulators; return the summary line and ``lost``."""
        url = self.base.broker.url.get_secret_value()
        # Without a broker the demo says so itself, once; connect retries would repeat it.
        _quiet(logging.CRITICAL)
        try:
            self.tap = await _Tap.open(url, self.exchange)
        except Exception as exc:  # any failure to reach the broker means journal-only
            self.tap_error = f"{type(exc).__name__}: {exc}"
        else:
            _quiet(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory(prefix="listener-demo-") as workdir:
                return await self._run(Path(workdir), show)
        finally:
            if self.tap is not None:
                await self._cleanup(self.tap)

    async def _run(self, workdir: Path, show: Callable[[], None]) -> tuple[str, int]:
        async with Layerx402Simulator(
            api_keys={self.api_key}, rate=STREAM_RATE, time_base_ms=None
        ) as lx:
            lx.pause()  # nothing is produced before the listener has subscribed
            self.lx = lx
            config = demo_config(
                self.base,
                journal=workdir / "journal.db",
                exchange=self.exchange,
                stream_url=lx.url,
                api_key=self.api_key,
                whsec=self.whsec,
            )
            service = self.service = Service(config)
            async with asyncio.TaskGroup() as tasks:
                running = tasks.create_task(service.run(), name="service")
                refresher = tasks.create_task(self._refresh(show), name="demo-refresh")
                try:
                    await self._produce(service, lx)
                    await self._settle(service, lx)
                finally:
                    self.phase = "stopped"
                    if not self.broker_up:
                        # The summary says what stays journaled; the drain warning would too.
                        logging.getLogger("listener.service").setLevel(logging.ERROR)
                    service.stop()
                    await asyncio.wait({running})  # its failure, if any, is the TaskGroup's
                    refresher.cancel()
            show()
            return await self._summary(config.journal.path)

    async def _refresh(self, show: Callable[[], None]) -> None:
        while True:
            show()
            await asyncio.sleep(REFRESH)

    async def _produce(self, service: Service, lx: Layerx402Simulator) -> None:
        async with asyncio.timeout(10.0):
            await service.started.wait()
        self.phase = "connecting"
        self.broker_up = await _wait(
            lambda: service.publisher is not None and service.publisher.connected,
            BROKER_WAIT,
            self.give_up,
        )
        if not self.broker_up:
            broker = mask_url(self.base.broker.url.get_secret_value())
            why = self.tap_error or "the publisher did not connect"
            click.echo(
                f"listener demo: no broker reachable at {broker} within {BROKER_WAIT:g}s ({why}); "
                "running journal-only: events are journaled, nothing is published",
                err=True,
            )
            # Said once here; the publisher's retry warnings would only repeat it.
            _quiet(logging.CRITICAL)
        elif self.tap_error is not None:
            _quiet(logging.WARNING)  # the broker came up after all: its problems matter again
        subscribed = await _wait(
            lambda: all(lx.subscribers(c, p) for c, p in SUBSCRIPTIONS),
            SUBSCRIBE_WAIT,
            self.give_up,
        )
        if not subscribed:
            click.echo("listener demo: the stream source did not subscribe in time", err=True)
        self.gst = GetSmartTokenSimulator(
            url=f"http://127.0.0.1:{service.public_port}{WEBHOOK_PATH}",
            secret=self.whsec,
            rate=WEBHOOK_RATE,
            concurrency=4,
            bad_share=0.05,
            duplicate_share=0.05,
            seed=WEBHOOK_SEED,
        )
        self.phase = "producing"
        self.started_at = time.monotonic()
        lx.resume()
        async with self.gst:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.seconds):
                    await self.hurry.wait()
            lx.pause()
            self.gst.stop()
            self.ended_at = time.monotonic()
        # The ledgers are final now: every webhook has its answer; no more stream events.

    async def _settle(self, service: Service, lx: Layerx402Simulator) -> None:
        journal = service.journal
        assert journal is not None  # set before service.started

        async def stream_journaled() -> bool:
            cursors = await journal.cursors(LX)
            return all(
                cursors.get(subscription_key(c, p), 0) >= lx.last_seq(c, p)
                for c, p in SUBSCRIPTIONS
            )

        self.phase = "journaling"
        await _wait(stream_journaled, JOURNAL_WAIT, self.give_up)
        if self.broker_up:
            self.phase = "draining"
            expected = self._expected()
            tap = self.tap
            await _wait(
                lambda: journal.pending_count == 0 and (tap is None or expected <= set(tap.seen)),
                DRAIN_WAIT,
                self.give_up,
            )

    def _expected(self) -> set[tuple[str, str]]:
        """Every (source, event id) a simulator was told was accepted, as an event."""
        expected = {(GST, event) for event in self.gst.accepted} if self.gst else set()
        if self.lx is not None:
            for records in self.lx.produced.values():
                expected.update((LX, stream_event_id(r["channel"], r["data"])) for r in records)
        return expected

    async def _summary(self, journal_path: Path) -> tuple[str, int]:
        service = self.service
        assert service is not None  # the run created it
        rows = await asyncio.to_thread(_read_journal, journal_path)
        expected = self._expected()
        quarantined_ids = {(GST, q) for q in self.gst.quarantined} if self.gst else set()
        if self.tap is not None and self.broker_up:
            published = set(self.tap.seen)
        else:
            published = {k for k, (kind, status) in rows.items() if kind == "event" and status}
        if self.broker_up:
            lost = expected - published
            lost |= {q for q in quarantined_ids if rows.get(q, ("", 0))[1] == 0}
        else:
            lost = {k for k in expected | quarantined_ids if k not in rows}
        metrics = service.metrics
        received = _by_source(_counts(metrics.events_received, "source", "type"))
        per_source = _by_source(dict.fromkeys(published, 1))
        quarantined = sum(_counts(metrics.events_quarantined, "source", "reason").values())
        duplicates = sum(_counts(metrics.events_duplicate, "source").values())
        kept = sum(1 for _, status in rows.values() if status == 0)
        if lost:
            sample = ", ".join(f"{s}:{i}" for s, i in sorted(lost)[:5])
            click.echo(f"listener demo: {len(lost)} events lost, e.g. {sample}", err=True)

        def listing(counts: dict[str, int]) -> str:
            return f"{sum(counts.values())} ({', '.join(f'{s} {n}' for s, n in counts.items())})"

        where = f"exchange {self.exchange}" if self.broker_up else "no broker"
        shown = (
            listing(per_source)
            if self.broker_up
            else f"0 (no broker: {kept} events kept in the journal)"
        )
        line = (
            f"demo {self.elapsed():.1f}s, {where}: received {listing(received)}, "
            f"published {shown}, quarantined {quarantined}, duplicates {duplicates}, "
            f"lost {len(lost)}"
        )
        return line, len(lost)

    async def _cleanup(self, tap: _Tap) -> None:
        try:
            async with asyncio.timeout(10.0):
                await tap.delete_topology()
        except Exception as exc:  # reported, never hidden: the operator can delete them by hand
            click.echo(
                f"listener demo: could not delete exchange {self.exchange} and its queues: {exc}",
                err=True,
            )
        finally:
            with contextlib.suppress(Exception):  # closing a broken connection; it is gone
                await tap.connection.close()


def _read_journal(path: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(source, event id) → (kind, status) of every journal row, read after the service stopped."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT source, event_id, kind, status FROM events").fetchall()
    return {(source, event): (kind, status) for source, event, kind, status in rows}


def _quiet(level: int) -> None:
    """Set the level of the loggers that report broker connection problems."""
    for name in ("listener.publisher", "aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(level)


async def _wait(
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


@contextlib.contextmanager
def _display(console: Console, demo: _Demo) -> Iterator[Callable[[], None]]:
    """A live table on a terminal (logs printed above it); otherwise nothing until the end."""
    stderr = sys.stderr
    secrets_ = demo.redacted()
    if not console.is_terminal:
        configure_logging(level="warning", fmt="console", secrets=secrets_, stream=stderr)
        yield lambda: None
        return
    with Live(
        console=console, auto_refresh=False, redirect_stderr=stderr.isatty(), transient=False
    ) as live:
        # sys.stderr is rich's proxy now, so warnings appear above the table, not inside it.
        configure_logging(level="warning", fmt="console", secrets=secrets_, stream=sys.stderr)
        try:
            yield lambda: live.update(demo.table(), refresh=True)
        finally:
            configure_logging(level="warning", fmt="console", secrets=secrets_, stream=stderr)


def _base_config(config_file: Path | None) -> Config:
    """
    The configuration whose broker settings the demo uses. The demo replaces sources,
    keys and ports, so a configuration that cannot load (e.g. its secrets are not set)
    is not fatal here: the demo then uses the defaults ($RABBITMQ_URL or localhost).
    An explicit --config that is broken still exits 2.
    """
    if config_file is not None:
        return load_or_exit(config_file)
    try:
        return load_config(config_path(None))
    except ConfigError as exc:
        url = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@localhost:5672/"
        where = config_path(None)
        click.echo(
            f"listener demo: not using {where} ({exc.problems[0]}); broker {mask_url(url)}",
            err=True,
        )
        return Config.model_validate({"broker": {"url": url}, "sources": []})


@click.command("demo")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="How long the simulators produce.",
)
@CONFIG_OPTION
def command(seconds: float, config_file: Path | None) -> None:
    """Run the real pipeline against built-in simulators and show what flows."""
    base = _base_config(config_file)
    console = Console()

    async def main() -> tuple[str, int]:
        demo = _Demo(base=base, seconds=seconds)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, demo.interrupt)
        with _display(console, demo) as show:
            return await demo.run(show)

    try:
        summary, lost = run_async(main)
    except* OSError as group:
        click.echo(f"listener demo: cannot start: {group.exceptions[0]}", err=True)
        sys.exit(1)
    click.echo(summary)
    if lost:
        sys.exit(1)
