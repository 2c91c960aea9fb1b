"""
The load and the disturbances of the soak (:mod:`bench.soak`): the listener's
configuration, the in-process simulators, the paced webhook driver, the broker restart,
the replay, the tap's depth, and reaping what was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psutil

from bench.common import BROKER_URL, CONCURRENCY, python_module, say, tap_arguments, unique
from bench.loadgen import RequestSet, generate
from bench.paced import PacedResult, paced_load
from bench.streams import API_KEY, SOURCE, SUBSCRIPTIONS
from bench.streams import listener_config as stream_config
from bench.webhooks import listener_config as webhook_config
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.dev.simulators.terrapin import TerrapinSimulator, generate_isins
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator

POLL_KEY = "bench-soak-key"
ISINS = 1000
PROJECTS = [f"project{i:03d}" for i in range(20)]
BONDS_INTERVAL = "20s"
TT_INTERVAL = "30s"
# The webhook load is paced in chunks, each a fresh set of signed requests (ids never
# repeat); chunk boundaries fall half-way between two samples, so the samples never see
# the generator's connections closing or opening.
CHUNK = 60.0
OFFSET = 30.0
STARTUP = 0.7  # a paced child reads its requests, opens its connections, then starts
RESTART_DOWN = 10.0  # seconds between stop_app and start_app
_REPLAYED = re.compile(r"replayed (\d+) of (\d+) events")


def soak_config(
    directory: Path,
    *,
    http_port: int,
    admin_port: int,
    exchange: str,
    stream_url: str,
    bonds_url: str,
    tt_url: str,
    retention: float,
    max_size: int,
) -> dict[str, Any]:
    """One listener: the webhook source, the Layerx402 stream (4 subscriptions), 2 polls."""
    config = webhook_config(
        directory, http_port=http_port, admin_port=admin_port, exchange=exchange, archive=False
    )
    stream = stream_config(
        directory,
        url=stream_url,
        subscriptions=4,
        http_port=http_port,
        admin_port=admin_port,
        exchange=exchange,
        archive=False,
    )["sources"][0]
    polled = {"kind": "poll", "api_key": POLL_KEY, "rate_limit": "100000/1m"}
    bonds = {
        **polled,
        "name": "bonds",
        "provider": "terrapin",
        "url": bonds_url,
        "interval": BONDS_INTERVAL,
        "resources": [
            {
                "endpoint": "bond_reference",
                "isins": generate_isins(ISINS, seed=1),
                "batch_size": 500,
            }
        ],
    }
    tt = {
        **polled,
        "name": "tt",
        "provider": "tokenterminal",
        "url": tt_url,
        "interval": TT_INTERVAL,
        "resources": [
            {
                "endpoint": "project_metrics",
                "projects": PROJECTS,
                "metrics": ["fees", "revenue"],
                "lookback": "2d",
            }
        ],
    }
    config["sources"] = [*config["sources"], stream, bonds, tt]
    # Retention keeps the journal bounded; dedupe_window may not be shorter.
    config["journal"].update(
        retention=f"{retention:g}s", dedupe_window=f"{retention:g}s", max_size=max_size
    )
    config["shutdown_timeout"] = "5s"
    return config


# -- the simulators, in this process (on asyncio's own loop, as bench.streams runs them) --


@dataclass
class Simulators:
    """The three providers the listener reads."""

    stream: Layerx402Simulator
    bonds: TerrapinSimulator
    tt: TokenTerminalSimulator


@contextlib.asynccontextmanager
async def simulators(stream_rate: float) -> AsyncIterator[Simulators]:
    """The simulators until the block ends; the stream paced at ``stream_rate`` in all."""
    per_key = stream_rate / len(SUBSCRIPTIONS[4])
    async with (
        Layerx402Simulator(
            port=0,
            api_keys={API_KEY},
            rate=per_key,
            record=False,
            compression=None,
            time_base_ms=None,
        ) as stream,
        TerrapinSimulator(
            port=0, api_keys=[POLL_KEY], isins=generate_isins(ISINS, seed=1), rate_limit=None
        ) as bonds,
        TokenTerminalSimulator(
            port=0, api_keys=[POLL_KEY], projects=PROJECTS, chains=["ethereum"], null_share=0
        ) as tt,
    ):
        yield Simulators(stream, bonds, tt)


def change_polled(sims: Simulators, minute: int) -> None:
    """Give the polls something new: 10% of the bonds, today's fees of 5 projects."""
    sims.bonds.change_fraction(0.1, seed=minute)
    sims.bonds.ledger.clear()  # (its request ledger would grow for the whole run)
    sims.tt.ledger.clear()
    today = sims.tt.current_day()
    for project in PROJECTS[minute % 4 :: 4]:
        sims.tt.set_value(project, today, "ethereum", "fees", f"{1000 + minute}.5")


