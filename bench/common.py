"""
Helpers shared by the benchmark modules: ports, processes, CPU accounting, the
listener's admin port and metrics, broker objects, output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import psutil

from listener.loop import run_async

_T = TypeVar("_T")

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = os.environ.get("BENCH_BROKER_URL", f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/")
# The Standard Webhooks known-answer secret (NOTES: webhook verification facts).
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEBHOOK_PATH = "/webhooks/gst"
CONCURRENCY = 64
CONFIRM_WINDOW = 256
# The size of the messages ceiling B publishes; the end-to-end webhook payload is padded
# so that the CloudEvent the listener publishes is about as large.
MESSAGE_SIZE = 1024
# Cores used during a run by processes outside it (beyond the kernel's own network work)
# above which the figures are flagged as noisy.
NOISE = 0.3


def run_uvloop(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``main`` on uvloop when installed, exactly as the listener does."""
    return run_async(main)


def unique(prefix: str) -> str:
    """A fresh broker object name, so runs never collide with each other or with tests."""
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_reachable() -> bool:
    """Whether something listens on the broker's port."""
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=1.0):
            return True
    except OSError:
        return False


def wait_port(
    port: int, *, proc: subprocess.Popen[Any] | None = None, timeout: float = 15.0
) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (or ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def child(
    argv: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the duration of the block; SIGTERM (then SIGKILL) it afterwards."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        list(argv), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    try:
        yield proc
    finally:
        stop_child(proc)
        if log is not None and not isinstance(out, int):
            out.close()


def stop_child(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM the process we started, wait for it, SIGKILL it if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def broker_pid() -> int | None:
    """The RabbitMQ VM's pid (for CPU accounting, and bench.pinning), if visible."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name = proc.info["name"] or ""
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if name.startswith("beam") and "rabbit" in cmdline:
            return int(proc.pid)
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            total = proc.cpu_times()
            seconds = total.user + total.system
            for kid in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kid_times = kid.cpu_times()
                    seconds += kid_times.user + kid_times.system
        return float(seconds)
    except psutil.Error:
        return None


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    _end: dict[str, float] = field(default_factory=dict)
    _started_at: float = 0.0
    _elapsed: float = 0.0
    _host_start: Any = None
    _host_end: Any = None

    def add(self, role: str, pid: int | None) -> None:
        """Account for ``pid`` (and its children) under ``role``; ``None`` is skipped."""
        if pid is not None:
            self.pids[role] = pid
            if self._started_at:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    self._start[role] = seconds

    def start(self) -> None:
        """Take the first sample."""
        self._started_at = time.monotonic()
        self._host_start = psutil.cpu_times()
        for role, pid in self.pids.items():
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                self._start[role] = seconds

    def stop(self) -> None:
        """Take the last sample (processes still alive)."""
        self._elapsed = time.monotonic() - self._started_at
        self._host_end = psutil.cpu_times()
        for role, pid in self.pids.items():
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                self._end[role] = seconds

    def cores(self) -> dict[str, float]:
        """
        Average cores busy per role over the measured interval, then ``other`` (busy
        but in none of the roles: other processes, the kernel's softirq work) and
        ``idle`` for the host.
        """
        if self._elapsed <= 0:
            return {}
        result = {
            role: (self._end[role] - self._start[role]) / self._elapsed
            for role in self.pids
            if role in self._start and role in self._end
        }
        if self._host_start is not None and self._host_end is not None:
            busy = _busy(self._host_end) - _busy(self._host_start)
            idle = (self._host_end.idle + self._host_end.iowait) - (
                self._host_start.idle + self._host_start.iowait
            )
            result["other"] = max(busy / self._elapsed - sum(result.values()), 0.0)
            result["idle"] = idle / self._elapsed
        return result


def _busy(times: Any) -> float:
    return float(times.user + times.nice + times.system + times.irq + times.softirq + times.steal)


def background_load(seconds: float = 1.0) -> float:
    """Cores busy on the host while the benchmark does nothing (noise from elsewhere)."""
    before = psutil.cpu_times()
    time.sleep(seconds)
    return (_busy(psutil.cpu_times()) - _busy(before)) / seconds


def with_loadgen(cores: dict[str, float], load: Any) -> dict[str, float]:
    """``cores`` with the load generator's own (its CPU time over its run) added."""
    result = {k: v for k, v in cores.items() if k not in {"other", "idle"}}
    if load.cpu_seconds is not None and load.seconds > 0:
        result["loadgen"] = load.cpu_seconds / load.seconds
    if "other" in cores:
        result["other"] = max(cores["other"] - result.get("loadgen", 0.0), 0.0)
        result["idle"] = cores["idle"]
    return result


def peak_rss(pid: int) -> int | None:
    """The peak resident set size of ``pid`` in bytes (``VmHWM``), if readable."""
    return _status_bytes(pid, "VmHWM:")


def current_rss(pid: int) -> int | None:
    """The resident set size of ``pid`` in bytes now (``VmRSS``), if readable."""
    return _status_bytes(pid, "VmRSS:")


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return None


# -- the listener's admin port -------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → total per metric name (labels summed)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def parse_buckets(text: str, histogram: str) -> dict[float, float]:
    """Prometheus text → ``{le: cumulative count}`` of ``histogram`` (other labels summed)."""
    prefix = f"{histogram}_bucket{{"
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line.rpartition(" ")
        for label in labels[len(prefix) :].rstrip("}").split(","):
            key, _, raw = label.partition("=")
            if key == "le":
                le = float(raw.strip('"'))  # "+Inf" parses as inf
                buckets[le] = buckets.get(le, 0.0) + float(value)
    return buckets


def bucket_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """
    The ``q`` quantile of what a histogram observed between two scrapes, interpolated
    linearly inside its bucket as Prometheus' ``histogram_quantile`` does (so no finer
    than the bucket bounds); ``None`` without observations.
    """
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: report that bound
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def between_scrapes(before: str, after: str, histogram: str, *qs: float) -> list[float | None]:
    """The ``qs`` quantiles (:func:`bucket_quantile`) of ``histogram`` between two scrapes."""
    buckets = parse_buckets(before, histogram), parse_buckets(after, histogram)
    return [bucket_quantile(*buckets, q) for q in qs]


async def fetch_metrics_text(session: aiohttp.ClientSession, admin: str) -> str:
    """The listener's ``/metrics`` page."""
    async with session.get(f"{admin}/metrics") as response:
        return await response.text()


async def fetch_metrics(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    """The listener's metrics, totalled per name (:func:`parse_metrics`)."""
    return parse_metrics(await fetch_metrics_text(session, admin))


async def wait_ready(
    session: aiohttp.ClientSession,
    admin: str,
    proc: subprocess.Popen[bytes],
    within: float,
    *,
    path: str = "/readyz",
) -> None:
    """
    Wait until the listener's ``/readyz`` (or ``path``: ``/readyz?for=intake`` with no
    broker) answers 200 (or it died, or ``within`` passed).
    """
    deadline = time.monotonic() + within
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the listener exited with {proc.returncode} while starting")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{admin}{path}") as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the listener was not ready after {within:.0f}s")
        await asyncio.sleep(0.05)


def thread_schedstat(pid: int) -> tuple[float, float]:
    """
    The seconds the process's main thread (its event loop) has spent on a CPU and
    waiting in the run queue for one (``/proc/<pid>/task/<pid>/schedstat``; zeros where
    the kernel does not keep it).
    """
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        return int(fields[0]) / 1e9, int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` ``pid`` for ``seconds`` into ``output`` (format from its suffix)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        say("--profile needs py-spy (pip install py-spy); skipped")
        return None
    fmt = {".json": "speedscope", ".svg": "flamegraph"}.get(output.suffix, "raw")
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(round(seconds), 1)),
        "--rate",
        "250",
        "--format",
        fmt,
        "--threads",
        "--output",
        str(output),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- broker objects ------------------------------------------------------------------------


# The kind of every queue the bench routes to (the taps that stand for a consumer's queue,
# ceiling B's queue): ``python -m bench --tap-queue`` sets it for the run and its
# children. A broker confirms a persistent message once every queue it went to has it on
# disk, so this kind sets the floor under every confirm latency the bench prints: on
# RabbitMQ 3.10.8 here, paced at 3,600/s, a version 1 classic queue's confirms took
# p99 45-142 ms, a version 2 one's 4-9 ms, a quorum queue's 2-3 ms (bench/README.md).
TAP_QUEUE_ENV = "BENCH_TAP_QUEUE"
TAP_QUEUES: dict[str, dict[str, Any]] = {
    "v1": {"x-queue-version": 1},
    "v2": {"x-queue-version": 2},
    "quorum": {"x-queue-type": "quorum"},
}
TAP_QUEUE_DEFAULT = "v2"


def tap_queue() -> str:
    """The kind of queue this run routes to (:data:`TAP_QUEUES`); exits on an unknown one."""
    kind = os.environ.get(TAP_QUEUE_ENV) or TAP_QUEUE_DEFAULT
    if kind not in TAP_QUEUES:
        raise SystemExit(
            f"{TAP_QUEUE_ENV}={kind!r}: expected one of {', '.join(sorted(TAP_QUEUES))}"
        )
    return kind


def tap_arguments(**extra: Any) -> dict[str, Any]:
    """The ``x-`` arguments of a queue the bench routes to, with ``extra`` ones."""
    return {**TAP_QUEUES[tap_queue()], **extra}


async def declare_tap(exchange: str, queue: str, *, max_length: int | None = None) -> None:
    """
    A durable topic ``exchange`` with a durable ``queue`` (:func:`tap_arguments`) bound
    ``#``, before the listener; ``max_length``: the broker drops the oldest message for
    each one past it.
    """
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        bounded = {"x-max-length": max_length, "x-overflow": "drop-head"} if max_length else {}
        q = await channel.declare_queue(queue, durable=True, arguments=tap_arguments(**bounded))
        await q.bind(ex, "#")
    finally:
        await connection.close()


async def queue_count(queue: str) -> int:
    """Messages ready in ``queue``."""
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def cleanup_topology(exchange: str, queue: str) -> None:
    """Delete the tap queue and what the listener declared (CONTRACT §4 topology)."""
    connection = await aio_pika.connect(BROKER_URL)
    try:
        for name in (queue, f"{exchange}.quarantine", f"{exchange}.archive"):
            channel = await connection.channel()  # a failed delete closes its channel
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in (exchange, f"{exchange}.quarantine"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


# -- output --------------------------------------------------------------------------------


def describe_cores(cores: dict[str, float]) -> str:
    """``listener 0.93, broker 0.55, loadgen 0.21, other 0.05, idle 0.2`` (cores)."""
    return ", ".join(f"{role} {value:.2f}" for role, value in cores.items())


def fmt_rate(value: float | None) -> str:
    """A rate per second, or ``-``."""
    return "-" if value is None else f"{value:,.0f}/s"


def fmt_ms(value: float | None) -> str:
    """Milliseconds with two decimals, or ``-``."""
    return "-" if value is None else f"{value:.2f} ms"


def fmt_bytes(value: int | None) -> str:
    """A size in MiB, or ``-``."""
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def fmt_ratio(value: float | None) -> str:
    """A ratio with two decimals, or ``-``."""
    return "-" if value is None else f"{value:.2f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns (left for text, right for figures)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def say(message: str) -> None:
    """Progress on stderr, so the figures on stdout stay clean."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def serve_post(
    handler: Callable[[aiohttp.web.Request], Coroutine[Any, Any, aiohttp.web.StreamResponse]],
    port: int,
) -> None:
    """Serve ``handler`` for every POST on 127.0.0.1:``port`` until SIGTERM/SIGINT."""
    from aiohttp import web  # noqa: PLC0415 - the server processes only

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
