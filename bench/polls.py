"""
Poll throughput (issue 9): a real ``listener run`` polling the Terrapin and Token
Terminal simulators (each in its own process), beside ceiling B measured in the same
run. Prints wall time, confirmed events per second and the ratio to B, and the
listener's peak RSS. Target: change events at ≥ 0.7 x B, RSS < 150 MB.

* Terrapin: 5,000 ISINs in batches of 1,000. The first poll is 5,000 first-sight
  events; then 10% of the records change and a poll is triggered
  (``POST /v1/sources/bonds/poll``): 500 change events.
* Token Terminal: 200 projects x 30 days (lookback), one chain: 200 requests,
  6,200 first-sight events.

The sources' budgets are set far above what the run needs, so the figures are the
listener's, not the budget's (a real budget of 800/min paces 200 requests over 15 s).

``python -m bench.polls [--quick]`` runs it alone; ``python -m bench`` runs it last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.ceilings import ceiling_b
from bench.common import (
    cleanup_topology,
    declare_tap,
    fetch_metrics_text,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    free_port,
    peak_rss,
    python_module,
    say,
    stop_child,
    table,
    unique,
    wait_port,
    wait_ready,
)
from listener.dev.simulators.terrapin import TerrapinSimulator, generate_isins
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
TARGET = 0.7
RSS_LIMIT = 150 * 2**20
KEY = "bench-key"


@dataclass(slots=True)
class Phase:
    name: str
    events: int
    seconds: float


async def _serve(kind: str, port: int, size: int) -> None:
    """One simulator, until cancelled (run in its own process)."""
    simulator: Any
    if kind == "terrapin":
        simulator = TerrapinSimulator(
            port=port, api_keys=[KEY], isins=generate_isins(size, seed=1), rate_limit=None
        )
    else:
        projects = [f"project{i:03d}" for i in range(size)]
        simulator = TokenTerminalSimulator(
            port=port, api_keys=[KEY], projects=projects, chains=["ethereum"], null_share=0
        )
    async with simulator:
        if kind == "terrapin":
            changed = asyncio.Event()

            def change() -> None:
                simulator.change_fraction(0.1, seed=2)
                changed.set()

            asyncio.get_running_loop().add_signal_handler(10, change)  # SIGUSR1: change 10%
        await asyncio.Event().wait()


def _config(
    directory: Path, source: dict[str, Any], *, exchange: str, admin_port: int
) -> dict[str, Any]:
    return {
        "log": {"level": "warning", "format": "json"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "admin": {
            "host": "127.0.0.1",
            "port": admin_port,
            "api_keys": [{"key": "bench-admin-key-0123456789", "scopes": ["read", "write"]}],
        },
        "broker": {"url": BROKER_URL, "exchange": exchange, "archive": {"enabled": False}},
        "journal": {"path": str(directory / f"{source['name']}.db")},
        "sources": [
            {"kind": "poll", "api_key": KEY, "interval": "1h", "rate_limit": "100000/1m", **source}
        ],
    }


BONDS = {
    "name": "bonds",
    "provider": "terrapin",
    "resources": [
        {"endpoint": "bond_reference", "isins": generate_isins(5000, seed=1), "batch_size": 1000}
    ],
}
TT = {
    "name": "tt",
    "provider": "tokenterminal",
    "resources": [
        {
            "endpoint": "project_metrics",
            "projects": [f"project{i:03d}" for i in range(200)],
            "metrics": ["fees", "revenue"],
            "lookback": "30d",
        }
    ],
}


async def _published(session: aiohttp.ClientSession, admin: str, source: str) -> int:
    total = 0.0
    for line in (await fetch_metrics_text(session, admin)).splitlines():
        if line.startswith("listener_events_published_total{") and f'source="{source}"' in line:
            total += float(line.rpartition(" ")[2])
    return int(total)


async def _until(
    session: aiohttp.ClientSession, admin: str, source: str, count: int, started: float
) -> float:
    while await _published(session, admin, source) < count:
        if time.monotonic() - started > 300:
            raise RuntimeError(f"{source}: {count} events not confirmed within 300 s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def _listener(
    directory: Path, source: dict[str, Any], port: int
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes], aiohttp.ClientSession]]:
    """A ``listener run`` with one poll source at ``port``, ready; a tap queue to route to."""
    exchange = unique("bench.polls")
    queue = f"{exchange}.tap"
    await declare_tap(exchange, queue)  # a queue to route to, as a consumer would have
    admin_port = free_port()
    config = directory / f"{source['name']}.yaml"
    source = {**source, "url": f"http://127.0.0.1:{port}"}
    config.write_text(
        yaml.safe_dump(_config(directory, source, exchange=exchange, admin_port=admin_port))
    )
    admin = f"http://127.0.0.1:{admin_port}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with (directory / f"{source['name']}.log").open("wb") as log:
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the child is measured
                python_module("listener", "run", "--config", str(config)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin, proc, within=30.0)
            yield admin, proc, session
    finally:
        if proc is not None:
            stop_child(proc)
        await cleanup_topology(exchange, queue)


async def _run(directory: Path) -> tuple[list[Phase], int | None]:
    bonds_port, tt_port = free_port(), free_port()
    sims = [
        # Popen returns at once: each simulator runs in its own process, off our cores' books.
        subprocess.Popen(python_module("bench.polls", "--serve", kind, str(port), str(size)))  # noqa: ASYNC220
        for kind, port, size in (("terrapin", bonds_port, 5000), ("tokenterminal", tt_port, 200))
    ]
    phases: list[Phase] = []
    rss: list[int | None] = []
    try:
        for port in (bonds_port, tt_port):
            wait_port(port, timeout=20.0)
        # Each from the moment its listener is ready: the first poll starts then.
        async with _listener(directory, BONDS, bonds_port) as (admin, proc, session):
            started = time.monotonic()
            phases.append(
                Phase(
                    "Terrapin first poll: 5,000 ISINs",
                    5000,
                    await _until(session, admin, "bonds", 5000, started),
                )
            )
            sims[0].send_signal(10)
            await asyncio.sleep(0.5)
            changed_at = time.monotonic()
            headers = {"Authorization": "Bearer bench-admin-key-0123456789"}
            async with session.post(f"{admin}/v1/sources/bonds/poll", headers=headers) as response:
                assert response.status == 202
            phases.append(
                Phase(
                    "Terrapin re-poll, 10% changed (500)",
                    500,
                    await _until(session, admin, "bonds", 5500, changed_at),
                )
            )
            rss.append(peak_rss(proc.pid))
        async with _listener(directory, TT, tt_port) as (admin, proc, session):
            started = time.monotonic()
            phases.append(
                Phase(
                    "Token Terminal: 200 projects x 31 days",
                    6200,
                    await _until(session, admin, "tt", 6200, started),
                )
            )
            rss.append(peak_rss(proc.pid))
    finally:
        for sim in sims:
            stop_child(sim)
    known = [r for r in rss if r is not None]
    return phases, max(known) if known else None


def run(*, seconds: int) -> list[str]:
    """Ceiling B, then the poll runs; print and return the report."""
    say(f"ceiling B: aio-pika publisher, {seconds:g} s")
    b = ceiling_b(seconds=seconds, mode="message")
    say(f"ceiling B: {b.rate:,.0f} msg/s")
    with tempfile.TemporaryDirectory(prefix="bench-polls-") as tmp:
        phases, rss = asyncio.run(_run(Path(tmp)))
    rows = [
        [
            p.name,
            f"{p.seconds:.2f} s",
            fmt_rate(p.events / p.seconds),
            fmt_ratio(p.events / p.seconds / b.rate),
        ]
        for p in phases
    ]
    rows.insert(0, ["B   aio-pika publish, confirms w=256", "-", fmt_rate(b.rate), "1.00"])
    lines = [
        table(rows, ["run (wall time: poll start -> last confirm)", "wall", "events/s", "x B"]),
        f"listener peak RSS {fmt_bytes(rss)} (target < {fmt_bytes(RSS_LIMIT)})",
    ]
    for phase in phases:
        ratio = phase.events / phase.seconds / b.rate
        verdict = "PASS" if ratio >= TARGET else "BELOW"
        lines.append(f"target: {phase.name}: events >= {TARGET} x B -> {ratio:.2f} {verdict}")
    lines.append(
        "(the re-poll's wall time includes the provider answering all 5,000 records and the"
        " listener reading and hashing them: 4,500 unchanged records per 500 events)"
    )
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.polls")
    parser.add_argument("--quick", action="store_true", help="3 s ceiling run")
    parser.add_argument(
        "--serve", nargs=3, metavar=("KIND", "PORT", "SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        kind, port, size = args.serve
        asyncio.run(_serve(kind, int(port), int(size)))
        return
    run(seconds=3 if args.quick else 10)


if __name__ == "__main__":
    main()
