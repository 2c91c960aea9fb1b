"""
Streams: the real listener holding one Layerx402 WebSocket source that a simulator feeds
as fast as the listener reads, beside a bare websockets client on the same simulator.

Every part runs in its own process, the listener and the bare client on uvloop:

* the simulator (``python -m bench.streams simulate --port N [--rate R]``, on asyncio's
  own loop, as its ``run_standalone`` runs it): the project's
  :class:`~listener.simulators.layerx402.Layerx402Simulator`, ``record=False``,
  compression off, at ``rate=0``: each subscription key produces as fast as its
  subscribers read (its per-connection queue is bounded, so a slow reader gets TCP
  backpressure). It stamps every event frame with its wall-clock time just before
  handing it to the socket, as an extra ``data`` field ``sent_us`` (CONTRACT §6: extra
  fields are kept, so the stamp reaches the CloudEvent and the journal). An integer
  of microseconds: a float of milliseconds with three decimals has 16 significant
  digits, which the handler reads again number by number (``handlers.exact_numbers``,
  ~15 us a frame) as no Layerx402 frame needs (its decimals are strings);
* the ceiling (``python -m bench.streams bare ...``): a bare websockets client,
  compression off, one connection: authenticates, subscribes, counts event frames (and
  reads ``sent_us`` from one in 8), nothing else;
* the listener: ``python -m listener run`` with one ``layerx402`` stream source holding
  the same subscriptions on one connection, journal on with ``synchronous: full``, a
  fresh exchange with a durable queue bound ``#`` (the stream archive off unless
  ``archive=True``, as in the webhook part), first with one subscription, then four
  (trades for two mints, token for one mint, portfolio for one wallet); then, as ``Lp``,
  with one subscription from a second simulator paced at half the flat-out confirmed
  rate, to show the lag at a rate the listener sustains; and, as ``Bp``, ceiling B's
  publisher paced at that same rate with the listener's confirm window, timing each
  publish -> confirm: what the broker's confirms of persistent messages alone take at
  that rate, the floor under the listener's receipt -> confirm lag.

Each run waits for the first event, lets ``warmup`` seconds pass, then measures a
fixed window:

* journaled / confirmed: the deltas of ``listener_events_received_total`` (an event is
  counted when its append is submitted; at most ``journal_window`` = 512 appends are in
  flight) and ``listener_events_published_total`` (broker confirms) over the window,
  from the listener's ``/metrics``;
* lag, from the journal after the run: server send (``sent_us``) → listener receipt
  (``received_at``) over the events received in the window, and server send → broker
  confirm (``published_at``, when the listener recorded the confirm) over the events
  confirmed in the window; and the listener's own ``listener_event_lag_seconds``
  histogram (receipt → broker confirm) over the window, interpolated inside its
  buckets, so no finer than their bounds;
* peak RSS: ``VmHWM`` of the listener's process at the end of the window;
* CPU per process over the window.

Flat out, the listener reads faster than it publishes: the journal absorbs the
difference (CONTRACT §8) and its backlog grows for as long as the run lasts, so the
flat-out confirm lag is that queue, and grows with the window. Every buffer between the
simulator's socket and the listener (kernel socket buffers, websockets' 16-frame queue)
is full too, so send → receipt is queueing in front of the listener, not network time;
the bare client shows what the transport alone adds at its own, higher rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.ceilings import PublishResult, ceiling_b
from bench.common import (
    BROKER_URL,
    CONFIRM_WINDOW,
    MESSAGE_SIZE,
    NOISE,
    CpuMeter,
    broker_pid,
    bucket_quantile,
    child,
    cleanup_topology,
    declare_tap,
    describe_cores,
    fetch_metrics_text,
    fmt_bytes,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    free_port,
    parse_buckets,
    parse_metrics,
    peak_rss,
    py_spy,
    python_module,
    run_uvloop,
    say,
    stop_child,
    table,
    unique,
    wait_port,
    wait_ready,
)

__all__ = ["BareRun", "ListenerRun", "StreamPart", "report", "run"]

# At least this share of the lower ceiling, min(bare websockets, B) (issue 3).
TARGET = 0.5
# Issue 13, goal 5: four subscriptions flat out, at least this many times B. Judged on
# min(journaled, confirmed) over the window: the confirms alone include the backlog
# the warm-up left in the journal (13,824 pending at the start of one run), which the
# window drains; what came in is the rate the listener sustains.
GOAL_L4_OVER_B = 1.2
# After the warm-up, wait (this long at most) until fewer than this many are pending.
SETTLE_MAX, SETTLED_PENDING = 15.0, 4096
# The paced run: this share of the flat-out confirmed rate (one subscription), at most
# this many seconds.
PACED_SHARE = 0.5
PACED_SECONDS = 5.0
# Goal for the paced run's receipt -> broker confirm p99 (issue 13, goal 5).
PACED_LAG_GOAL_MS = 50.0
# The paced bare publisher keeps as many in flight as the listener may (its default
# broker.confirm_window), so both wait only for the broker.
PACED_WINDOW = 2048
API_KEY = "bench-layerx402-key"
SOURCE = "lx"
LAG = "listener_event_lag_seconds"
# The broker's share of it: the publish written -> its confirm.
PUBLISH = "listener_publish_seconds"
# Subscriptions per run; the listener and the bare client hold the same ones.
_SOL = "So11111111111111111111111111111111111111112"
_BONK = "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263"
_USDC = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
_WALLET = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
SUBSCRIPTIONS: dict[int, tuple[dict[str, Any], ...]] = {
    1: ({"channel": "trades", "params": {"mint": _SOL}},),
    4: (
        {"channel": "trades", "params": {"mint": _SOL}},
        {"channel": "trades", "params": {"mint": _BONK}},
        {"channel": "token", "params": {"mint": _USDC}},
        {"channel": "portfolio", "params": {"wallet": _WALLET}},
    ),
}
_EVENT = b'{"type":"event"'
_PING = b'{"type":"ping"'
_SENT = b'"sent_us":'
# The bare client reads sent_us from one event frame in this many.
_SAMPLE_EVERY = 8


# -- the simulator's process ---------------------------------------------------------------


def _stamping(send: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap a connection's ``send``: event frames get ``"sent_us"`` as the last data field."""

    async def stamped(message: Any, text: bool | None = None) -> None:
        if isinstance(message, bytes) and message.startswith(_EVENT):
            # An event frame ends with the data object's "}" and the frame's "}".
            message = b'%s,"sent_us":%d}}' % (message[:-2], time.time_ns() // 1000)
        await send(message, text=text)

    return stamped


async def _simulate(port: int, rate: float = 0.0) -> None:
    from websockets.asyncio.server import ServerConnection  # noqa: PLC0415

    from listener.dev.simulators.layerx402 import Layerx402Simulator  # noqa: PLC0415

    class Stamping(Layerx402Simulator):
        async def _handle(self, ws: ServerConnection) -> None:
            ws.send = _stamping(ws.send)  # type: ignore[method-assign,assignment]
            await super()._handle(ws)

    simulator = Stamping(port=port, api_keys={API_KEY}, rate=rate, record=False, compression=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with simulator:
        await stop.wait()


# -- the ceiling: a bare websockets client ---------------------------------------------------


@dataclass
class BareRun:
    """What the bare client counted in its window."""

    subscriptions: int
    frames: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    rss: int | None
    cores: dict[str, float]

    @property
    def rate(self) -> float:
        """Event frames read per second."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


async def _bare(
    url: str, subscriptions: int, warmup: float, seconds: float, pids: dict[str, int]
) -> dict[str, Any]:
    from websockets.asyncio.client import connect  # noqa: PLC0415

    from handlers.layerx402 import auth_frame, pong_frame, subscribe_frame  # noqa: PLC0415

    meter = CpuMeter()
    for role, pid in pids.items():
        meter.add(role, pid)
    async with connect(url, compression=None, max_size=2**20, open_timeout=10) as ws:
        await ws.send(auth_frame(API_KEY))
        answer = await ws.recv(decode=False)
        if b"auth_ok" not in answer:
            raise RuntimeError(f"the simulator refused the key: {answer[:200]!r}")
        for i, sub in enumerate(SUBSCRIPTIONS[subscriptions]):
            await ws.send(subscribe_frame(f"bare-{i}", sub["channel"], sub["params"]))
        recv = ws.recv
        clock = time.monotonic
        first: float | None = None
        while True:  # warm-up: from the first event frame
            raw = await recv(decode=False)
            if raw.startswith(_EVENT):
                now = clock()
                first = now if first is None else first
                if now - first >= warmup:
                    break
            elif raw.startswith(_PING):
                await ws.send(pong_frame(orjson.loads(raw)["ts"]))
        meter.start()
        started = clock()
        end = started + seconds
        frames = 0
        lags: list[float] = []
        while True:
            raw = await recv(decode=False)
            if raw.startswith(_EVENT):
                frames += 1
                if frames % _SAMPLE_EVERY == 0:
                    at = raw.rfind(_SENT)
                    lags.append(time.time() * 1000 - int(raw[at + len(_SENT) : -2]) / 1000)
                if clock() >= end:
                    break
            elif raw.startswith(_PING):
                await ws.send(pong_frame(orjson.loads(raw)["ts"]))
        elapsed = clock() - started
        meter.stop()
        # No close handshake: it would wait behind every frame still buffered for us.
        ws.transport.abort()
    p50, p99 = _percentiles(lags)
    return {
        "frames": frames,
        "seconds": elapsed,
        "p50_ms": p50,
        "p99_ms": p99,
        "rss": peak_rss(os.getpid()),
        "cores": meter.cores(),
    }


def bare_client(
    url: str, subscriptions: int, *, warmup: float, seconds: float, simulator: int
) -> BareRun:
    """Run the bare client in a subprocess for ``warmup`` + ``seconds``; what it counted."""
    argv = python_module(
        "bench.streams",
        "bare",
        "--url",
        url,
        "--subscriptions",
        str(subscriptions),
        "--warmup",
        str(warmup),
        "--seconds",
        str(seconds),
        "--simulator-pid",
        str(simulator),
        "--broker-pid",
        str(broker_pid() or 0),
    )
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True, timeout=warmup + seconds + 60)
    data = json.loads(out.stdout)
    return BareRun(subscriptions=subscriptions, **data)


# -- the listener --------------------------------------------------------------------------


@dataclass
class ListenerRun:
    """What one listener run measured over its window."""

    subscriptions: int
    seconds: float
    received: int  # events journaled in the window (listener_events_received_total)
    confirmed: int  # broker confirms in the window (listener_events_published_total)
    pending_before: int
    pending_after: int
    lag_p50_ms: float | None  # listener_event_lag_seconds: receipt -> broker confirm
    lag_p99_ms: float | None
    broker_ms: tuple[float | None, float | None]  # listener_publish_seconds p50, p99
    receipt_ms: tuple[float | None, float | None]  # send -> receipt, received in the window
    confirm_ms: tuple[float | None, float | None]  # send -> broker confirm, confirmed in it
    event_size: int  # average CloudEvent body, bytes
    rss: int | None
    cores: dict[str, float]
    counters: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    log_tail: str = ""

    @property
    def received_rate(self) -> float:
        """Events journaled per second over the window."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def confirmed_rate(self) -> float:
        """Events the broker confirmed per second over the window."""
        return self.confirmed / self.seconds if self.seconds > 0 else 0.0


def listener_config(
    directory: Path,
    *,
    url: str,
    subscriptions: int,
    http_port: int,
    admin_port: int,
    exchange: str,
    archive: bool,
) -> dict[str, Any]:
    """The listener's configuration for a stream run (CONTRACT §3)."""
    return {
        "log": {"level": "info", "format": "json"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "broker": {"url": BROKER_URL, "exchange": exchange, "archive": {"enabled": archive}},
        "journal": {"path": str(directory / "journal.db"), "synchronous": "full"},
        # What is still pending after the window is not measured: do not wait to drain it.
        "shutdown_timeout": "2s",
        "sources": [
            {
                "name": SOURCE,
                "kind": "websocket",
                "provider": "layerx402",
                "url": url,
                "api_key": API_KEY,
                "subscriptions": list(SUBSCRIPTIONS[subscriptions]),
            }
        ],
    }


async def _scrape(session: aiohttp.ClientSession, admin: str) -> tuple[float, float, str]:
    """The metrics page and the monotonic and wall clocks at the middle of the request."""
    before, wall_before = time.monotonic(), time.time()
    text = await fetch_metrics_text(session, admin)
    after, wall_after = time.monotonic(), time.time()
    return (before + after) / 2, (wall_before + wall_after) / 2, text


async def _listener(
    url: str,
    subscriptions: int,
    *,
    warmup: float,
    seconds: float,
    archive: bool,
    simulator: int,
    profile: Path | None,
    directory: Path,
) -> ListenerRun:
    exchange = unique("bench.streams")
    queue = f"{exchange}.tap"
    http_port, admin_port = free_port(), free_port()
    config = directory / "listener.yaml"
    config.write_text(
        yaml.safe_dump(
            listener_config(
                directory,
                url=url,
                subscriptions=subscriptions,
                http_port=http_port,
                admin_port=admin_port,
                exchange=exchange,
                archive=archive,
            )
        )
    )
    log_path = directory / "listener.log"
    admin = f"http://127.0.0.1:{admin_port}"
    await declare_tap(exchange, queue)
    proc: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("wb") as log:
            # Popen returns at once; the listener's process is what we measure.
            proc = subprocess.Popen(  # noqa: ASYNC220
                python_module("listener", "run", "--config", str(config)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin, proc, within=30.0)
            deadline = time.monotonic() + 15.0
            while True:  # the first event, then the warm-up
                counters = parse_metrics(await fetch_metrics_text(session, admin))
                if counters.get("listener_events_received_total", 0.0) > 0:
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the listener received no event within 15 s")
                await asyncio.sleep(0.02)
            await asyncio.sleep(warmup)
            # Then until the start's backlog is published (the stream flows before the
            # publisher has connected and declared): a window that began with 13,824
            # pending spent part of itself draining them, confirms over intake.
            settle = time.monotonic() + SETTLE_MAX
            while time.monotonic() < settle:
                counters = parse_metrics(await fetch_metrics_text(session, admin))
                if counters.get("listener_journal_pending", 0.0) < SETTLED_PENDING:
                    break
                await asyncio.sleep(0.1)
            meter = CpuMeter()
            meter.add("listener", proc.pid)
            meter.add("simulator", simulator)
            meter.add("broker", broker_pid())
            meter.start()
            spy = py_spy(proc.pid, seconds, profile) if profile is not None else None
            t0, w0, text0 = await _scrape(session, admin)
            await asyncio.sleep(seconds)
            t1, w1, text1 = await _scrape(session, admin)
            meter.stop()
            rss = peak_rss(proc.pid)
        if spy is not None:
            await asyncio.to_thread(spy.wait)
    finally:
        exit_code = await asyncio.to_thread(stop_child, proc) if proc is not None else None
        await cleanup_topology(exchange, queue)
    m0, m1 = parse_metrics(text0), parse_metrics(text1)
    b0, b1 = parse_buckets(text0, LAG), parse_buckets(text1, LAG)
    p50, p99 = bucket_quantile(b0, b1, 0.5), bucket_quantile(b0, b1, 0.99)
    c0, c1 = parse_buckets(text0, PUBLISH), parse_buckets(text1, PUBLISH)
    broker = [bucket_quantile(c0, c1, q) for q in (0.5, 0.99)]
    receipt, confirm, size = _journal_lags(directory / "journal.db", w0, w1)
    log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])

    def delta(name: str) -> int:
        return int(m1.get(name, 0.0) - m0.get(name, 0.0))

    return ListenerRun(
        subscriptions=subscriptions,
        seconds=t1 - t0,
        received=delta("listener_events_received_total"),
        confirmed=delta("listener_events_published_total"),
        pending_before=int(m0.get("listener_journal_pending", 0.0)),
        pending_after=int(m1.get("listener_journal_pending", 0.0)),
        lag_p50_ms=None if p50 is None else p50 * 1000,
        lag_p99_ms=None if p99 is None else p99 * 1000,
        broker_ms=(
            None if broker[0] is None else broker[0] * 1000,
            None if broker[1] is None else broker[1] * 1000,
        ),
        receipt_ms=receipt,
        confirm_ms=confirm,
        event_size=size,
        rss=rss,
        cores=meter.cores(),
        counters={name: m1[name] - m0.get(name, 0.0) for name in m1},
        exit_code=exit_code,
        log_tail=log_tail,
    )


def _journal_lags(
    path: Path, start: float, end: float
) -> tuple[tuple[float | None, float | None], tuple[float | None, float | None], int]:
    """
    From the listener's journal (after it stopped): p50/p99 in ms of server send →
    receipt over the events received in [start, end), and of server send → broker
    confirm over the events confirmed in [start, end); the average CloudEvent size.
    """
    receipt: list[float] = []
    confirm: list[float] = []
    sizes = 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT body, received_at, published_at FROM events WHERE kind = 'event'"
            " AND ((received_at >= ?1 AND received_at < ?2)"
            " OR (published_at >= ?1 AND published_at < ?2))",
            (start, end),
        )
        for body, received_at, published_at in rows:
            sent_us = orjson.loads(body)["data"].get("sent_us")
            if not isinstance(sent_us, int):
                continue
            sent = sent_us / 1000
            if start <= received_at < end:
                sizes += len(body)
                receipt.append(received_at * 1000 - sent)
            if published_at is not None and start <= published_at < end:
                confirm.append(published_at * 1000 - sent)
    count = len(receipt)
    return _percentiles(receipt), _percentiles(confirm), sizes // count if count else 0


def _percentiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (None, None)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


# -- the part --------------------------------------------------------------------------------


@dataclass
class StreamPart:
    """Both subscription counts: the bare client and the listener on each; the paced run."""

    warmup: float
    seconds: float
    bare: dict[int, BareRun]
    listener: dict[int, ListenerRun]
    paced_rate: float = 0.0
    paced: ListenerRun | None = None
    # B paced at the same rate: what the broker's confirms alone take there.
    paced_b: PublishResult | None = None


def _simulator(port: int, directory: Path, rate: float = 0.0) -> Any:
    argv = python_module("bench.streams", "simulate", "--port", str(port), "--rate", f"{rate:g}")
    return child(argv, log=directory / f"simulator-{port}.log")


def run(
    *,
    seconds: float,
    warmup: float = 1.0,
    archive: bool = False,
    profile: Path | None = None,
    paced: bool = True,
) -> StreamPart:
    """
    One simulator flat out; per subscription count, the bare client and then the
    listener. Then (``paced``) the listener on one subscription of a second simulator
    paced at :data:`PACED_SHARE` of the flat-out confirmed rate, for at most
    :data:`PACED_SECONDS`: the lag at a rate it sustains.
    """
    part = StreamPart(warmup=warmup, seconds=seconds, bare={}, listener={})
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        directory = Path(tmp)
        port = free_port()
        with _simulator(port, directory) as simulator:
            wait_port(port, proc=simulator)
            url = f"ws://127.0.0.1:{port}/ws"
            for count in SUBSCRIPTIONS:
                label = f"{count} subscription{'s' if count > 1 else ''}"
                say(f"streams: bare websockets client, {label}, {seconds:g} s")
                bare = bare_client(
                    url, count, warmup=warmup, seconds=seconds, simulator=simulator.pid
                )
                part.bare[count] = bare
                say(f"streams: bare client {bare.rate:,.0f} frames/s")
                say(f"streams: the listener, {label}, {seconds:g} s")
                done = _listener_run(
                    url,
                    count,
                    warmup=warmup,
                    seconds=seconds,
                    archive=archive,
                    simulator=simulator.pid,
                    profile=profile if count == max(SUBSCRIPTIONS) else None,
                    directory=directory / f"listener-{count}",
                )
                part.listener[count] = done
                say(
                    f"streams: listener journaled {done.received_rate:,.0f}/s, "
                    f"confirmed {done.confirmed_rate:,.0f}/s"
                )
        first = part.listener[min(SUBSCRIPTIONS)]
        if paced and first.confirmed_rate > 0:
            part.paced_rate = round(first.confirmed_rate * PACED_SHARE, -2)
            window = min(seconds, PACED_SECONDS)
            say(f"streams: the listener paced at {part.paced_rate:,.0f}/s, {window:g} s")
            port = free_port()
            with _simulator(port, directory, part.paced_rate) as simulator:
                wait_port(port, proc=simulator)
                part.paced = _listener_run(
                    f"ws://127.0.0.1:{port}/ws",
                    min(SUBSCRIPTIONS),
                    warmup=warmup,
                    seconds=window,
                    archive=archive,
                    simulator=simulator.pid,
                    profile=None,
                    directory=directory / "listener-paced",
                )
            say(f"streams: the bare aio-pika publisher paced at {part.paced_rate:,.0f}/s")
            part.paced_b = ceiling_b(seconds=window, window=PACED_WINDOW, rate=part.paced_rate)
    return part


def _listener_run(url: str, subscriptions: int, *, directory: Path, **kwargs: Any) -> ListenerRun:
    directory.mkdir()
    return asyncio.run(_listener(url, subscriptions, directory=directory, **kwargs))


def main() -> None:
    """``simulate --port N`` or ``bare ...`` (the child processes of :func:`run`)."""
    parser = argparse.ArgumentParser(prog="python -m bench.streams")
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser("simulate")
    simulate.add_argument("--port", type=int, required=True)
    simulate.add_argument(
        "--rate", type=float, default=0.0, help="events/s per subscription key (0: flat out)"
    )
    bare = commands.add_parser("bare")
    bare.add_argument("--url", required=True)
    bare.add_argument("--subscriptions", type=int, choices=sorted(SUBSCRIPTIONS), default=1)
    bare.add_argument("--warmup", type=float, default=1.0)
    bare.add_argument("--seconds", type=float, default=10.0)
    bare.add_argument("--simulator-pid", type=int, default=0)
    bare.add_argument("--broker-pid", type=int, default=0)
    args = parser.parse_args()
    if args.command == "simulate":
        # The default loop, as the simulator's own run_standalone: on uvloop its paced
        # producer spins through sub-millisecond sleeps (a core at 4,000 events/s against
        # 0.2 on asyncio); flat out the two are equally fast.
        asyncio.run(_simulate(args.port, args.rate))
        return
    pids = {"client": os.getpid()}
    if args.simulator_pid:
        pids["simulator"] = args.simulator_pid
    if args.broker_pid:
        pids["broker"] = args.broker_pid
    result = run_uvloop(
        lambda: _bare(args.url, args.subscriptions, args.warmup, args.seconds, pids)
    )
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()


# -- the report ------------------------------------------------------------------------------


def report(part: StreamPart, b: PublishResult, *, archive: bool) -> list[str]:
    """Print the stream table, the ratios and the target line; return the warnings."""
    sizes = [r.event_size for r in part.listener.values() if r.event_size]
    rows: list[list[str]] = [
        [
            f"B    aio-pika publish, persistent {MESSAGE_SIZE} B, confirms w={CONFIRM_WINDOW}",
            fmt_rate(b.rate),
            "-",
            "-",
            "-",
            describe_cores(b.cores),
        ]
    ]
    for count in SUBSCRIPTIONS:
        bare = part.bare.get(count)
        if bare is not None:
            rows.append(
                [
                    f"WS{count}  bare websockets: event frames [send -> client]",
                    fmt_rate(bare.rate),
                    fmt_ms(bare.p50_ms),
                    fmt_ms(bare.p99_ms),
                    fmt_bytes(bare.rss),
                    describe_cores(bare.cores),
                ]
            )
        done = part.listener.get(count)
        if done is not None:
            rows += _listener_rows(f"L{count}", done)
    if part.paced is not None:
        rows += _listener_rows("Lp", part.paced)
    if part.paced_b is not None and part.paced_b.confirm_ms is not None:
        rows.append(
            [
                f"Bp   aio-pika publish paced, w={PACED_WINDOW} [publish -> broker confirm]",
                fmt_rate(part.paced_b.rate),
                fmt_ms(part.paced_b.confirm_ms[0]),
                fmt_ms(part.paced_b.confirm_ms[1]),
                "",
                describe_cores(part.paced_b.cores),
            ]
        )
    ratios: list[list[str]] = []
    scores: dict[int, float] = {}
    for count in SUBSCRIPTIONS:
        bare = part.bare.get(count)
        done = part.listener.get(count)
        if bare is None or done is None:
            continue
        lower = min(bare.rate, b.rate)
        which = "WS" if bare.rate <= b.rate else "B"
        scores[count] = done.confirmed_rate / lower if lower > 0 else 0.0
        ratios += [
            [
                f"L{count} / WS{count} (bare websockets)",
                fmt_ratio(_ratio(done.confirmed_rate, bare.rate)),
                fmt_ratio(_ratio(done.received_rate, bare.rate)),
            ],
            [
                f"L{count} / B (aio-pika publisher)",
                fmt_ratio(_ratio(done.confirmed_rate, b.rate)),
                fmt_ratio(_ratio(done.received_rate, b.rate)),
            ],
            [
                f"L{count} / min(WS{count}, B) = {which}",
                fmt_ratio(scores[count]),
                fmt_ratio(_ratio(done.received_rate, lower)),
            ],
        ]

    print(
        f"stream benchmark: {part.seconds:g} s windows after {part.warmup:g} s of warm-up; "
        "Layerx402 simulator flat out (rate 0), one connection, compression off"
    )
    print(
        f"CloudEvent ~{max(sizes) if sizes else 0} B (B publishes {MESSAGE_SIZE} B); "
        f"journal synchronous=full; stream archive {'on' if archive else 'off'}; "
        "1 = trades(SOL); 4 = trades(SOL), trades(BONK), token(USDC), portfolio(wallet)"
    )
    if part.paced is not None:
        print(
            f"Lp = 1 subscription from a simulator paced at {part.paced_rate:,.0f}/s "
            f"({PACED_SHARE:g} x L1 confirmed), {part.paced.seconds:.0f} s window: "
            "the lag at a rate the listener sustains"
        )
    print()
    print(
        table(
            rows,
            ["run [p50/p99 of]", "rate", "p50", "p99", "peak RSS", "cores busy (avg, window)"],
        )
    )
    print()
    print(table(ratios, ["ratio", "confirmed", "journaled"]))
    print()
    verdicts = ", ".join(
        f"L{count} {score:.2f} {'PASS' if score >= TARGET else 'BELOW'}"
        for count, score in scores.items()
    )
    print(f"target: ≥ {TARGET} of the lower ceiling -> {verdicts}")
    four = part.listener.get(4)
    if four is not None and b.rate > 0:
        sustained = min(four.received_rate, four.confirmed_rate) / b.rate
        print(
            f"goal 5: L4 min(journaled, confirmed) / B {sustained:.2f} -> ≥ {GOAL_L4_OVER_B:g}"
            f" {'PASS' if sustained >= GOAL_L4_OVER_B else 'BELOW'}"
        )
    _paced_verdict(part)
    print()
    notes: list[str] = []
    runs_done = [(f"L{count}", done) for count, done in part.listener.items()]
    if part.paced is not None:
        runs_done.append(("Lp", part.paced))
    for name, done in runs_done:
        reconnects = done.counters.get("listener_source_reconnects_total", 0.0)
        gaps = done.counters.get("listener_stream_gaps_total", 0.0)
        quarantined = done.counters.get("listener_events_quarantined_total", 0.0)
        failures = done.counters.get("listener_publish_failures_total", 0.0)
        notes.append(
            f"{name}: journaled {done.received:,}, confirmed {done.confirmed:,} in "
            f"{done.seconds:.2f} s; journal pending {done.pending_before:,} -> "
            f"{done.pending_after:,}; listener exit code {done.exit_code}"
        )
        growth = (done.pending_after - done.pending_before) / done.seconds if done.seconds else 0
        if growth > 0.05 * done.confirmed_rate:
            notes.append(
                f"{name}: the journal's backlog grew {growth:,.0f}/s (journaled faster than "
                "confirmed), so its lag is queueing that grows with the window's length"
            )
        if reconnects or gaps or quarantined or failures:
            notes.append(
                f"WARNING {name}: reconnects {reconnects:.0f}, gaps {gaps:.0f}, "
                f"quarantined {quarantined:.0f}, publish failures {failures:.0f}"
            )
    runs = [(f"WS{c}", r.cores) for c, r in part.bare.items()]
    runs += [(name, done.cores) for name, done in runs_done]
    for name, cores in runs:
        if cores.get("other", 0.0) > NOISE:
            notes.append(
                f"NOISY: {cores['other']:.2f} cores went to other processes during {name}; "
                "rerun on a quiet host before comparing"
            )
    for line in notes:
        print(line)
    for name, done in runs_done:
        if done.exit_code not in (0, None):
            print(f"listener log of {name} (last lines):")
            print(done.log_tail)
    sys.stdout.flush()
    return notes


def _paced_verdict(part: StreamPart) -> None:
    """The paced lag against its goal, beside what the broker's confirms alone take."""
    if part.paced is None or part.paced.lag_p99_ms is None:
        return
    lag = part.paced.lag_p99_ms
    line = (
        f"paced at {part.paced_rate:,.0f}/s: receipt -> broker confirm p99 {fmt_ms(lag)} -> "
        f"goal < {PACED_LAG_GOAL_MS:g} ms {'PASS' if lag < PACED_LAG_GOAL_MS else 'BELOW'}"
    )
    floor = part.paced_b.confirm_ms if part.paced_b is not None else None
    if floor is not None:
        line += (
            f"; a bare aio-pika publisher at the same rate waits p99 {fmt_ms(floor[1])} "
            f"for its confirms alone ({_ratio(lag, floor[1]) or 0:.2f} x)"
        )
    print(line)


def _listener_rows(name: str, done: ListenerRun) -> list[list[str]]:
    return [
        [
            f"{name:<4} listener journaled [send -> receipt]",
            fmt_rate(done.received_rate),
            fmt_ms(done.receipt_ms[0]),
            fmt_ms(done.receipt_ms[1]),
            fmt_bytes(done.rss),
            describe_cores(done.cores),
        ],
        [
            f"{name:<4} listener confirmed [send -> broker confirm]",
            fmt_rate(done.confirmed_rate),
            fmt_ms(done.confirm_ms[0]),
            fmt_ms(done.confirm_ms[1]),
            "",
            "",
        ],
        [
            f"{name:<4} {LAG} [receipt -> broker confirm]",
            "-",
            fmt_ms(done.lag_p50_ms),
            fmt_ms(done.lag_p99_ms),
            "",
            "",
        ],
        [
            f"{name:<4} {PUBLISH} [written -> broker confirm]",
            "-",
            fmt_ms(done.broker_ms[0]),
            fmt_ms(done.broker_ms[1]),
            "",
            "",
        ],
    ]


def _ratio(x: float, y: float) -> float | None:
    return x / y if y > 0 else None
