"""
Soak (the performance issue's goal 6): one listener daemon for a long run with every
source kind at about half its sustained maximum (paced webhooks, a Layerx402 stream
aborted every few minutes, Terrapin and Token Terminal polls; midway a broker restart
and, a minute later, a replay), sampled every minute: RSS, open file descriptors,
asyncio tasks, journal size, event lag. After the warm-up each must grow < 5% (the
journal: stay bounded by its retention). Prints the table and the verdict, never
asserts them. ``python -m bench --soak 30m`` or ``python -m bench.soak --minutes 30``;
what runs and how the verdict is reached: bench/README.md, "Soak". The load and the
disturbances are :mod:`bench.soak_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from bench.common import (
    between_scrapes,
    broker_reachable,
    cleanup_topology,
    current_rss,
    declare_tap,
    fetch_metrics_text,
    free_port,
    parse_metrics,
    python_module,
    say,
    stop_child,
    table,
    tap_queue,
    unique,
    wait_ready,
)
from bench.soak_load import (
    Disturbances,
    Simulators,
    WebhookDriver,
    broker_app,
    change_polled,
    log_summary,
    reap,
    simulators,
    soak_config,
    stamp,
    tap_depth,
)

__all__ = ["Options", "main", "main_for", "parse_duration", "run"]

LAG = "listener_event_lag_seconds"
LOOP = "listener_event_loop_lag_seconds"
WAIT = "listener_journal_wait_seconds"
COMMIT = "listener_journal_commit_seconds"
AFTER_SAMPLE = 10.0  # the broker restart starts this long after a sample began
TAIL = 10.0  # the webhook load runs past the last sample, which sees it at full strength
GROWTH = 0.05
TASK_EVERY = 5.0  # seconds between the scrapes whose median is the minute's task count
LAG_LIMIT = 1.0  # seconds
LOAD_SHORT = 0.9  # under this share of the asked rate received, the verdict says so
# The tap queue's bound (the broker drops its oldest message for each one past it): a
# purge of the minute's ~150,000 messages held the broker's confirms up to 2.5 s.
TAP_MAX = 30_000
MIB = 2**20
HEAD = ("min", "RSS MiB", "FDs", "tasks", "journal MiB", "pending", "received", "published")
HEAD += ("lag p99 ms", "loop p99/max ms", "journal wait p99/max ms", "commit max ms")
HEAD += ("tap depth", "events")
COUNTERS = (
    ("received", "listener_events_received_total"),
    ("published", "listener_events_published_total"),
    ("reconnects", "listener_source_reconnects_total"),
    ("stream gaps", "listener_stream_gaps_total"),
    ("poll changes", "listener_poll_changes_total"),
    ("duplicates", "listener_events_duplicate_total"),
    ("rejected", "listener_webhook_rejected_total"),
    ("quarantined", "listener_events_quarantined_total"),
    ("publish failures", "listener_publish_failures_total"),
)


def parse_duration(text: str) -> float:
    """``"30m"``, ``"90s"``, ``"1h"``, ``"45"`` (seconds) -> seconds."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"expected a positive duration such as 30m, 90s or 1h, not {text!r}")
    return value


