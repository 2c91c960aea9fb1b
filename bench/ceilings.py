"""
The two ceilings, each measured in a process of its own on uvloop.

* A (``python -m bench.ceilings serve --port N``): a bare aiohttp handler that reads
  the body of any POST and answers 200 with a small JSON body: an ``Application`` with
  one route behind ``AppRunner``/``TCPSite``, no access log (the listener's public
  port serves from aiohttp's low-level server instead: what it saves counts for the
  listener, as the issue's goal 2 asks of a lean webhook route). Driven by
  :func:`bench.loadgen.run_load` with the very requests of the end-to-end run; and by
  :func:`ceiling_a_paced` with the paced load of the accept-latency run, at the same
  rate: the latency floor of the generator, loopback HTTP and this host.
* B (``python -m bench.ceilings publish``): a bare aio-pika publisher. Persistent
  ~1 KiB messages to a fresh durable topic exchange bound ``#`` to a fresh durable
  queue, publisher confirms, a sliding window of 256 publishing tasks. ``--mode
  message`` uses the ordinary API (``exchange.publish(aio_pika.Message(...))``);
  ``--mode lean`` the path the listener takes (the underlying aiormq channel's
  ``basic_publish`` with a ``Basic.Properties``, NOTES), shown for reference only.
  The rate counts from the first publish until the last confirm. With ``--rate R``
  it publishes open loop, message ``n`` due at ``n / R`` seconds, and also prints each
  publish -> confirm time's p50 and p99 (``confirm_ms``): the broker's own confirm
  latency at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    BROKER_URL,
    CONCURRENCY,
    CONFIRM_WINDOW,
    MESSAGE_SIZE,
    CpuMeter,
    broker_pid,
    child,
    free_port,
    python_module,
    run_uvloop,
    say,
    serve_post,
    tap_arguments,
    unique,
    wait_port,
    with_loadgen,
)
from bench.loadgen import LoadResult, RequestSet, run_load
from bench.paced import PacedResult, paced_load

__all__ = ["PublishResult", "ceiling_a", "ceiling_a_paced", "ceiling_b", "drive"]


# -- A: the bare aiohttp handler ---------------------------------------------------------


async def _serve(port: int, journal: str | None = None) -> None:
    from aiohttp import web  # noqa: PLC0415

    body = b'{"success": true}'
    commits = _GroupCommit(journal) if journal else None

    async def ok(request: web.Request) -> web.Response:
        data = await request.read()
        if commits is not None:
            await commits.append(data)
        return web.Response(status=200, body=body, content_type="application/json")

    await serve_post(ok, port)


class _GroupCommit:
    """
    The least a journal can do before a 2xx (``serve --journal PATH``, the floor J): each
    body appended to one SQLite table in WAL mode with ``synchronous=FULL``, every body
    queued while the last commit ran (and two turns of the loop after the first) in one
    transaction, always committed on the loop's thread (the listener's go to a thread
    while commits are slow); no ids, no indexes, no metadata, nothing read back or marked
    published. A failed commit fails its batch's requests (500), not the writer.
    """

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB)")
        self._queued: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write())

    async def append(self, body: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        self._queued.append((body, done))
        self._wake.set()
        await done

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            for _ in range(2):  # (the listener's COALESCE_TURNS)
                await asyncio.sleep(0)
            batch, self._queued = self._queued, []
            self._wake.clear()
            failure: Exception | None = None
            try:
                self._conn.execute("BEGIN")
                rows = [(b,) for b, _ in batch]
                self._conn.executemany("INSERT INTO events (body) VALUES (?)", rows)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                failure = exc
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            for _, done in batch:
                if done.done():  # (its request went away: the server stopping)
                    continue
                if failure is None:
                    done.set_result(None)
                else:
                    done.set_exception(failure)


def drive(
    argv: Sequence[str],
    port: int,
    role: str,
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int,
) -> tuple[LoadResult, dict[str, float]]:
    """Run the server ``argv`` (listening on ``port``) and drive it; the load and CPU per role."""
    with child(argv) as proc:
        wait_port(port, proc=proc)
        meter = CpuMeter()
        meter.add(role, proc.pid)
        meter.add("broker", broker_pid())
        meter.start()
        result = run_load(
            f"http://127.0.0.1:{port}", requests, seconds=seconds, concurrency=concurrency
        )
        meter.stop()
    return result, with_loadgen(meter.cores(), result)


def ceiling_a(
    requests: RequestSet, *, seconds: float, concurrency: int = CONCURRENCY
) -> tuple[LoadResult, dict[str, float]]:
    """Run the bare server in a subprocess and drive it; the load and the CPU per role."""
    port = free_port()
    argv = python_module("bench.ceilings", "serve", "--port", str(port))
    return drive(argv, port, "aiohttp", requests, seconds=seconds, concurrency=concurrency)


def ceiling_a_paced(
    requests: RequestSet,
    *,
    rate: float,
    seconds: float,
    concurrency: int = CONCURRENCY,
    journal: str | None = None,
) -> PacedResult:
    """
    The bare server under the open-loop load of the accept-latency run, same rate;
    with ``journal`` (a file to create), floor J: each body journaled before its 200.
    """
    port = free_port()
    argv = python_module("bench.ceilings", "serve", "--port", str(port))
    with child([*argv, *(("--journal", journal) if journal else ())]) as proc:
        wait_port(port, proc=proc)
        url = f"http://127.0.0.1:{port}"
        return paced_load(url, requests, rate=rate, seconds=seconds, connections=concurrency)


# -- B: the bare aio-pika publisher ------------------------------------------------------


@dataclass
class PublishResult:
    """What the publisher measured."""

    mode: str
    confirmed: int
    failed: int
    seconds: float
    cores: dict[str, float]
    # Paced runs only: each publish -> its confirm, p50 and p99 in milliseconds.
    confirm_ms: tuple[float, float] | None = None

    @property
    def rate(self) -> float:
        """Confirmed messages per second, first publish to last confirm."""
        return self.confirmed / self.seconds if self.seconds > 0 else 0.0


async def _publish(
    seconds: float, window: int, size: int, mode: str, broker: int | None, rate: float = 0.0
) -> dict[str, Any]:
    import aio_pika  # noqa: PLC0415
    from pamqp.commands import Basic  # noqa: PLC0415

    exchange_name, queue_name = unique("bench.ceiling-b"), unique("bench.ceiling-b")
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(queue_name, durable=True, arguments=tap_arguments())
        await queue.bind(exchange, "#")
        underlay = await channel.get_underlay_channel()
        body = b"x" * size
        routing_key = "bench.ceiling.b"
        slots = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[Any]] = set()
        counts = {"confirmed": 0, "failed": 0}

        def settled(task: asyncio.Task[Any]) -> None:
            tasks.discard(task)
            slots.release()
            if (
                task.cancelled()
                or task.exception() is not None
                or (mode == "lean" and not isinstance(task.result(), Basic.Ack))
            ):
                counts["failed"] += 1
            else:
                counts["confirmed"] += 1

        def message(n: int) -> Any:
            now = datetime.now(UTC)
            if mode == "lean":
                properties = Basic.Properties(
                    content_type="application/cloudevents+json",
                    delivery_mode=2,
                    message_id=f"m{n}",
                    message_type=routing_key,
                    timestamp=now,
                    app_id="bench",
                )
                return underlay.basic_publish(
                    body,
                    exchange=exchange_name,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    wait=False,
                )
            return exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/cloudevents+json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=f"m{n}",
                    type=routing_key,
                    timestamp=now,
                    app_id="bench",
                ),
                routing_key=routing_key,
            )

        latencies: list[float] = []

        async def timed(n: int) -> Any:
            sent = time.monotonic()
            result = await message(n)
            latencies.append(time.monotonic() - sent)
            return result

        meter = CpuMeter()
        meter.add("aio-pika", os.getpid())
        meter.add("broker", broker)
        meter.start()
        started = time.monotonic()
        deadline = started + seconds
        n = 0
        while time.monotonic() < deadline:
            if rate > 0:  # open loop: message n is due at started + n / rate
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            n += 1
            task = asyncio.create_task(timed(n) if rate > 0 else message(n))
            tasks.add(task)
            task.add_done_callback(settled)
        while tasks:
            await asyncio.wait(set(tasks))
        elapsed = time.monotonic() - started
        meter.stop()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue_name)
            await channel.exchange_delete(exchange_name)
    finally:
        await connection.close()
    result: dict[str, Any] = {**counts, "seconds": elapsed, "cores": meter.cores()}
    if latencies:
        latencies.sort()
        result["confirm_ms"] = [
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 for q in (0.5, 0.99)
        ]
    return result


def ceiling_b(
    *,
    seconds: float,
    mode: str = "message",
    window: int = CONFIRM_WINDOW,
    size: int = MESSAGE_SIZE,
    rate: float = 0.0,
) -> PublishResult:
    """
    Run the publisher in a subprocess; confirmed messages/s and CPU per role. With a
    ``rate``, paced (open loop) at that many messages a second, and the confirm latency.
    """
    import subprocess  # noqa: PLC0415

    argv = python_module(
        "bench.ceilings",
        "publish",
        "--seconds",
        str(seconds),
        "--window",
        str(window),
        "--size",
        str(size),
        "--mode",
        mode,
        "--broker-pid",
        str(broker_pid() or 0),
        "--rate",
        f"{rate:g}",
    )
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout
    data = json.loads(out)
    return PublishResult(
        mode=mode,
        confirmed=data["confirmed"],
        failed=data["failed"],
        seconds=data["seconds"],
        cores=data["cores"],
        confirm_ms=tuple(data["confirm_ms"]) if "confirm_ms" in data else None,
    )


def main() -> None:
    """``serve --port N`` (ceiling A) or ``publish ...`` (ceiling B)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--journal", help="journal each body durably before the 200 (floor J)")
    publish = commands.add_parser("publish")
    publish.add_argument("--seconds", type=float, default=10.0)
    publish.add_argument("--window", type=int, default=CONFIRM_WINDOW)
    publish.add_argument("--size", type=int, default=MESSAGE_SIZE)
    publish.add_argument("--mode", choices=["message", "lean"], default="message")
    publish.add_argument("--broker-pid", type=int, default=0)
    publish.add_argument("--rate", type=float, default=0.0, help="paced: messages/s (0: flat out)")
    args = parser.parse_args()
    if args.command == "serve":
        run_uvloop(lambda: _serve(args.port, args.journal))
        return
    result = run_uvloop(
        lambda: _publish(
            args.seconds, args.window, args.size, args.mode, args.broker_pid or None, args.rate
        )
    )
    sys.stdout.write(json.dumps(result))
    say(f"ceiling B ({args.mode}): {result['confirmed'] / result['seconds']:,.0f} msg/s")


if __name__ == "__main__":
    main()
