"""
The publisher alone: the daemon starting on a journal that holds 200,000 pending
events (what a long broker outage leaves behind), draining it into one durable queue,
beside a raw ceiling R measured in the same run (:mod:`bench.raw`: a minimal client
that builds its frames once and keeps 4,096 publishes in flight over one socket).

Measured on the daemon (``python -m listener run``, no sources, archive off): the
rate from its first confirmed event until the journal has nothing pending (its own
counters, polled on the admin port every 100 ms), and its resident memory while it
drains (sampled with each poll; the peak is the kernel's ``VmHWM``). Goals (the
performance issue): rate ≥ 0.5 x R, peak RSS < 150 MB and flat.

``python -m bench.drain [--events N]`` runs it alone; ``python -m bench`` runs it after
the replay part.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from bench.common import (
    BROKER_URL,
    child,
    cleanup_topology,
    current_rss,
    declare_tap,
    fetch_metrics,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    free_port,
    peak_rss,
    python_module,
    say,
    table,
    unique,
)
from bench.raw import ceiling_r
from bench.replay import badge_entries
from listener.config import JournalConfig
from listener.journal import Journal

__all__ = ["Drain", "run"]

EVENTS = 200_000
RATIO_GOAL = 0.5
RSS_GOAL = 150 * 1024 * 1024
POLL = 0.1


@dataclass
class Drain:
    """What one drain measured."""

    events: int
    published: int
    seconds: float
    peak_rss: int | None
    rss: list[tuple[int, int]] = field(default_factory=list)  # (events left, bytes)

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


async def _fill(path: Path, events: int) -> None:
    """Journal ``events`` pending ~1 KiB CloudEvents."""
    async with Journal(config=JournalConfig(path=path)) as journal:
        for start in range(0, events, 2000):
            await journal.append(badge_entries(start, min(start + 2000, events)))


async def _drain(directory: Path, events: int, exchange: str) -> Drain:
    journal = directory / "journal.db"
    say(f"drain: journaling {events:,} pending events")
    await _fill(journal, events)
    admin_port = free_port()
    config = {
        "log": {"level": "warning", "format": "json"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "broker": {"url": BROKER_URL, "exchange": exchange, "archive": {"enabled": False}},
        "journal": {"path": str(journal), "synchronous": "full"},
        "sources": [],
    }
    path = directory / "listener.yaml"
    path.write_text(yaml.safe_dump(config))
    admin = f"http://127.0.0.1:{admin_port}"
    say("drain: the listener drains it")
    argv = python_module("listener", "run", "--config", str(path))
    with child(argv, log=directory / "listener.log") as proc:
        rss: list[tuple[int, int]] = []
        first: tuple[float, float] | None = None  # (when, published) at the first confirm
        deadline = time.monotonic() + 600
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the listener ended or did not drain in 10 minutes")
                try:
                    counters = await fetch_metrics(session, admin)
                except aiohttp.ClientError:
                    await asyncio.sleep(POLL)
                    continue
                now = time.monotonic()
                published = counters.get("listener_events_published_total", 0.0)
                pending = int(counters.get("listener_journal_pending", events))
                if (size := current_rss(proc.pid)) is not None:
                    rss.append((pending, size))
                if first is None and published > 0:
                    first = (now, published)
                if first is not None and pending == 0 and published >= events:
                    break
                await asyncio.sleep(POLL)
        assert first is not None
        peak = peak_rss(proc.pid)
        return Drain(events, int(published - first[1]), now - first[0], peak, rss)


def _rss_profile(drain: Drain) -> str:
    """RSS when 100/75/50/25/0 % of the events were left."""
    points = []
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        left = int(drain.events * share)
        sample = min(drain.rss, key=lambda s: abs(s[0] - left), default=None)
        if sample is not None:
            points.append(f"{round(share * 100)}% {fmt_bytes(sample[1])}")
    return ", ".join(points)


def run(*, events: int = EVENTS) -> list[list[str]]:
    """Measure R and the daemon's drain; print and return the table rows."""
    exchanges = [unique("bench.raw"), unique("bench.raw0"), unique("bench.drain")]
    for name in exchanges:  # each into an empty queue of its own
        asyncio.run(declare_tap(name, f"{name}.tap"))
    try:
        say(f"drain: ceiling R, {events:,} messages shaped as the daemon's")
        raw = ceiling_r(exchanges[0], count=events, seconds=60.0)
        say(f"drain: R0, {events:,} bare messages (the first R's)")
        bare = ceiling_r(exchanges[1], count=events, seconds=60.0, shape="bare")
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
            drain = asyncio.run(_drain(Path(tmp), events, exchanges[2]))
    finally:
        for name in exchanges:
            asyncio.run(cleanup_topology(name, f"{name}.tap"))
    ratio = drain.rate / raw.rate if raw.rate else None
    rows = [
        ["R   raw client: frames built once, 4,096 in flight", fmt_rate(raw.rate), "-", "-", "-"],
        ["R0  the same, a bare message (reference)", fmt_rate(bare.rate), "-", "-", "-"],
        [
            f"listener draining {events:,} journaled events",
            fmt_rate(drain.rate),
            fmt_ratio(ratio),
            fmt_ratio(drain.rate / bare.rate if bare.rate else None),
            fmt_bytes(drain.peak_rss),
        ],
    ]
    print(table(rows, ["run", "rate", "÷ R", "÷ R0", "peak RSS"]))
    print(
        "R publishes the daemon's message shape (mandatory, its six properties); R0 the "
        "first R's (not mandatory, three properties): the goal is judged on R"
    )
    print(f"RSS while draining (share of events left): {_rss_profile(drain)}")
    verdict = (
        "PASS"
        if ratio is not None
        and ratio >= RATIO_GOAL
        and drain.peak_rss is not None
        and drain.peak_rss < RSS_GOAL
        else "BELOW"
    )
    print(
        f"goal: drain ≥ {RATIO_GOAL} x R and peak RSS < {fmt_bytes(RSS_GOAL)} -> "
        f"{fmt_ratio(ratio)}, {fmt_bytes(drain.peak_rss)} {verdict}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--events", type=int, default=EVENTS, help="journaled events (200,000)")
    args = parser.parse_args()
    run(events=args.events)


if __name__ == "__main__":
    main()
