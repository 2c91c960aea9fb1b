"""
The daemon's lifecycle (CONTRACT §8), owned by one ``asyncio.TaskGroup``.

Start: journal → publisher (connects in the background, retrying) → stream sources →
admin port → public webhook port.

Stop (SIGTERM/SIGINT), in this fixed order, as arq's ``close()``:

1. stop intake: webhooks answer 503, streams close;
2. drain: publish what the journal holds, for at most ``shutdown_timeout``;
3. close the broker connection, the HTTP sites, then the journal.

What is still pending is published at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from aiohttp import web

from listener.admin import AdminApp
from listener.config import Config, StreamSourceConfig, WebhookSourceConfig
from listener.envelope import rfc3339
from listener.journal import Journal
from listener.metrics import Metrics
from listener.publisher import Publisher
from listener.webhooks import WebhookApp

__all__ = ["Service", "SourceRuntime"]

log = structlog.get_logger("listener.service")

MAINTENANCE_INTERVAL = 60.0


class SourceRuntime(Protocol):
    """A running source (a stream connection) as the service sees it."""

    name: str

    async def run(self) -> None:
        """Hold the source until cancelled."""
        ...

    def state(self) -> Mapping[str, Any]:
        """``{"status": ..., ...}`` for ``/readyz`` and ``/v1/sources``."""
        ...


@contextlib.asynccontextmanager
async def _site(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    # Our own shutdown bounds the drain; aiohttp's default 60 s is longer than
    # Kubernetes' 30 s grace (NOTES: shutdown facts).
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        sockets = getattr(server, "sockets", None) or []
        yield sockets[0].getsockname()[1] if sockets else port
    finally:
        await runner.cleanup()


class Service:
    """The listener daemon. ``await Service(config).run()`` until :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self.public_port: int | None = None
        self.admin_port: int | None = None
        self.journal: Journal | None = None
        self.publisher: Publisher | None = None
        self.admin: AdminApp | None = None
        self.streams: list[SourceRuntime] = []
        self._webhooks: WebhookApp | None = None
        self.exit_pending = 0

    def stop(self) -> None:
        """Begin the shutdown sequence (idempotent; safe from a signal handler)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start the shutdown sequence."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    def source_states(self) -> dict[str, Mapping[str, Any]]:
        """Every source's state, by name."""
        states: dict[str, Mapping[str, Any]] = {}
        for source in self.config.sources:
            if isinstance(source, WebhookSourceConfig):
                accepting = self._webhooks is not None and self._webhooks.accepting
                received, last = self._webhooks.stats(source.name) if self._webhooks else (0, None)
                states[source.name] = {
                    "kind": "webhook",
                    "status": "listening" if accepting else "stopped",
                    "path": source.path,
                    "events_received": received,
                    "last_event_at": rfc3339(datetime.fromtimestamp(last, UTC)) if last else None,
                }
        for stream in self.streams:
            states[stream.name] = stream.state()
        return states

    def _refresh_metrics(self) -> None:
        if self.journal is not None:
            self.metrics.journal_pending.set(self.journal.pending_count)
            self.metrics.journal_bytes.set(self.journal.size_bytes)

    async def run(self) -> None:
        """Run until :meth:`stop`, then shut down in order."""
        config = self.config
        async with Journal(config=config.journal, retry_after=config.http.retry_after) as journal:
            self.journal = journal
            publisher = Publisher(config=config.broker, journal=journal, metrics=self.metrics)
            self.publisher = publisher
            self.streams = self._make_streams(journal)
            webhook_sources = tuple(s for s in config.sources if isinstance(s, WebhookSourceConfig))
            webhooks = WebhookApp(
                http=config.http, sources=webhook_sources, journal=journal, metrics=self.metrics
            )
            self._webhooks = webhooks
            self.admin = AdminApp(
                config=config.admin,
                metrics=self.metrics,
                components={"broker": publisher.state, "journal": journal.state},
                sources=self.source_states,
                refresh=self._refresh_metrics,
                journal=journal,
                broker=config.broker,
            )
            async with asyncio.TaskGroup() as tasks:
                publishing = tasks.create_task(publisher.run(), name="publisher")
                streaming = [
                    tasks.create_task(s.run(), name=f"source:{s.name}") for s in self.streams
                ]
                upkeep = tasks.create_task(self._maintenance(journal), name="maintenance")
                async with (
                    _site(self.admin.app, config.admin.host, config.admin.port) as admin_port,
                    _site(webhooks.app, config.http.host, config.http.port) as public_port,
                ):
                    self.admin_port, self.public_port = admin_port, public_port
                    for source in webhook_sources:
                        self.metrics.source_connected.labels(source.name).set(1)
                    log.info(
                        "listener_started",
                        public=f"{config.http.host}:{public_port}",
                        admin=f"{config.admin.host}:{admin_port}",
                        sources=[s.name for s in config.sources],
                        pending=journal.pending_count,
                    )
                    self.started.set()
                    await self._stop.wait()

                    # 1. stop intake
                    log.info("shutdown_started", pending=journal.pending_count)
                    webhooks.accepting = False
                    for task in streaming:
                        task.cancel()
                    upkeep.cancel()
                    # 2. drain
                    await self._drain(publisher, journal)
                # 3. close the broker (sites closed by the context managers above)
                publishing.cancel()
        self.exit_pending = journal.pending_count
        log.info("shutdown_complete", pending=self.exit_pending)

    async def _drain(self, publisher: Publisher, journal: Journal) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await publisher.wait_drained()
        except TimeoutError:
            log.warning(
                "shutdown_drain_incomplete",
                pending=journal.pending_count,
                note="the rest is published at the next start",
            )
        else:
            log.info("shutdown_drained", seconds=round(time.monotonic() - started, 3))

    def _make_streams(self, journal: Journal) -> list[SourceRuntime]:
        stream_sources = [s for s in self.config.sources if isinstance(s, StreamSourceConfig)]
        if not stream_sources:
            return []
        from listener.streams import StreamSource  # noqa: PLC0415 - only when streams are configured

        return [
            StreamSource(config=s, journal=journal, metrics=self.metrics) for s in stream_sources
        ]

    async def _maintenance(self, journal: Journal) -> None:
        while True:
            try:
                deleted = await journal.prune()
            except Exception as exc:  # counted by the log; retention retries next round
                log.warning("journal_prune_failed", error=str(exc))
            else:
                if deleted:
                    log.info("journal_pruned", deleted=deleted)
            self._refresh_metrics()
            await asyncio.sleep(MAINTENANCE_INTERVAL)
