"""
An open-loop, paced HTTP load generator: accept latency at a fixed request rate.

The closed-loop generators (``wrk``, :mod:`bench.loadgen`) send the next request only
when a connection's previous one was answered, so a server that stalls also stalls the
generator: the requests that *should* have been sent during the stall are never sent
and their waiting time is never measured ("coordinated omission"), which makes the
tail latencies look far better than what clients at that rate would see.

Here the schedule is fixed beforehand instead: request ``i`` is *due* at
``t0 + i / rate``. Each of ``connections`` keep-alive HTTP/1.1 connections (an
:class:`asyncio.Protocol`, one request at a time) takes the next due index when idle
and sends the pre-signed raw request of record ``i`` (:func:`bench.loadgen.generate`;
never reused: each carries a unique event id). Requests fall due as the event loop
wakes: on a timer (the loop's timers are 1 ms granular) or on an answer (every fraction
of a millisecond at these rates), and go out at once on an idle connection. The latency
is measured from the *due* time to the end of the response, not from the send, so time
a request waited for a free connection behind a slow server counts, and so does the
generator's own lateness (a timer's millisecond when no answer wakes it first, more
when its loop is busy; requests then go out a few at once): the p99 of how late each
index was seen due is reported apart as ``tick_p99_ms``.
Requests that started more than 1 ms after their due time (plus those due during the
run that never started) are reported as ``behind``: the generator or the server could
not keep the pace. After ``seconds`` no request is started any more, and outstanding
responses are awaited for at most 10 s (those still unanswered then are errors). Only
2xx answers are latency samples; anything else, or a broken connection, is an error.

The generator shares the cores with the server it measures, so it does as little as it
can: no thread, no queue and no stream objects. The first version had a scheduler
thread (``time.sleep`` is precise to ~0.1 ms) hand each index to the loop through an
asyncio queue, and asyncio streams on each connection: 0.30-0.32 of a core at
3,800 requests/s against 0.16-0.19 for this one (three alternating runs each, paced
against the listener).

The benchmark uses it for "accept latency at half the sustained maximum": the rate is
set to half the closed-loop ceiling, where the latency should be the server's own and
not that of a queue. One child process (``python -m bench.paced``, on uvloop when
installed) drives the load and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, cast
from urllib.parse import urlsplit

from bench.common import python_module, run_uvloop, say
from bench.loadgen import RECORD_HEADER, RequestSet

__all__ = ["PacedResult", "paced_load"]

LATE = 0.001  # a request started later than this after its due time is "behind"
DRAIN = 10.0  # how long to wait for outstanding responses after the run
RECONNECT = 0.05  # seconds between attempts to replace a connection lost
_clock = time.perf_counter


@dataclass
class PacedResult:
    """What the paced generator saw; latencies from the due time, in milliseconds."""

    sent: int
    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    behind: int
    tick_p99_ms: float = math.nan  # the generator's own lateness (see above)
    unsent: int = 0  # due during the run, never sent (in the quantiles as waiting)
    connect_failures: int = 0  # connections that could not be opened again (retried)
    stray: int = 0  # answers with no request in flight (their connections closed)
    # Quantiles of the listener's own histograms over the run, in ms (bench.webhooks).
    inside: dict[str, float] = field(default_factory=dict)
    commits: float = 0.0  # the journal's commits over the run (bench.webhooks)
    commit_seconds: float = 0.0  # and the time they took together
    # The server's event loop thread over the run, shares of the wall time: on a CPU,
    # and runnable but waiting for one (bench.webhooks; 0 where not measured).
    on_cpu: float = 0.0
    run_queue: float = 0.0

    @property
    def rate(self) -> float:
        """Requests per second answered 2xx."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def paced_load(
    url: str,
    requests: RequestSet,
    *,
    rate: float,
    seconds: float,
    connections: int = 64,
) -> PacedResult:
    """Send ``requests`` to ``url`` (scheme://host:port) at ``rate`` per second for ``seconds``."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"the URL needs a host and a port: {url!r}")
    files = [arg for i in range(requests.parts) for arg in ("--file", f"{requests.prefix}{i}")]
    argv = python_module(
        "bench.paced",
        "--host",
        parts.hostname,
        "--port",
        str(parts.port),
        *files,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
    )
    proc = subprocess.run(argv, stdout=subprocess.PIPE, timeout=seconds + DRAIN + 120, check=False)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the paced generator failed ({proc.returncode})")
    data = json.loads(lines[-1])
    if data["exhausted"]:
        say(f"paced: only {data['planned']} requests for {rate * seconds:.0f}: stopped early")
    if data["unsent"] > data["planned"] // 1000:  # a few at the very end are jitter
        say(f"paced: {data['unsent']} requests due during the run were never sent")
    return PacedResult(**{f.name: data[f.name] for f in fields(PacedResult) if f.name in data})


# -- the child process --------------------------------------------------------------------


def _read_raw(paths: list[str]) -> list[bytes]:
    """The raw request bytes of every record in ``paths`` (8-digit length, then bytes)."""
    records = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            size = int(data[pos : pos + RECORD_HEADER])
            start = pos + RECORD_HEADER
            records.append(data[start : start + size])
            pos = start + size
    return records


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server closes, from a response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    return status, length, close


def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted seconds, in milliseconds (NaN if empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer read as it comes."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.index = -1  # the request in flight (-1: none)
        self.need = -1  # the whole answer's length, once its head is in (-1: not yet)
        self.head: tuple[int, int, bool] = (0, 0, False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.run.ready(self)

    def data_received(self, data: bytes) -> None:
        if self.index < 0:  # (no request in flight: not an answer of ours; never trusted)
            self.run.stray += 1
            if self.transport is not None:
                self.transport.close()
            return
        buffer = self.buffer
        buffer += data
        while self.index >= 0:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                try:
                    self.head = _parse_head(bytes(buffer[:end]))
                except (ValueError, IndexError):
                    self.head = (0, 0, True)
                self.need = end + 4 + self.head[1]
            if len(buffer) < self.need:
                return
            del buffer[: self.need]
            self.need = -1
            self.run.answered(self, *self.head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.run.lost(self)

    def send(self, index: int, raw: bytes) -> None:
        self.index = index
        assert self.transport is not None
        self.transport.write(raw)


class _Run:
    """
    One paced run: the schedule, the connections and the tallies, all on the event loop
    (no thread, no queue, no stream objects: the generator's own CPU per request is
    what the server under test does not get, on the same cores). Requests fall due as
    the loop wakes, on a timer (1 ms granular) or on an answer (every fraction of a
    millisecond at these rates), and go out at once on an idle connection.
    """

    def __init__(self, host: str, port: int, records: list[bytes], rate: float, seconds: float):
        self.host, self.port, self.records, self.rate = host, port, records, rate
        wanted = math.ceil(rate * seconds)
        self.exhausted = wanted > len(records)
        self.planned = min(wanted, len(records))
        self.t0 = self.deadline = 0.0
        self.seconds = seconds
        self.sent = self.ok = self.errors = self.behind = 0
        self.last_done = 0.0
        self.latencies: list[float] = []
        self.started = [False] * self.planned  # (a request never sent counts too)
        self.ticked = [0.0] * self.planned  # when each index was seen due
        self.next = 0  # the next index not yet due
        self.waiting: collections.deque[int] = collections.deque()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.in_flight = 0
        self.live: set[_Connection] = set()  # (every open connection, reconnected ones too)
        self.reconnects: set[asyncio.Task[Any]] = set()
        self.connect_failures = 0  # (each tried again after RECONNECT, until the deadline)
        self.stray = 0  # bytes from a connection with no request in flight (it is closed)
        self.quiet = asyncio.Event()  # nothing in flight
        self.closing = False  # (the run is over: a connection lost is not opened again)

    def due(self, now: float) -> None:
        """Queue every index due by ``now``, then send what idle connections can take."""
        if self.next < self.planned and now < self.deadline:
            upto = min(self.planned, int((now - self.t0) * self.rate) + 1)
            for index in range(self.next, upto):
                self.ticked[index] = now
                self.waiting.append(index)
            self.next = max(self.next, upto)
        waiting, idle = self.waiting, self.idle
        while waiting and idle:
            if now >= self.deadline:
                return  # due during the run but could not start in time: unsent
            conn = idle.popleft()
            if conn.transport is None or conn.transport.is_closing():
                continue  # (lost or closing: its lost() opens the next)
            index = waiting.popleft()
            if now - (self.t0 + index / self.rate) > LATE:
                self.behind += 1
            self.sent += 1
            self.in_flight += 1
            self.quiet.clear()
            self.started[index] = True
            conn.send(index, self.records[index])

    def ready(self, conn: _Connection) -> None:
        self.live.add(conn)
        self.idle.append(conn)
        if self.t0:
            self.due(_clock())

    def answered(self, conn: _Connection, status: int, _length: int, close: bool) -> None:
        done = _clock()
        index, conn.index = conn.index, -1
        self.last_done = max(self.last_done, done)
        if 200 <= status < 300:
            self.ok += 1
            self.latencies.append(done - (self.t0 + index / self.rate))
        else:
            self.errors += 1
        if close:
            if conn.transport is not None:
                conn.transport.close()  # (lost() opens the next)
        else:
            self.idle.append(conn)
        self.due(done)  # (before the drain may see nothing in flight)
        self._settled()

    def lost(self, conn: _Connection) -> None:
        self.live.discard(conn)
        if conn.index >= 0:
            conn.index = -1
            self.errors += 1
            self._settled()
        if self.closing:
            return
        task = asyncio.get_running_loop().create_task(self._connect())
        self.reconnects.add(task)
        task.add_done_callback(self.reconnects.discard)

    def _settled(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.quiet.set()

    async def _connect(self) -> None:
        """A new connection in place of one lost, tried again until the run's end."""
        loop = asyncio.get_running_loop()
        while not self.closing and _clock() < self.deadline:
            try:
                await loop.create_connection(lambda: _Connection(self), self.host, self.port)
            except OSError:
                self.connect_failures += 1
                await asyncio.sleep(RECONNECT)
            else:
                return

    async def run(self, connections: int) -> dict[str, Any]:
        """Open the connections, run the schedule, wait (bounded) for the last answers."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.create_connection(lambda: _Connection(self), self.host, self.port)
                for _ in range(connections)
            )
        )
        self.t0 = _clock()
        self.deadline = self.t0 + self.seconds
        while self.next < self.planned and (now := _clock()) < self.deadline:
            self.due(now)
            # Until the next is due (the loop's timers are 1 ms granular; answers wake it
            # sooner, and due() runs on each).
            await asyncio.sleep(max(self.t0 + self.next / self.rate - _clock(), 0.001))
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.quiet.wait(), self.deadline + DRAIN - _clock())
        self.closing = True
        self.errors += self.in_flight  # unanswered: errors
        for task in list(self.reconnects):
            task.cancel()
        for conn in list(self.live):
            conn.index = -1  # (counted above: its close adds nothing)
            if conn.transport is not None:
                conn.transport.close()
        ended = _clock()
        span = max(self.last_done, self.t0 + self.planned / self.rate) - self.t0
        unsent = self.planned - self.sent
        # Every planned request is a sample: one never sent waited at least until the end
        # (a stall at the end of the run left them out, and the p99 read 2 ms for 400 ms);
        # a failed or refused one, forever.
        waited = [ended - (self.t0 + i / self.rate) for i, on in enumerate(self.started) if not on]
        ordered = sorted(self.latencies + waited + [math.inf] * self.errors)
        ticks = sorted(
            at - (self.t0 + index / self.rate) for index, at in enumerate(self.ticked) if at
        )
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "seconds": span,
            "p50_ms": _percentile(ordered, 0.50),
            "p99_ms": _percentile(ordered, 0.99),
            "p999_ms": _percentile(ordered, 0.999),
            "max_ms": ordered[-1] * 1000 if ordered else math.nan,
            "behind": self.behind + unsent,
            "tick_p99_ms": _percentile(ticks, 0.99),
            "unsent": unsent,
            "planned": self.planned,
            "exhausted": self.exhausted,
            "connect_failures": self.connect_failures,
            "stray": self.stray,
        }


def main() -> None:
    """The generator process (``python -m bench.paced``): one JSON line on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", action="append", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.connections <= 0:
        parser.error("--rate, --seconds and --connections must be positive")
    records = _read_raw(args.file)
    gc.collect()
    gc.freeze()  # the records stay: keep collections short while measuring
    run = _Run(args.host, args.port, records, args.rate, args.seconds)
    result = run_uvloop(lambda: run.run(args.connections))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
