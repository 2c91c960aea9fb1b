"""
The load generator, the same for ceiling A and the end-to-end run.

Requests are signed before the run (unique event ids, timestamps = now) and written as
raw HTTP/1.1 requests into one file per generator thread, each record an 8-digit
length followed by the request bytes. ``wrk`` replays them with a small Lua script
(:data:`LUA`), one record per request, so no signing happens while measuring; its
latency histogram gives p50/p99. Without ``wrk`` a multi-process aiohttp client does
the same from the same files (slower: it may become the bottleneck, which the
summary then says).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    MESSAGE_SIZE,
    WEBHOOK_PATH,
    WHSEC,
    python_module,
    run_uvloop,
    say,
)
from listener.sources.signatures import sign

__all__ = [
    "LoadResult",
    "RequestSet",
    "generate",
    "run_load",
    "webhook_body",
    "wrk_path",
]

RECORD_HEADER = 8  # digits of the length prefix of each record

LUA = r"""
-- Replays pre-signed raw requests, one record per request: 8 digits of length, bytes.
local prefix = "{prefix}"
local counter = 0
local threads = {{}}

function setup(thread)
  thread:set("index", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  source = assert(io.open(prefix .. index, "rb"))
  wraps = 0
end

function request()
  local head = source:read({header})
  if head == nil then
    source:seek("set", 0)
    wraps = wraps + 1
    head = source:read({header})
  end
  return source:read(tonumber(head))
end

function done(summary, latency, requests)
  local wrapped = 0
  for _, t in ipairs(threads) do
    wrapped = wrapped + t:get("wraps")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests": %d, "duration_us": %d, "status_errors": %d, "connect": %d,' ..
    ' "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d,' ..
    ' "mean_us": %.1f, "max_us": %d, "wraps": %d}}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max, wrapped))
end
"""


def wrk_path() -> str | None:
    """The ``wrk`` binary, unless ``BENCH_NO_WRK=1`` asks for the Python generator."""
    if os.environ.get("BENCH_NO_WRK") == "1":
        return None
    return shutil.which("wrk")


def webhook_body(event_id: str, pad: int) -> bytes:
    """A valid Get Smart Token ``badge.issued`` payload (tests' ``gst_event``), padded."""
    return orjson.dumps(
        {
            "id": event_id,
            "type": "badge.issued",
            "created_at": "2026-11-22T10:00:00Z",
            "environment": "production",
            "data": {
                "badge_id": "b_1",
                "user_id": "u_1",
                "badge_type": "gold",
                "extra": "kept",
                "note": "x" * pad,
            },
        }
    )


def cloudevent_size(body: bytes) -> int:
    """The size of the CloudEvent the listener publishes for ``body`` (its own code)."""
    from handlers import Event, load_provider  # noqa: PLC0415 - only for sizing
    from listener.envelope import event_entry  # noqa: PLC0415

    provider: Any = load_provider("getstoken")
    result = provider.parse(body, provider.settings_model(), {})
    if not isinstance(result, Event):
        raise RuntimeError(f"the benchmark payload does not validate: {result!r}")
    return len(
        event_entry(source="gst", provider="getstoken", event=result, received_at=time.time()).body
    )


def padding_for(target: int = MESSAGE_SIZE) -> int:
    """Padding that makes the published CloudEvent about ``target`` bytes."""
    probe = f"evt_{uuid.uuid4().hex}"
    base = cloudevent_size(webhook_body(probe, 0))
    return max(target - base, 0)


@dataclass
class RequestSet:
    """Pre-signed requests in ``parts`` files named ``prefix0``, ``prefix1``, ..."""

    prefix: str
    parts: int
    count: int
    body_size: int
    event_size: int


def generate(directory: Path, count: int, parts: int, *, tag: str = "") -> RequestSet:
    """Sign ``count`` unique webhooks (timestamp now) into ``parts`` files."""
    pad = padding_for()
    run = tag or uuid.uuid4().hex[:8]
    prefix = str(directory / f"requests-{run}-")
    stamp = int(time.time())
    outs = [open(f"{prefix}{i}", "wb", buffering=1 << 20) for i in range(parts)]  # noqa: SIM115
    body = b""
    try:
        for i in range(count):
            event_id = f"evt_{run}{i:010d}"
            body = webhook_body(event_id, pad)
            headers = sign(
                "standard-webhooks", WHSEC, body, msg_id=f"msg_{run}{i:010d}", timestamp=stamp
            )
            head = (
                f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            raw = head + body
            outs[i % parts].write(b"%08d" % len(raw) + raw)
    finally:
        for out in outs:
            out.close()
    return RequestSet(
        prefix=prefix,
        parts=parts,
        count=count,
        body_size=len(body),
        event_size=cloudevent_size(body),
    )


@dataclass
class LoadResult:
    """What the generator saw; latencies in milliseconds."""

    tool: str
    requests: int
    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    wraps: int = 0
    cpu_seconds: float | None = None  # the generator's own CPU time, when known

    @property
    def rate(self) -> float:
        """Requests per second answered 2xx."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def run_load(
    url: str,
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int,
) -> LoadResult:
    """Drive ``url`` (scheme://host:port; the path is in the requests) for ``seconds``."""
    wrk = wrk_path()
    if wrk is not None:
        return _run_wrk(wrk, url, requests, seconds=seconds, concurrency=concurrency)
    return _run_python(url, requests, seconds=seconds, concurrency=concurrency)


def _run_wrk(
    wrk: str,
    url: str,
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int,
) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(prefix=requests.prefix, header=RECORD_HEADER))
    try:
        argv = [
            wrk,
            f"-t{requests.parts}",
            f"-c{concurrency}",
            f"-d{max(round(seconds), 1)}s",
            "--timeout",
            "10s",
            "-s",
            script.name,
            url + WEBHOOK_PATH,
        ]
        # wrk's CPU time: what reaped children used while it ran (it is the only one).
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    finally:
        os.unlink(script.name)
    text = out.decode(errors="replace")
    marker = next((ln for ln in text.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or marker is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    data = json.loads(marker.removeprefix("BENCHJSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "timeout"))
    return LoadResult(
        tool=f"wrk -t{requests.parts} -c{concurrency}",
        requests=data["requests"],
        ok=data["requests"] - data["status_errors"],
        errors=data["status_errors"] + errors,
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        wraps=data["wraps"],
        cpu_seconds=cpu,
    )


# -- fallback: a multi-process aiohttp generator -------------------------------------


def _run_python(
    url: str,
    requests: RequestSet,
    *,
    seconds: float,
    concurrency: int,
) -> LoadResult:
    say("wrk not found (apt-get install -y wrk): using the slower Python generator")
    workers = requests.parts
    per_worker = [concurrency // workers + (i < concurrency % workers) for i in range(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(workers):
            argv = python_module(
                "bench.loadgen",
                "--url",
                url + WEBHOOK_PATH,
                "--file",
                f"{requests.prefix}{i}",
                "--seconds",
                str(seconds),
                "--connections",
                str(per_worker[i]),
                "--latencies",
                str(Path(tmp) / f"lat{i}"),
            )
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE))
        results = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"load generator failed ({proc.returncode})")
            results.append(json.loads(out))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        latencies = array.array("d")
        for i in range(workers):
            with open(Path(tmp) / f"lat{i}", "rb") as f:
                latencies.frombytes(f.read())
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000

    return LoadResult(
        tool=f"python x{workers} -c{concurrency}",
        requests=sum(r["requests"] for r in results),
        ok=sum(r["ok"] for r in results),
        errors=sum(r["errors"] for r in results),
        seconds=max(r["seconds"] for r in results),
        p50_ms=pct(50),
        p99_ms=pct(99),
        mean_ms=(sum(ordered) / len(ordered) * 1000) if ordered else math.nan,
        max_ms=(ordered[-1] * 1000) if ordered else math.nan,
        wraps=sum(r["wraps"] for r in results),
        cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def _read_records(path: str) -> list[tuple[dict[str, str], bytes]]:
    records = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        size = int(data[pos : pos + RECORD_HEADER])
        raw = data[pos + RECORD_HEADER : pos + RECORD_HEADER + size]
        pos += RECORD_HEADER + size
        head, _, body = raw.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n")[1:]:
            name, _, value = line.partition(": ")
            if name.lower() not in {"host", "content-length"}:
                headers[name] = value
        records.append((headers, body))
    return records


async def _worker(url: str, path: str, seconds: float, connections: int) -> dict[str, Any]:
    import aiohttp  # noqa: PLC0415 - only the fallback needs the client

    records = _read_records(path)
    latencies = array.array("d")
    counts = {"requests": 0, "ok": 0, "errors": 0, "wraps": 0}
    position = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        deadline = started + seconds

        async def one() -> None:
            nonlocal position
            while time.monotonic() < deadline:
                if position >= len(records):
                    position = 0
                    counts["wraps"] += 1
                headers, body = records[position]
                position += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                counts["requests"] += 1
                if 200 <= status < 300:
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1

        await asyncio.gather(*(one() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return {**counts, "seconds": elapsed, "latencies": latencies}


def main() -> None:
    """One fallback generator process (``python -m bench.loadgen``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--latencies", required=True)
    args = parser.parse_args()
    result = run_uvloop(lambda: _worker(args.url, args.file, args.seconds, args.connections))
    with open(args.latencies, "wb") as f:
        result.pop("latencies").tofile(f)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