# -- the webhook load ----------------------------------------------------------------------


class WebhookDriver:
    """
    :func:`bench.paced.paced_load` in a thread, chunk after chunk, each chunk a fresh
    request set signed in a separate process while the previous chunk runs.
    """

    def __init__(self, url: str, directory: Path, rate: float, run: str) -> None:
        self.url, self.directory, self.rate, self.run = url, directory, rate, run
        self.results: list[PacedResult] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._windows: list[tuple[float, float]] = []
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self._first: Future[RequestSet] | None = None
        self._thread = threading.Thread(target=self._drive, name="soak-webhooks", daemon=True)

    def _sign(self, index: int, seconds: float) -> Future[RequestSet]:
        count = int(self.rate * seconds * 1.05) + 500
        return self._pool.submit(generate, self.directory, count, 1, tag=f"{self.run}c{index}")

    async def prepare(self, seconds: float) -> None:
        """Sign the first chunk (``seconds`` long: the run's first window) beforehand."""
        self._first = self._sign(0, min(OFFSET, seconds))
        await asyncio.wrap_future(self._first)

    def start(self, t0: float, end: float) -> None:
        """Drive from ``t0`` until ``end`` (monotonic clock)."""
        edges = [t0, *(t0 + OFFSET + CHUNK * i for i in range(int((end - t0) // CHUNK) + 2))]
        edges = [e for e in edges if e < end] + [end]
        self._windows = list(itertools.pairwise(edges))
        self._thread.start()

    def _drive(self) -> None:
        future = self._first
        for index, (_, until) in enumerate(self._windows):
            if future is None or self._stop.is_set():
                break
            try:
                requests = future.result()
            except Exception as exc:  # reported; the run goes on without it
                self.failures.append(f"signing chunk {index}: {exc!r}")
                break
            following = None
            if index + 1 < len(self._windows):
                start, stop = self._windows[index + 1]
                following = self._sign(index + 1, stop - start)
            seconds = until - time.monotonic() - STARTUP
            if seconds >= 1.0 and not self._stop.is_set():
                try:
                    self.results.append(
                        paced_load(
                            self.url,
                            requests,
                            rate=self.rate,
                            seconds=seconds,
                            connections=CONCURRENCY,
                        )
                    )
                except Exception as exc:  # reported; the next chunk starts
                    self.failures.append(f"chunk {index}: {exc!r}")
            for i in range(requests.parts):
                Path(f"{requests.prefix}{i}").unlink(missing_ok=True)
            future = following

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the chunk in flight (which :func:`reap` may end sooner)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def summary(self) -> str:
        """Totals over every chunk."""
        if not self.results:
            return "webhooks: no chunk completed"
        sent = sum(r.sent for r in self.results)
        ok = sum(r.ok for r in self.results)
        errors = sum(r.errors for r in self.results)
        behind = sum(r.behind for r in self.results)
        seconds = sum(r.seconds for r in self.results)
        p99s = ", ".join(f"{r.p99_ms:,.1f}" for r in self.results)
        return (
            f"webhooks: {len(self.results)} chunks, {sent:,} sent, {ok:,} 2xx, {errors:,} "
            f"errors, {behind:,} started over 1 ms late, {ok / seconds if seconds else 0:,.0f}/s "
            f"while paced; accept p99 per chunk (ms, from the due time): {p99s}"
        )


# -- disturbances and the broker --------------------------------------------------------------


async def broker_app(action: str) -> str | None:
    """``rabbitmqctl stop_app`` / ``start_app``; ``None`` when it worked, else why not."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", action, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return f"rabbitmqctl {action}: {exc}"
    out, _ = await proc.communicate()
    if proc.returncode == 0:
        return None
    return f"rabbitmqctl {action} exited {proc.returncode}: {out.decode(errors='replace')[-300:]}"


async def tap_depth(queue: str) -> int | None:
    """Messages in the tap queue (``None``: the broker did not answer)."""
    with contextlib.suppress(Exception):  # e.g. the broker is being restarted
        connection = await aio_pika.connect(BROKER_URL, timeout=5)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await connection.close()
    return None


async def _queue(name: str, *, delete: bool) -> None:
    connection = await aio_pika.connect(BROKER_URL, timeout=10)
    try:
        channel = await connection.channel()
        if delete:
            await channel.queue_delete(name)
        else:
            await channel.declare_queue(name, durable=True, arguments=tap_arguments())
    finally:
        await connection.close()


def _stream_since(journal: Path, window: float) -> str:
    """
    The event time where the stream's last ``window`` seconds begin. Replays select by
    event time; the simulated stream's clock runs ahead of the wall clock (250 ms per
    event and key) and webhook payloads carry a fixed date: ``--since 1m`` would not do.
    """
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT time FROM events WHERE source = ? AND kind = 'event' AND received_at < ?"
            " ORDER BY seq DESC LIMIT 1",
            (SOURCE, time.time() - window),
        ).fetchone()
    return f"{window:g}s" if row is None else datetime.fromtimestamp(row[0], UTC).isoformat()


async def replay(config: Path, journal: Path, window: float, queue: str) -> str:
    """``listener replay`` of the stream's last ``window`` seconds into a fresh ``queue``."""
    since = await asyncio.to_thread(_stream_since, journal, window)
    await _queue(queue, delete=False)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *python_module(
                "listener",
                "replay",
                "--config",
                str(config),
                "--source",
                SOURCE,
                "--since",
                since,
                "--from",
                "journal",
                "--to-queue",
                queue,
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    finally:
        with contextlib.suppress(Exception):
            await _queue(queue, delete=True)
    took = time.monotonic() - started
    if proc.returncode != 0:
        return f"replay FAILED ({proc.returncode}): {err.decode(errors='replace').strip()[-300:]}"
    match = _REPLAYED.search(out.decode(errors="replace"))
    count = int(match[1]) if match else 0
    return f"replayed {count:,} in {took:.1f} s"


class Disturbances:
    """Stream drops, the broker restart and the replay, each at its time since ``t0``."""

    def __init__(
        self,
        t0: float,
        *,
        seconds: float,
        drop_every: float,
        restart_at: float,
        replay_window: float,
        config: Path,
        journal: Path,
        stream: Layerx402Simulator,
    ) -> None:
        self.t0, self.seconds, self.drop_every = t0, seconds, drop_every
        self.restart_at, self.replay_window = restart_at, replay_window
        self.config, self.journal, self.stream = config, journal, stream
        #: (seconds since t0, what happened), for the minute rows.
        self.events: list[tuple[float, str]] = []
        self.failures: list[str] = []
        #: True from stop_app until start_app worked (the caller restarts it if interrupted).
        self.broker_down = False

    def note(self, text: str) -> None:
        """Record ``text`` at the time since ``t0``, and say it."""
        self.events.append((time.monotonic() - self.t0, text))
        say(f"{stamp()} {text}")

    async def _at(self, offset: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + offset - time.monotonic()))

    async def run(self) -> None:
        """All of them, until the last is done."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._drops())
            group.create_task(self._restart())
            if self.restart_at + 60.0 < self.seconds:
                group.create_task(self._replay())

    async def _drops(self) -> None:
        at = self.drop_every - 20.0  # 20 s before a sample: never during one
        while at < self.seconds - 10:
            await self._at(at)
            await self.stream.drop_all(None)
            self.note("stream aborted")
            at += self.drop_every

    async def _restart(self) -> None:
        await self._at(self.restart_at)
        self.broker_down = True
        self.note("broker stop_app")
        try:
            problem = await broker_app("stop_app")
            if problem:
                self.failures.append(problem)
            await asyncio.sleep(RESTART_DOWN)
        finally:
            problem = await broker_app("start_app")
            if problem:
                self.failures.append(problem)
            else:
                self.broker_down = False
                self.note("broker start_app done")

    async def _replay(self) -> None:
        await self._at(self.restart_at + 60.0)
        self.note(f"replay of {SOURCE}'s last {self.replay_window:g} s")
        queue = unique("bench.soak.replay")
        outcome = await replay(self.config, self.journal, self.replay_window, queue)
        if "FAILED" in outcome:
            self.failures.append(outcome)
        self.note(outcome)


def reap() -> None:
    """End every child this process started that is still running (by pid)."""
    kids = psutil.Process().children(recursive=True)
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            kid.terminate()
    _, alive = psutil.wait_procs(kids, timeout=5)
    for kid in alive:
        with contextlib.suppress(psutil.Error):
            kid.kill()


def log_summary(path: Path) -> str:
    """The listener's warnings and errors (JSON log lines), counted by event."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), path.open("rb") as lines:
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):
                entry = orjson.loads(line)
                if entry.get("level") in {"warning", "error", "critical"}:
                    key = f"{entry['level']} {str(entry.get('event'))[:48]}"
                    counts[key] = counts.get(key, 0) + 1
    listed = ", ".join(f"{key} x{n}" for key, n in sorted(counts.items()))
    return f"listener log: {listed or 'no warnings or errors'}"


def stamp() -> str:
    """The wall clock, for the minute rows."""
    return datetime.now(UTC).strftime("%H:%M:%S")
