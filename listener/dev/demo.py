"""
The demo's engine: the real pipeline against built-in simulators (CONTRACT §2);
``listener demo`` (:mod:`listener.cli.demo`) runs it and shows it.

The real :class:`~listener.service.Service` runs in-process for ``--seconds`` with

* a ``getstoken`` webhook source fed by a
  :class:`~listener.dev.simulators.getstoken.GetSmartTokenSimulator` (fresh random
  ``whsec_`` secret; a few bad payloads and redeliveries), and
* a ``layerx402`` stream source connected to an in-process
  :class:`~listener.dev.simulators.layerx402.Layerx402Simulator` (trades and token for one
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
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import click
from rich import box
from rich.table import Table

from handlers.layerx402 import subscription_key
from listener.config import (
    Config,
    mask_url,
)
from listener.config_loader import secret_values
from listener.dev.demo_parts import (
    BROKER_WAIT,
    CHANGE_EVERY,
    DRAIN_WAIT,
    GST,
    ISINS,
    JOURNAL_WAIT,
    LX,
    POLLS,
    REFRESH,
    STREAM_RATE,
    SUBSCRIBE_WAIT,
    SUBSCRIPTIONS,
    TT_PROJECTS,
    WEBHOOK_PATH,
    WEBHOOK_RATE,
    WEBHOOK_SEED,
    Tap,
    by_source,
    counts,
    demo_config,
    quiet,
    stream_event_id,
    wait,
)
from listener.dev.simulators.getstoken import GetSmartTokenSimulator
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.dev.simulators.terrapin import TerrapinSimulator
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.journal.queries import journal_outcomes
from listener.service import Service

__all__ = ["Demo", "demo_config"]


@dataclass
class Demo:
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
    tap: Tap | None = None
    tap_error: str | None = None
    service: Service | None = None
    gst: GetSmartTokenSimulator | None = None
    lx: Layerx402Simulator | None = None
    tt: TokenTerminalSimulator | None = None
    bonds: TerrapinSimulator | None = None
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
            return counts(self.service.metrics.events_published, "source", "type")
        return {}

    def table(self) -> Table:
        metrics = self.service.metrics if self.service is not None else None
        received = counts(metrics.events_received, "source", "type") if metrics else {}
        quarantined = counts(metrics.events_quarantined, "source", "reason") if metrics else {}
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
            duplicates = sum(counts(self.service.metrics.events_duplicate, "source").values())
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
        quiet(logging.CRITICAL)
        try:
            self.tap = await Tap.open(url, self.exchange)
        except Exception as exc:  # any failure to reach the broker means journal-only
            self.tap_error = f"{type(exc).__name__}: {exc}"
        else:
            quiet(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory(prefix="listener-demo-") as workdir:
                return await self._run(Path(workdir), show)
        finally:
            if self.tap is not None:
                await self._cleanup(self.tap)

    async def _run(self, workdir: Path, show: Callable[[], None]) -> tuple[str, int]:
        async with (
            Layerx402Simulator(api_keys={self.api_key}, rate=STREAM_RATE, time_base_ms=None) as lx,
            TokenTerminalSimulator(
                api_keys={self.api_key}, projects=TT_PROJECTS, chains=["ethereum"]
            ) as tt,
            TerrapinSimulator(api_keys={self.api_key}, isins=ISINS, rate_limit=None) as bonds,
        ):
            lx.pause()  # nothing is produced before the listener has subscribed
            self.lx, self.tt, self.bonds = lx, tt, bonds
            config = demo_config(
                self.base,
                journal=workdir / "journal.db",
                exchange=self.exchange,
                stream_url=lx.url,
                api_key=self.api_key,
                whsec=self.whsec,
                poll_urls=(tt.url, bonds.url),
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
        self.broker_up = await wait(
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
            quiet(logging.CRITICAL)
        elif self.tap_error is not None:
            quiet(logging.WARNING)  # the broker came up after all: its problems matter again
        subscribed = await wait(
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
                    await self._restate_while(self.hurry)
            lx.pause()
            self.gst.stop()
            self.ended_at = time.monotonic()
        # The ledgers are final now: every webhook has its answer; no more stream events.

    async def _restate_while(self, stop: asyncio.Event) -> None:
        """Change provider data now and then, so the poll sources have changes to report."""
        rounds = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHANGE_EVERY):
                    await stop.wait()
            rounds += 1
            if self.bonds is not None:
                self.bonds.change_fraction(0.1, seed=rounds)
            if self.tt is not None:
                day = self.tt.current_day() - timedelta(days=1)
                self.tt.restate(TT_PROJECTS[0], day, "fees", f"{1000 + rounds}.25")

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
        await wait(stream_journaled, JOURNAL_WAIT, self.give_up)
        if self.broker_up:
            self.phase = "draining"
            expected = self._expected()
            tap = self.tap
            await wait(
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
        rows = await asyncio.to_thread(journal_outcomes, journal_path)
        expected = self._expected()
        quarantined_ids = {(GST, q) for q in self.gst.quarantined} if self.gst else set()
        if self.tap is not None and self.broker_up:
            published = set(self.tap.seen)
        else:
            published = {k for k, (kind, status) in rows.items() if kind == "event" and status}
        # Poll sources: every change event they journaled must have been published.
        expected |= {k for k, (kind, _) in rows.items() if k[0] in POLLS and kind == "event"}
        if self.broker_up:
            lost = expected - published
            lost |= {q for q in quarantined_ids if rows.get(q, ("", 0))[1] == 0}
        else:
            lost = {k for k in expected | quarantined_ids if k not in rows}
        metrics = service.metrics
        received = by_source(counts(metrics.events_received, "source", "type"))
        per_source = by_source(dict.fromkeys(published, 1))
        quarantined = sum(counts(metrics.events_quarantined, "source", "reason").values())
        duplicates = sum(counts(metrics.events_duplicate, "source").values())
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

    async def _cleanup(self, tap: Tap) -> None:
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
