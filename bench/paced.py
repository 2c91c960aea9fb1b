"""
An open-loop, paced HTTP load generator: accept latency at a fixed request rate.

The closed-loop generators (``wrk``, :mod:`bench.loadgen`) send the next request only
when a connection's previous one was answered, so a server that stalls also stalls the
generator: the requests that *should* have been sent during the stall are never sent
and their waiting time is never measured ("coordinated omission"), which makes the
tail latencies look far better than what clients at that rate would see.

Here the schedule is fixed beforehand instead: request ``i`` is *due* at
``t0 + i / rate``. A scheduler thread (``time.sleep`` is precise to ~0.1 ms, where the
event loop's timers round to 1 ms) puts each index on an asyncio queue at its due
time; each of ``connections`` keep-alive HTTP/1.1 connections takes the next index
when idle and sends the pre-signed raw request of record ``i``
(:func:`bench.loadgen.generate`; never reused: each carries a unique event id). The
latency is measured from the *due* time to the end of the response, not from the
send, so time a request waited for a free connection behind a slow server counts
(the hand-over itself adds ~0.1 ms). The generator's own share, the scheduler
thread's lateness in queueing each index (it must win the child's interpreter lock
from its busy event loop), is reported apart as ``tick_p99_ms``. Requests that started
more than 1 ms after their due time (plus those due during the run that never started)
are reported as ``behind``: the generator or the server could not keep the pace.
After ``seconds`` no request is started any more, and outstanding responses are
awaited for at most 10 s (those still unanswered then are errors). Only 2xx answers
are latency samples; anything else, or a broken connection, is an error.

The benchmark uses it for "accept latency at half the sustained maximum": the rate is
set to half the closed-loop ceiling, where the latency should be the server's own and
not that of a queue. One child process (``python -m bench.paced``, on uvloop when
installed) drives the load with plain asyncio streams and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from bench.common import python_module, run_uvloop, say
from bench.loadgen import RECORD_HEADER, RequestSet

__all__ = ["PacedResult", "paced_load"]

LATE = 0.001  # a request started later than this after its due time is "behind"
DRAIN = 10.0  # how long to wait for outstanding responses after the run
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
    tick_p99_ms: float = math.nan  # the scheduler thread's own lateness (see above)
    unsent: int = 0  # due during the run, never sent (in the quantiles as waiting)
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


class _Run:
    """One paced run: the schedule, the connections and the tallies (loop-owned state)."""

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
        self.ticked = [0.0] * self.planned  # when the scheduler thread queued each index
        self.due: asyncio.Queue[int | None] = asyncio.Queue()
        self.stop = threading.Event()

    def tick(self, loop: asyncio.AbstractEventLoop, connections: int) -> None:
        """The scheduler thread: queue each index at its due time, then one end per connection."""
        for index in range(self.planned):
            delay = self.t0 + index / self.rate - _clock()
            if delay > 0:
                time.sleep(delay)
            if self.stop.is_set():
                return
            self.ticked[index] = _clock()
            loop.call_soon_threadsafe(self.due.put_nowait, index)
        for _ in range(connections):
            loop.call_soon_threadsafe(self.due.put_nowait, None)

    async def connection(self, stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        """One keep-alive connection: take the next due request, send, read the answer."""
        reader: asyncio.StreamReader | None = stream[0]
        writer: asyncio.StreamWriter | None = stream[1]
        try:
            while (index := await self.due.get()) is not None:
                due = self.t0 + index / self.rate
                started = _clock()
                if started >= self.deadline:
                    return  # due during the run but could not start in time: unsent
                if started - due > LATE:
                    self.behind += 1
                self.sent += 1
                self.started[index] = True
                try:
                    if reader is None or writer is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    writer.write(self.records[index])
                    await writer.drain()
                    status, length, close = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                    if length:
                        await reader.readexactly(length)
                except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, IndexError):
                    self.errors += 1
                    close, status = True, 0
                else:
                    done = _clock()
                    self.last_done = max(self.last_done, done)
                    if 200 <= status < 300:
                        self.ok += 1
                        self.latencies.append(done - due)
                    else:
                        self.errors += 1
                if close:
                    if writer is not None:
                        writer.close()
                    reader, writer = await self.reconnect()  # now, not when the next is due
        finally:
            if writer is not None:
                writer.close()

    async def reconnect(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | tuple[None, None]:
        """A fresh connection, or none (the next request tries again, as an error if it fails)."""
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            return None, None

    async def run(self, connections: int) -> dict[str, Any]:
        """Open the connections, run the schedule, wait (bounded) for the last answers."""
        streams = await asyncio.gather(
            *(asyncio.open_connection(self.host, self.port) for _ in range(connections))
        )
        self.t0 = _clock()
        self.deadline = self.t0 + self.seconds
        tasks = [asyncio.create_task(self.connection(stream)) for stream in streams]
        ticker = threading.Thread(
            target=self.tick, args=(asyncio.get_running_loop(), connections), daemon=True
        )
        ticker.start()
        _, pending = await asyncio.wait(tasks, timeout=self.deadline + DRAIN - _clock())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.stop.set()
        ticker.join()
        self.errors = self.sent - self.ok if pending else self.errors  # unanswered: errors
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
