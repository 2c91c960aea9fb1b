"""
End to end: the real listener in its own process, signed webhooks in, confirmed
CloudEvents out.

The listener runs as ``python -m listener run --config <tmp yaml>`` (uvloop, as in
production) with the journal on (``synchronous: full``), one ``getstoken`` webhook
source (standard-webhooks) and a fresh exchange on the local broker, to which a
fresh durable queue is bound ``#`` before the listener starts, so every event is
routed (the stream archive is off unless ``archive=True``, so the broker does the
same work per message as in ceiling B: one durable queue).

Measured:

* accepted: 2xx answers per second over the load (the generator's count and clock);
* confirmed: events the broker confirmed, counted from the start of the load until the
  journal has nothing pending and every received event is published (the listener's
  own counters, polled on its admin port every 20 ms once the load has stopped); this
  is the figure the ratios use;
* in queue: the same count, but until the bound queue held every journaled event (the
  broker's side: it enqueues a persistent message before confirming it); the gap
  between the two is how long confirms wait before the journal records them;
* the generator's p50/p99 response latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import yaml

from bench.common import (
    BROKER_URL,
    CONCURRENCY,
    WEBHOOK_PATH,
    WHSEC,
    CpuMeter,
    between_scrapes,
    broker_pid,
    cleanup_topology,
    declare_tap,
    fetch_metrics,
    fetch_metrics_text,
    free_port,
    parse_metrics,
    py_spy,
    python_module,
    queue_count,
    say,
    stop_child,
    thread_schedstat,
    unique,
    wait_ready,
    with_loadgen,
)
from bench.loadgen import LoadResult, RequestSet, run_load
from bench.paced import PacedResult, paced_load
from bench.pinning import own_core

__all__ = ["EndToEnd", "accept_latency", "end_to_end", "listener_config"]

POLL = 0.02


@dataclass
class EndToEnd:
    """What one end-to-end run measured."""

    load: LoadResult
    received: int  # events the listener journaled (its counter)
    confirmed: int  # events the broker confirmed (its counter)
    queued: int  # messages in the bound queue afterwards
    confirm_seconds: float  # start of the load until the journal had nothing pending
    in_queue_seconds: float  # start of the load until the queue held every event
    drain_seconds: float  # end of the load until then
    pending_at_end_of_load: int
    cores: dict[str, float]
    counters: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    log_tail: str = ""

    @property
    def accepted_rate(self) -> float:
        """2xx answers per second, as the generator counted them."""
        return self.load.rate

    @property
    def confirmed_rate(self) -> float:
        """Broker-confirmed events per second, load start to last confirm."""
        return self.confirmed / self.confirm_seconds if self.confirm_seconds > 0 else 0.0

    @property
    def in_queue_rate(self) -> float:
        """Events per second, load start until the queue held them all."""
        return self.confirmed / self.in_queue_seconds if self.in_queue_seconds > 0 else 0.0


def listener_config(
    directory: Path, *, http_port: int, admin_port: int, exchange: str, archive: bool
) -> dict[str, Any]:
    """The listener's configuration for the run (CONTRACT §3)."""
    return {
        "log": {"level": "info", "format": "json"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "broker": {"url": BROKER_URL, "exchange": exchange, "archive": {"enabled": archive}},
        "journal": {"path": str(directory / "journal.db"), "synchronous": "full"},
        "shutdown_timeout": "20s",
        "sources": [
            {
                "name": "gst",
                "kind": "webhook",
                "provider": "getstoken",
                "path": WEBHOOK_PATH,
                "environment": "production",
                "signature": {"scheme": "standard-webhooks", "secrets": [WHSEC]},
            }
        ],
    }


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    url: str
    admin: str
    exchange: str
    queue: str
    log_path: Path
    exit_code: int | None = None  # once stopped


@contextlib.asynccontextmanager
async def _listener(
    directory: Path, *, archive: bool, broker: bool = True
) -> AsyncIterator[_Running]:
    """
    The listener in its own process on a fresh exchange with a tap queue, until ready;
    ``broker=False``: pointed at a port nobody listens on, so it journals only (ready
    for intake, CONTRACT §8).
    """
    exchange = unique("bench.e2e")
    queue = f"{exchange}.tap"
    http_port, admin_port = free_port(), free_port()
    settings = listener_config(
        directory, http_port=http_port, admin_port=admin_port, exchange=exchange, archive=archive
    )
    if not broker:
        settings["broker"]["url"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        settings["shutdown_timeout"] = "1s"  # (the drain can only time out: not waited for)
    config = directory / "listener.yaml"
    config.write_text(yaml.safe_dump(settings))
    log_path = directory / "listener.log"
    await declare_tap(exchange, queue)
    proc: subprocess.Popen[bytes] | None = None
    running: _Running | None = None
    try:
        with log_path.open("wb") as log:
            # Popen returns at once; the listener's process is what we measure.
            proc = subprocess.Popen(  # noqa: ASYNC220
                python_module("listener", "run", "--config", str(config)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        running = _Running(
            proc,
            f"http://127.0.0.1:{http_port}",
            f"http://127.0.0.1:{admin_port}",
            exchange,
            queue,
            log_path,
        )
        async with aiohttp.ClientSession() as session:
            ready = "/readyz" if broker else "/readyz?for=intake"
            await wait_ready(session, running.admin, proc, within=30.0, path=ready)
        yield running
    finally:
        if proc is not None:
            code = stop_child(proc)
            if running is not None:
                running.exit_code = code
        await cleanup_topology(exchange, queue)


async def _run(
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int,
    archive: bool,
    profile: Path | None,
    directory: Path,
) -> EndToEnd:
    async with _listener(directory, archive=archive) as running:
        proc, admin, queue = running.proc, running.admin, running.queue
        async with aiohttp.ClientSession() as session:
            meter = CpuMeter()
            meter.add("listener", proc.pid)
            meter.add("broker", broker_pid())
            spy = py_spy(proc.pid, seconds, profile) if profile is not None else None
            meter.start()
            started = time.monotonic()
            load = await asyncio.to_thread(
                run_load, running.url, requests, seconds=seconds, concurrency=concurrency
            )
            load_ended = time.monotonic()
            meter.stop()
            counters = await fetch_metrics(session, admin)
            pending_at_end = int(counters.get("listener_journal_pending", 0))
            # Until nothing is pending and every journaled event is confirmed (the
            # journal's view), and until the queue holds every journaled event (the
            # broker's view: a persistent message is enqueued before it is confirmed).
            deadline = load_ended + 120.0
            in_queue_at: float | None = None
            connection = await aio_pika.connect(BROKER_URL)
            try:
                channel = await connection.channel()
                while True:
                    counters = await fetch_metrics(session, admin)
                    now = time.monotonic()
                    received = counters.get("listener_events_received_total", 0.0)
                    published = counters.get("listener_events_published_total", 0.0)
                    pending = counters.get("listener_journal_pending", 0.0)
                    if in_queue_at is None:
                        declared = await channel.declare_queue(queue, passive=True)
                        if (declared.declaration_result.message_count or 0) >= received:
                            in_queue_at = now
                    if pending == 0 and published >= received and in_queue_at is not None:
                        confirmed_at = now
                        break
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(
                            f"the listener did not drain: pending {pending:.0f}, "
                            f"received {received:.0f}, published {published:.0f}"
                        )
                    await asyncio.sleep(POLL)
            finally:
                await connection.close()
            # A request still in the listener when the generator stopped could land just
            # after the poll: look once more after a short pause.
            await asyncio.sleep(0.2)
            counters = await fetch_metrics(session, admin)
            if counters.get("listener_events_received_total", 0.0) > received:
                say("late arrivals after the drain; the confirmed count includes them")
        if spy is not None:
            spy.wait()
        queued = await queue_count(queue)
    log_tail = "\n".join(running.log_path.read_text(errors="replace").splitlines()[-20:])
    return EndToEnd(
        load=load,
        received=int(counters.get("listener_events_received_total", 0)),
        confirmed=int(counters.get("listener_events_published_total", 0)),
        queued=queued,
        confirm_seconds=confirmed_at - started,
        in_queue_seconds=in_queue_at - started,
        drain_seconds=confirmed_at - load_ended,
        pending_at_end_of_load=pending_at_end,
        cores=with_loadgen(meter.cores(), load),
        counters=counters,
        exit_code=running.exit_code,
        log_tail=log_tail,
    )


COMMIT = "listener_journal_commit_seconds"
# Where a paced request's time goes inside the listener: (label, histogram, quantile).
INSIDE = (
    ("journal wait p50", "listener_journal_wait_seconds", 0.5),
    ("p99", "listener_journal_wait_seconds", 0.99),
    ("journal commit p99", COMMIT, 0.99),
    ("event loop lag p99", "listener_event_loop_lag_seconds", 0.99),
)


async def _paced(
    requests: RequestSet,
    *,
    rate: float,
    seconds: float,
    concurrency: int,
    directory: Path,
    broker: bool,
    pin: bool,
) -> PacedResult:
    async with (
        _listener(directory, archive=False, broker=broker) as running,
        aiohttp.ClientSession() as session,
    ):
        cores = own_core(running.proc.pid) if pin else contextlib.nullcontext()
        with cores:
            before = await fetch_metrics_text(session, running.admin)
            loop_before, began = thread_schedstat(running.proc.pid), time.monotonic()
            result = await asyncio.to_thread(
                paced_load,
                running.url,
                requests,
                rate=rate,
                seconds=seconds,
                connections=concurrency,
            )
            loop_after, window = thread_schedstat(running.proc.pid), time.monotonic() - began
            after = await fetch_metrics_text(session, running.admin)
    # (over the generator's whole call, its start and drain included, when the loop is
    # nearly idle: the shares read somewhat low, the waiting more than the running)
    result.on_cpu, result.run_queue = (
        (b - a) / window for a, b in zip(loop_before, loop_after, strict=True)
    )
    for label, histogram, q in INSIDE:
        (value,) = between_scrapes(before, after, histogram, q)
        if value is not None:
            result.inside[label] = value * 1000
    totals = parse_metrics(before), parse_metrics(after)
    result.commits, result.commit_seconds = (
        totals[1].get(f"{COMMIT}_{part}", 0.0) - totals[0].get(f"{COMMIT}_{part}", 0.0)
        for part in ("count", "sum")
    )
    return result


def accept_latency(
    requests: RequestSet,
    *,
    rate: float,
    seconds: float,
    concurrency: int = CONCURRENCY,
    broker: bool = True,
    pin: bool = False,
) -> PacedResult:
    """
    The listener under an open-loop load of ``rate`` requests per second (the
    performance issue's goal 3: at half its sustained maximum, p99 < 10 ms): latency
    from each request's due time to its 2xx, so queueing counts. ``broker=False``: with
    no broker reachable, so it journals and publishes nothing (the broker's share of the
    cores and the publisher's work both left out). ``pin=True``: the listener on a core
    of its own, the broker and the generator on the others (:mod:`bench.pinning`).

    Raises:
        bench.pinning.NotPinned: ``pin``, and the cores could not be split here.
    """
    with tempfile.TemporaryDirectory(prefix="bench-paced-") as tmp:
        return asyncio.run(
            _paced(
                requests,
                rate=rate,
                seconds=seconds,
                concurrency=concurrency,
                directory=Path(tmp),
                broker=broker,
                pin=pin,
            )
        )


def end_to_end(
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int = CONCURRENCY,
    archive: bool = False,
    profile: Path | None = None,
) -> EndToEnd:
    """Run the listener and drive it; see the module docstring for what is measured."""
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        return asyncio.run(
            _run(
                requests,
                seconds=seconds,
                concurrency=concurrency,
                archive=archive,
                profile=profile,
                directory=Path(tmp),
            )
        )
