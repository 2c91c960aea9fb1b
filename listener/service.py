"""
The daemon's lifecycle (CONTRACT §8), owned by one ``asyncio.TaskGroup``.

Start: journal (its lock first) → publisher (connects in the background, retrying) →
the sources' transports, bound through :mod:`listener.sources.registry` → admin port →
public port (the webhook routes the transports mounted).

Every source runtime runs under a supervisor (:func:`listener.sources.supervisor.supervised`):
an exception in one source is logged, counted and the source restarted; it never ends
the TaskGroup. Only shutdown does. Under ``cluster.enabled`` the stream and poll
runtimes are units (:mod:`listener.cluster`): each runs, supervised, only while this
replica holds its lease, and stopping intake also releases the leases.

Stop (SIGTERM/SIGINT), in this fixed order, as arq's ``close()``:

1. stop intake: every transport stops taking input (webhooks answer 503), source
   runtimes are cancelled (streams unsubscribe and close);
2. drain: publish what the journal holds, for at most ``shutdown_timeout``;
3. close the broker connection, the HTTP sites, then the journal (what is still
   pending is published at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from listener.admin.app import AdminApp
from listener.broker import deadline
from listener.broker.asyncapi import build_document
from listener.broker.publisher import Publisher
from listener.cluster.coordinator import Coordinator
from listener.cluster.units import units_of
from listener.config import Config
from listener.config_loader import load_config, recheck, secret_values, source_secret_values
from listener.exceptions import ConfigError
from listener.fast_http import FastServer
from listener.journal import Journal
from listener.limits import fit_file_limit
from listener.logs import redact_also
from listener.memory import TRIM_NOTABLE, Trimmer
from listener.metrics import Metrics, watch_loop_lag
from listener.reload import ReloadPlan, plan_reload
from listener.sources.registry import Transport, TransportContext, build_transports
from listener.sources.supervisor import SourceRuntime, supervised
from listener.web import PublicRoutes

__all__ = ["Service"]

log = structlog.get_logger("listener.service")

MAINTENANCE_INTERVAL = 60.0
REPEAT_IGNORED = 0.25  # seconds: a second stop this soon is the same signal twice


@contextlib.asynccontextmanager
async def _site(app: web.Application | FastServer, host: str, port: int) -> AsyncIterator[int]:
    # Our shutdown bounds the drain (aiohttp's default 60 s outlasts any grace: NOTES).
    runner: web.AppRunner | web.ServerRunner
    if isinstance(app, web.Application):
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    else:  # the public port: aiohttp's low-level server (see PublicRoutes)
        runner = web.ServerRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # (the bound port: only here)
        yield sockets[0].getsockname()[1] if sockets else port
    finally:
        await runner.cleanup()


def public_routes(transports: list[Transport], *, max_body: int) -> PublicRoutes:
    """The public port's routes: the transports' (webhooks), JSON errors elsewhere."""
    routes = PublicRoutes()
    routes.held.budget = max(routes.held.budget, 4 * max_body)
    for transport in transports:
        transport.mount(routes)
    return routes


class Service:
    """The listener daemon. ``await Service(config).run()`` until :meth:`stop`."""

    def __init__(self, config: Config, *, config_file: Path | None = None) -> None:
        self.config = config
        # Masked in logs, and the sources' in what providers echo back.
        redact_also(secret_values(config), sources=source_secret_values(config))
        #: Re-read on SIGHUP (:meth:`reload`); ``None``: no file to re-read.
        self.config_file = config_file
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Task[Any]] = set()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._stop_at = float("inf")  # (monotonic) when stop() was first called
        self._skip_drain = asyncio.Event()  # a second SIGTERM/SIGINT: exit without waiting
        self.started = asyncio.Event()
        self.public_port: int | None = None
        self.admin_port: int | None = None
        self.journal: Journal | None = None
        self.publisher: Publisher | None = None
        self.admin: AdminApp | None = None
        self.transports: list[Transport] = []
        self.routes = PublicRoutes()  # (the public port's, built with the transports)
        #: cluster.enabled: holds the units (streams, polls) this replica runs.
        self.coordinator: Coordinator | None = None
        self.exit_pending = 0
        self._asyncapi: bytes | None = None

    @property
    def runtimes(self) -> list[SourceRuntime]:
        """Every supervised source runtime (stream connections, poll loops)."""
        return [r for t in self.transports for r in t.runtimes]

    @property
    def streams(self) -> list[SourceRuntime]:
        """The runtimes of websocket sources (tests and tools look at them)."""
        return [r for t in self.transports if t.kind == "websocket" for r in t.runtimes]

    def transport(self, kind: str) -> Transport | None:
        """The transport of ``kind``, when a source of that kind is configured."""
        return next((t for t in self.transports if t.kind == kind), None)

    def stop(self) -> None:
        """
        Begin the shutdown sequence (safe from a signal handler); called again, end the
        drain now (the rest waits in the journal), unless within :data:`REPEAT_IGNORED`:
        a signal sent to a process group (``timeout``, ``make run``) comes twice at once.
        """
        now = time.monotonic()
        if now - self._stop_at >= REPEAT_IGNORED:  # (never before the first)
            self._skip_drain.set()
        self._stop_at = min(self._stop_at, now)
        self._stop.set()

    def install_signal_handlers(self, *, hung_up: bool = False) -> None:
        """
        SIGTERM and SIGINT start the shutdown sequence; SIGHUP reloads secrets.
        ``hung_up``: one came before (the CLI noted it): reload now.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if hung_up:
            self._on_sighup()

    def _on_sighup(self) -> None:
        if self._stop.is_set():  # shutting down: nothing to reload into
            return
        task = asyncio.create_task(self.reload(), name="reload")
        self._reloads.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> ReloadPlan | None:
        """
        Re-read the configuration file and apply its new secrets and admin keys (CONTRACT
        §3); log every other change as needing a restart. A file that does not validate
        changes nothing: each problem is logged. Never raises.
        """
        async with self._reloading:
            try:
                return await self._reload()
            except Exception:  # a reload must never take the daemon down
                log.exception("config_reload_failed", note="the running configuration is kept")
                self.metrics.config_reloads.labels("failed").inc()
                return None

    async def _reload(self) -> ReloadPlan | None:
        if self.config_file is None:
            log.warning("config_reload_skipped", reason="started without a configuration file")
            return None
        try:
            fresh = await asyncio.to_thread(load_config, self.config_file)
        except ConfigError as exc:
            problems = exc.problems
        else:
            plan = plan_reload(self.config, fresh)
            # The new secrets with the running settings (a scheme changed too, which
            # needs a restart): applied only if that holds together, or not at all.
            if not (problems := recheck(plan.config)):
                return self._apply(plan)
        # One line per problem, as `check-config` prints them; no traceback.
        for problem in problems:
            log.error("config_reload_problem", problem=problem)
        log.error(
            "config_reload_failed", problems=len(problems), note="the running configuration is kept"
        )
        self.metrics.config_reloads.labels("failed").inc()
        return None

    def _apply(self, plan: ReloadPlan) -> ReloadPlan:
        """Hand the new secrets to the log redaction, the transports and the admin port."""
        # Before anything could log one.
        redact_also(secret_values(plan.config), sources=source_secret_values(plan.config))
        self._use_secrets(plan.config)
        self.config = plan.config
        for key in plan.restart:
            log.warning("config_change_needs_restart", key=key)
        self.metrics.config_restart_pending.set(len(plan.restart))
        self.metrics.config_reloads.labels("ok").inc()
        log.info("config_reloaded", applied=plan.rotated, needs_restart=plan.restart)
        return plan

    def _use_secrets(self, config: Config) -> None:
        for transport in self.transports:
            transport.use_secrets({s.name: s for s in config.sources})
        if self.admin is not None:
            self.admin.auth.use_keys(config.admin.api_keys)

    def source_states(self) -> dict[str, Mapping[str, Any]]:
        """Every source's state, by name, in the configuration's order."""
        states: dict[str, Mapping[str, Any]] = {}
        for transport in self.transports:
            states.update(transport.states())
        if self.coordinator is not None:
            states.update(self.coordinator.views())
        return {s.name: states[s.name] for s in self.config.sources if s.name in states}

    def poll_now(self, name: str) -> str:
        """
        Poll source ``name`` now: ``ok``, ``not_poll`` (another kind), ``not_found``, or
        ``not_held`` (cluster.enabled: another replica holds it).
        """
        if not any(s.name == name for s in self.config.sources):
            return "not_found"
        for runtime in self.runtimes:
            if runtime.name == name and callable(poll := getattr(runtime, "poll_now", None)):
                unit = self.coordinator.unit_of(runtime) if self.coordinator else None
                if unit is not None and not unit.held:
                    return "not_held"
                poll()
                return "ok"
        return "not_poll"

    def asyncapi(self) -> bytes:
        """The AsyncAPI document of this configuration (built once, on first request)."""
        if self._asyncapi is None:
            self._asyncapi = orjson.dumps(build_document(self.config))
        return self._asyncapi

    def _refresh_metrics(self) -> None:
        for name, state in self.source_states().items():
            self.metrics.set_source_status(name, str(state.get("status", "unknown")))
        if self.journal is not None:
            self.metrics.journal_pending.set(self.journal.pending_count)
            self.metrics.journal_deferred.set(self.journal.deferred_count)
            self.metrics.journal_bytes.set(self.journal.size_bytes)
        webhooks = self.transport("webhook")
        self.metrics.webhooks_in_flight.set(getattr(webhooks, "in_flight", 0))
        if self.admin is not None:
            for check, intake in (("all", False), ("intake", True)):
                self.metrics.ready.labels(check).set(self.admin.readiness(intake=intake)[0])
        with contextlib.suppress(RuntimeError):  # (no running loop: nothing to count)
            self.metrics.asyncio_tasks.set(len(asyncio.all_tasks()))

    async def run(self) -> None:
        """Run until :meth:`stop`, then shut down in order."""
        config = self.config
        fit_file_limit(config.http.max_connections)
        journal = Journal(config=config.journal, retry_after=config.http.retry_after, lock=True)
        if not await self._opened(journal):
            return
        async with journal:
            self.journal = journal
            journal.timed = self.metrics.journal_timed
            publisher = Publisher(config=config.broker, journal=journal, metrics=self.metrics)
            self.publisher = publisher
            context = TransportContext(
                http=config.http,
                journal=journal,
                metrics=self.metrics,
                units=config.cluster.enabled,
            )
            self.transports = build_transports(config, context)
            self.routes = public_routes(self.transports, max_body=config.http.max_body)
            if config.cluster.enabled:
                self.coordinator = Coordinator(
                    units=units_of(self.runtimes),
                    cluster=config.cluster,
                    broker=config.broker,
                    journal=journal,
                    publisher=publisher,
                    metrics=self.metrics,
                )
            coordinator = self.coordinator
            self.admin = AdminApp(
                config=config.admin,
                metrics=self.metrics,
                components={"broker": publisher.state, "journal": journal.state},
                sources=self.source_states,
                poll_now=self.poll_now,
                refresh=self._refresh_metrics,
                journal=journal,
                broker=config.broker,
                asyncapi=self.asyncapi,
            )
            if self.config is not config:
                # A SIGHUP while the journal opened applied its secrets to nothing yet.
                self._use_secrets(self.config)
            async with asyncio.TaskGroup() as tasks:
                publishing = tasks.create_task(publisher.run(), name="publisher")
                # Under cluster.enabled the coordinator runs each unit while it holds it.
                sourcing = [
                    tasks.create_task(supervised(r, metrics=self.metrics), name=f"source:{r.name}")
                    for r in (() if coordinator else self.runtimes)
                ]
                if coordinator is not None:
                    sourcing.append(tasks.create_task(coordinator.run(), name="cluster"))
                upkeep = tasks.create_task(self._maintenance(journal), name="maintenance")
                probe = tasks.create_task(watch_loop_lag(self.metrics.loop_lag_seconds), name="lag")
                async with (
                    _site(self.admin.app, config.admin.host, config.admin.port) as admin_port,
                    _site(
                        FastServer(
                            self.routes,
                            head_timeout=config.http.read_timeout,
                            max_connections=config.http.max_connections,
                            on_refused=self.metrics.public_refused.inc,
                            access_log=None,
                        ),
                        config.http.host,
                        config.http.port,
                    ) as public_port,
                ):
                    self.admin_port, self.public_port = admin_port, public_port
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
                    for transport in self.transports:
                        transport.stop_intake()
                    if coordinator is not None:
                        await coordinator.stop()  # units stopped, leases released
                    for task in sourcing:
                        task.cancel()
                    upkeep.cancel()
                    probe.cancel()
                    # 2. drain
                    await self._drain(publisher, journal)
                # 3. close the broker (sites closed by the context managers above)
                publishing.cancel()
                # aio-pika/aiormq can swallow a cancel that lands in a channel operation
                # while the broker drops the connection (the publisher then carries on):
                # cancel again until the task has ended, or SIGTERM would never exit.
                while not publishing.done():
                    await asyncio.wait({publishing}, timeout=0.1)
                    publishing.cancel()
        await deadline.settle(1.0)  # (broker operations given up on, before the exit)
        self.exit_pending = journal.pending_count
        log.info("shutdown_complete", pending=self.exit_pending)

    async def _opened(self, journal: Journal) -> bool:
        """Open the journal; ``False``: stopped first (it may wait for another's lock)."""
        opening = asyncio.ensure_future(journal.open())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # (run() itself: an open that finished is closed)
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                await journal.close()
            raise
        finally:
            stopping.cancel()
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await opening
        if opening.cancelled():
            log.info("shutdown_complete", note="stopped while the journal opened")
            return False
        return opening.result() is None  # (its error, if any, raised)

    async def _drain(self, publisher: Publisher, journal: Journal) -> None:
        started = time.monotonic()
        drained = asyncio.ensure_future(publisher.wait_drained())
        skipped = asyncio.ensure_future(self._skip_drain.wait())
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await asyncio.wait((drained, skipped), return_when=asyncio.FIRST_COMPLETED)
            if not drained.done():
                raise TimeoutError  # (told again to stop: as if the time were up)
            drained.result()  # (its error, as awaiting it gave)
        except TimeoutError:
            if not (journal.pending_count or journal.appending):  # (stopped again, none left)
                log.info("shutdown_drained", seconds=round(time.monotonic() - started, 3))
                return
            log.warning(
                "shutdown_drain_incomplete",
                pending=journal.pending_count + journal.appending,  # (appends still committing)
                note="the rest is published at the next start",
            )
        else:
            log.info("shutdown_drained", seconds=round(time.monotonic() - started, 3))
        finally:
            for waiter in (drained, skipped):
                waiter.cancel()

    async def _maintenance(self, journal: Journal) -> None:
        memory = Trimmer()
        while True:
            began = time.monotonic()
            try:
                deleted = await journal.prune()
                forgotten, early = await journal.make_room()
                await journal.recount()
            except Exception as exc:  # counted by the log; retention retries next round
                log.warning("journal_prune_failed", error=str(exc))
            else:
                if deleted:
                    log.info("journal_pruned", deleted=deleted)
                if forgotten or early:
                    log.warning(
                        "journal_room_made",
                        ids_forgotten=forgotten,
                        events_pruned=early,
                        note="the journal neared journal.max_size: dedupe ids and published"
                        " events inside retention went early, oldest first; raise max_size"
                        " or lower retention / dedupe_window",
                    )
            self._refresh_metrics()
            if trimmed := await memory.maybe_trim():  # (after a drain, a replay)
                before, after = trimmed
                level = log.info if before - after >= TRIM_NOTABLE else log.debug
                level(
                    "memory_trimmed",
                    resident_mib_before=round(before / 2**20, 1),
                    resident_mib_after=round(after / 2**20, 1),
                )
            # A round every interval, from start to start: a long one (retention behind)
            # is not followed by a full interval's rest too.
            await asyncio.sleep(max(1.0, MAINTENANCE_INTERVAL - (time.monotonic() - began)))