@dataclass
class Options:
    """What the soak runs; zero fields are derived from the duration."""

    seconds: float
    webhook_rate: float = 1500.0
    stream_rate: float = 1000.0
    retention: float = 0.0
    drop_every: float = 0.0
    replay_window: float = 60.0

    def __post_init__(self) -> None:  # whole minutes (one sample each), at least three
        self.seconds = max(3, math.ceil(self.seconds / 60 - 1e-9)) * 60.0
        minutes = self.seconds / 60
        if not self.retention:
            self.retention = 60.0 * min(5, max(1, round(minutes / 4)))
        if not self.drop_every:
            self.drop_every = 240.0 if minutes >= 16 else 60.0 * max(1, round(minutes / 4))

    @property
    def minutes(self) -> int:
        """Samples after the first."""
        return round(self.seconds / 60)

    @property
    def warmup_minutes(self) -> int:
        """The first 20% (at least 2 minutes; a quarter of runs under 8 minutes)."""
        return math.ceil(max(0.2 * self.seconds, min(120.0, self.seconds / 4)) / 60 - 1e-9)

    @property
    def journal_bound(self) -> float:
        """(retention + 2 min) x the event rate x 1.2 KB: what the journal may hold."""
        return (self.retention + 120.0) * (self.webhook_rate + self.stream_rate) * 1200

    @property
    def restart_at(self) -> float:
        """The broker restart: right after the midway sample."""
        return 60.0 * (self.minutes // 2) + AFTER_SAMPLE


@dataclass
class _Run:
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    webhooks: str = ""
    log: str = ""


@dataclass
class Sample:
    """One minute's sample of the daemon; ``received``/``published`` are its totals."""

    minute: int
    rss: int
    fds: int
    tasks: int
    journal: int
    pending: int
    received: int
    published: int
    lag_p99: float | None  # seconds, over the minute before
    loop_p99: float | None = None  # the event loop's lag, seconds, over the minute before
    loop_max: float | None = None  # its longest, as the upper bound of its bucket
    # An append's wait from queued to durable, seconds, over the minute before: p99, longest.
    wait: tuple[float | None, float | None] = (None, None)
    commit_max: float | None = None  # the longest journal commit (bucket bound), seconds
    tap: int | None = None  # messages in the tap queue

    def row(self, before: Sample | None, events: list[tuple[float, str]]) -> list[str]:
        """The minute's row (:data:`HEAD`)."""
        lag, minute = self.lag_p99, self.minute
        texts = [text for at, text in events if 60.0 * (minute - 1) < at <= 60.0 * minute]
        return [
            str(minute),
            f"{self.rss / MIB:,.0f}",
            str(self.fds),
            str(self.tasks),
            f"{self.journal / MIB:,.1f}",
            f"{self.pending:,}",
            "-" if before is None else f"{self.received - before.received:,}",
            "-" if before is None else f"{self.published - before.published:,}",
            "-" if lag is None else f"{lag * 1000:,.0f}",
            "-"
            if self.loop_p99 is None or self.loop_max is None
            else f"{self.loop_p99 * 1000:,.1f} / ≤{self.loop_max * 1000:,.0f}",
            "-"
            if None in self.wait
            else f"{(self.wait[0] or 0) * 1000:,.1f} / ≤{(self.wait[1] or 0) * 1000:,.0f}",
            "-" if self.commit_max is None else f"≤{self.commit_max * 1000:,.1f}",
            "-" if self.tap is None else f"{self.tap:,}",
            "; ".join(dict.fromkeys(texts)),
        ]


def report(
    opts: Options, samples: list[Sample], events: list[tuple[float, str]], final: dict[str, float]
) -> bool:
    """Print the table and the verdict; whether everything stayed flat."""
    rows = [s.row(b, events) for b, s in zip([None, *samples], samples, strict=False)]
    for row in rows[1 : opts.warmup_minutes + 1]:
        row[0] += " (warm-up)"
    print()
    print(
        f"soak: {opts.minutes} min, webhooks {opts.webhook_rate:,.0f}/s, stream "
        f"{opts.stream_rate:,.0f}/s (4 subscriptions, aborted every {opts.drop_every:g} s), "
        f"Terrapin and Token Terminal polls; journal retention {opts.retention:g} s; "
        f"queues routed to: {tap_queue()}"
    )
    print(table(rows, HEAD))
    post = [s for s in samples if s.minute > opts.warmup_minutes]
    if len(post) < 2:
        print(f"verdict: none ({len(post)} minute(s) after the warm-up; a verdict needs 2)")
        return False
    k = min(3, max(1, len(post) // 2))
    print()
    print(
        f"growth: mean of minutes {post[-k].minute}..{post[-1].minute} against minutes "
        f"{post[0].minute}..{post[k - 1].minute} (after {opts.warmup_minutes} min of warm-up)"
    )
    bound = opts.journal_bound
    skip = {opts.minutes // 2 + 1, opts.minutes // 2 + 2}  # the restart's row, the next
    after = [s for s in post if s.minute > max(skip)]
    flat = True
    for name, unit, attr in (
        ("RSS", MIB, "rss"),
        ("open FDs", 1, "fds"),
        ("asyncio tasks", 1, "tasks"),
        ("journal size", MIB, "journal"),
    ):
        first, last = (sum(getattr(s, attr) for s in part) / k for part in (post[:k], post[-k:]))
        growth = (last - first) / first if first else 0.0
        ok = growth < GROWTH
        extra = ""
        if name == "journal size":
            most = max(s.journal for s in post)
            ok = ok or most < bound
            extra = f"; at most {most / MIB:,.0f} MiB, bound {bound / MIB:,.0f} MiB"
        if len(after) >= 2 * k:  # a step at the restart, or a trend?
            a, b = (sum(getattr(s, attr) for s in part) / k for part in (after[:k], after[-k:]))
            extra += f"; after the restart {a / unit:,.1f} -> {b / unit:,.1f}"
            extra += f" ({(b - a) / a if a else 0.0:+.1%})"
        flat &= ok
        print(
            f"  {name}: {first / unit:,.1f} -> {last / unit:,.1f} ({growth:+.1%}{extra}) "
            f"{'PASS' if ok else 'GROWS'}"
        )
    judged = [s for s in post if s.minute not in skip]
    slow = [s for s in judged if (s.lag_p99 or 0.0) > LAG_LIMIT]
    worst = max((s.lag_p99 or 0.0 for s in judged), default=0.0)
    print(
        f"  event lag p99 per minute (not minutes {min(skip)}-{max(skip)}: broker restart, "
        f"replay): {len(judged)} minutes judged, worst {worst * 1000:,.0f} ms; over "
        f"{LAG_LIMIT:g} s: {', '.join(str(s.minute) for s in slow) or 'none'} "
        f"{'PASS' if not slow else 'SLOW'}"
    )
    flat &= not slow
    counters = ", ".join(f"{label} {final.get(name, 0):,.0f}" for label, name in COUNTERS)
    print(f"  listener totals: {counters}")
    short = _load(opts, samples, judged)
    # A load that fell short judged a lighter daemon than asked: not a pass.
    print(f"verdict: {'NOT FLAT' if not flat else 'NOT JUDGED' if short else 'FLAT'}{short}")
    return flat and not short


def _load(opts: Options, samples: list[Sample], judged: list[Sample]) -> str:
    """
    Print the rate the listener received at in the ``judged`` minutes against the rate
    asked for; the verdict's caveat when it fell short (a host slower than the rates
    assume judges a lighter load).
    """
    asked = opts.webhook_rate + opts.stream_rate
    before = {s.minute: s for s in samples}  # (judged minutes follow the warm-up's)
    rates = [(s.received - before[s.minute - 1].received) / 60.0 for s in judged]
    if not rates:
        return ""
    reached = sum(rates) / len(rates)
    ok = reached >= LOAD_SHORT * asked
    print(
        f"  load: received {reached:,.0f} events/s (mean of the {len(rates)} judged "
        f"minutes) of the {asked:,.0f}/s asked {'PASS' if ok else 'SHORT'}"
    )
    if ok:
        return ""
    return f" (at {reached:,.0f} events/s, short of the {asked:,.0f}/s asked: not sustained)"


def _process(pid: int) -> tuple[int, int]:
    """RSS (``VmRSS``, bytes) and open file descriptors of ``pid``."""
    return current_rss(pid) or 0, len(os.listdir(f"/proc/{pid}/fd"))


def _tasks(metrics: dict[str, float]) -> int:
    """The daemon's asyncio tasks less the webhook requests in flight (a task each)."""
    in_flight = metrics.get("listener_webhook_requests_in_flight", 0)
    return int(metrics.get("listener_asyncio_tasks", 0) - in_flight)


class _TaskCount:
    """
    The task counts scraped every :data:`TASK_EVERY` seconds since the last sample; the
    minute's is their median. Tasks come and go with the work (a poll's fetches, a
    reconnect, a broker outage): a leak raises the median, a busy or quiet few seconds
    do not (the least of five scrapes 1 s apart read 21-23 where the run read 18).
    """

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def run(self, session: aiohttp.ClientSession, admin: str) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                self.seen.append(_tasks(parse_metrics(await fetch_metrics_text(session, admin))))
            await asyncio.sleep(TASK_EVERY)

    def take(self, last: int) -> int:
        seen, self.seen = [*self.seen, last], []
        return int(statistics.median_low(seen))


async def _sample(
    session: aiohttp.ClientSession,
    admin: str,
    pid: int,
    minute: int,
    before: str | None,
    tasks: _TaskCount,
) -> tuple[Sample, str]:
    text = await fetch_metrics_text(session, admin)
    metrics = parse_metrics(text)
    rss, fds = _process(pid)
    lag = loop = loop_max = commit_max = None
    wait: tuple[float | None, float | None] = (None, None)
    if before is not None:
        (commit_max,) = between_scrapes(before, text, COMMIT, 1.0)
        wait_p99, wait_max = between_scrapes(before, text, WAIT, 0.99, 1.0)
        wait = wait_p99, wait_max
        (lag,) = between_scrapes(before, text, LAG, 0.99)
        loop, loop_max = between_scrapes(before, text, LOOP, 0.99, 1.0)
    sample = Sample(
        minute=minute,
        rss=rss,
        fds=fds,
        tasks=tasks.take(_tasks(metrics)),
        journal=int(metrics.get("listener_journal_bytes", 0)),
        pending=int(metrics.get("listener_journal_pending", 0)),
        received=int(metrics.get("listener_events_received_total", 0)),
        published=int(metrics.get("listener_events_published_total", 0)),
        lag_p99=lag,
        loop_p99=loop,
        loop_max=loop_max,
        wait=wait,
        commit_max=commit_max,
    )
    return sample, text


async def _minutes(
    opts: Options,
    run: _Run,
    sims: Simulators,
    proc: subprocess.Popen[bytes],
    session: aiohttp.ClientSession,
    admin: str,
    t0: float,
    tap: str,
    text: str,
    tasks: _TaskCount,
) -> str:
    """A sample at the end of every minute of the run; the last scrape's text."""
    for minute in range(1, opts.minutes + 1):
        await asyncio.sleep(max(0.0, t0 + 60.0 * minute - time.monotonic()))
        if proc.poll() is not None:
            raise RuntimeError(f"the listener exited with {proc.returncode}")
        sample, text = await _sample(session, admin, proc.pid, minute, text, tasks)
        sample.tap = await tap_depth(tap)
        run.samples.append(sample)
        row = zip(HEAD[:-1], sample.row(run.samples[-2], [])[:-1], strict=True)
        say(f"{stamp()} " + ", ".join(f"{h} {v}" for h, v in row))
        change_polled(sims, minute)
    return text


async def _soak(opts: Options, run: _Run, directory: Path) -> None:
    exchange = unique("bench.soak")
    queue = f"{exchange}.tap"
    await declare_tap(exchange, queue, max_length=TAP_MAX)
    proc: subprocess.Popen[bytes] | None = None
    driver: WebhookDriver | None = None
    disturbances: Disturbances | None = None
    disturbing: asyncio.Task[None] | None = None
    try:
        async with simulators(opts.stream_rate) as sims:
            http_port, admin_port = free_port(), free_port()
            config = directory / "listener.yaml"
            settings = soak_config(
                directory,
                http_port=http_port,
                admin_port=admin_port,
                exchange=exchange,
                stream_url=sims.stream.url,
                bonds_url=sims.bonds.url,
                tt_url=sims.tt.url,
                retention=opts.retention,
                max_size=int(max(2**30, 3 * opts.journal_bound)),  # only retention limits it
            )
            config.write_text(yaml.safe_dump(settings))
            driver = WebhookDriver(
                f"http://127.0.0.1:{http_port}", directory, opts.webhook_rate, uuid.uuid4().hex[:6]
            )
            signing = asyncio.create_task(driver.prepare(opts.seconds))
            with (directory / "listener.log").open("wb") as log:
                proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                    python_module("listener", "run", "--config", str(config)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            admin = f"http://127.0.0.1:{admin_port}"
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, admin, proc, within=30.0)
                await signing
                t0 = time.monotonic()
                driver.start(t0, t0 + opts.seconds + TAIL)
                disturbances = Disturbances(
                    t0,
                    seconds=opts.seconds,
                    drop_every=opts.drop_every,
                    restart_at=opts.restart_at,
                    replay_window=opts.replay_window,
                    config=config,
                    journal=Path(settings["journal"]["path"]),
                    stream=sims.stream,
                )
                disturbing = asyncio.create_task(disturbances.run())
                tasks = _TaskCount()
                sample, text = await _sample(session, admin, proc.pid, 0, None, tasks)
                run.samples.append(sample)
                scraping = asyncio.create_task(tasks.run(session, admin))
                try:
                    text = await _minutes(
                        opts, run, sims, proc, session, admin, t0, queue, text, tasks
                    )
                finally:
                    scraping.cancel()
                run.final = parse_metrics(text)
            await asyncio.to_thread(driver.stop)
            run.webhooks = driver.summary()
            run.failures += driver.failures
            if disturbing.done() and disturbing.exception() is not None:
                run.failures.append(f"disturbances: {disturbing.exception()!r}")
    finally:
        if driver is not None:
            driver.stop(timeout=0.1)
        if disturbing is not None and not disturbing.done():
            disturbing.cancel()
            with contextlib.suppress(BaseException):
                await disturbing
        if disturbances is not None:
            run.events, run.failures = disturbances.events, disturbances.failures + run.failures
            if disturbances.broker_down:  # interrupted while the broker was stopped
                await broker_app("start_app")
        if proc is not None:
            await asyncio.to_thread(stop_child, proc)
            run.log = log_summary(directory / "listener.log")
        await asyncio.to_thread(reap)
        with contextlib.suppress(Exception):
            await cleanup_topology(exchange, queue)


def run(opts: Options) -> int:
    """Run the soak and print the table and the verdict; 1 when the run broke."""
    if not broker_reachable():
        print("RabbitMQ not reachable on 127.0.0.1:5672; start one with: rabbitmq-server -detached")
        return 2
    say(f"soak: {opts.minutes} min, warm-up {opts.warmup_minutes} min; restart, replay midway")
    outcome = _Run()
    broke: str | None = None
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        try:
            asyncio.run(_soak(opts, outcome, Path(tmp)))
        except KeyboardInterrupt:
            broke = "interrupted"
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:
            broke = repr(exc)
            log = Path(tmp) / "listener.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-20:]
                print("listener log (last lines):\n" + "\n".join(tail))
    report(opts, outcome.samples, outcome.events, outcome.final)
    for line in (outcome.webhooks, outcome.log):
        if line:
            print(line)
    for failure in outcome.failures:
        print(f"WARNING: {failure}")
    if broke is not None:
        print(f"the soak stopped early: {broke}")
    sys.stdout.flush()
    return 0 if broke is None else 1


def main_for(duration: str) -> int:
    """``python -m bench --soak DURATION``: the soak alone, with the default rates."""
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        print(f"--soak: {exc}")
        return 2
    return run(Options(seconds=seconds))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak``."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=None, help="length (30)")
    parser.add_argument("--duration", default=None, help="length as 30m, 90s, 1h")
    parser.add_argument("--webhook-rate", type=float, default=1500.0, help="per second (1500)")
    parser.add_argument("--stream-rate", type=float, default=1000.0, help="per second (1000)")
    parser.add_argument("--retention", default=None, help="journal retention (5m)")
    parser.add_argument("--replay-window", default="1m", help="what the replay takes (1m)")
    args = parser.parse_args(argv)
    try:
        seconds = parse_duration(args.duration) if args.duration else 60.0 * (args.minutes or 30.0)
        retention = parse_duration(args.retention) if args.retention else 0.0
        replay_window = parse_duration(args.replay_window)
    except ValueError as exc:
        parser.error(str(exc))
    if args.webhook_rate <= 0 or args.stream_rate <= 0:
        parser.error("the rates must be positive")
    return run(
        Options(
            seconds=seconds,
            webhook_rate=args.webhook_rate,
            stream_rate=args.stream_rate,
            retention=retention,
            replay_window=replay_window,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
