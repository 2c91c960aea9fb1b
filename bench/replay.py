"""
Replay throughput: ``listener replay`` from the journal and from the archive stream
into one queue, beside ceiling B (a bare aio-pika publisher, 256 confirms in flight)
measured in the same run. Target: at least 0.7 of ceiling B.

The rate is the one the replay reports (start to last confirm). An archive replay
includes its end-of-stream wait (a stream has no message count: the reader stops after
a second without deliveries), so more events give a truer archive figure.

``python -m bench.replay [--events N] [--seconds S]`` runs it alone; ``python -m bench``
runs it after the webhook and stream parts.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiormq
import yaml

from bench.ceilings import ceiling_b
from bench.common import fmt_rate, fmt_ratio, python_module, say, table, tap_arguments, unique
from handlers import Event
from listener.broker.confirms import ConfirmWindow, Outgoing
from listener.broker.topology import declare_topology, properties_for, raw_connection
from listener.config import Config
from listener.envelope import Entry, event_entry
from listener.journal import Journal

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
TARGET = 0.7
EVENTS = 40_000
_RATE = re.compile(r"replayed (\d+) of (\d+) events .* in ([\d.]+)s \((\d+)/s\)")


def badge_entries(start: int, stop: int) -> list[Entry]:
    """Journal entries ``evt_<start>`` … ``evt_<stop - 1>``: ~1 KiB CloudEvents, a minute old."""
    now = time.time()
    moment = datetime.fromtimestamp(now - 60, UTC)
    pad = "x" * 700  # a ~1 KiB CloudEvent, like ceiling B's messages
    return [
        event_entry(
            source="bench",
            provider="getstoken",
            event=Event(
                id=f"evt_{i}",
                type="getstoken.badge.issued",
                time=moment,
                data={"badge_id": f"b_{i}", "user_id": "u_1", "badge_type": "gold", "pad": pad},
            ),
            received_at=now - 60,
        )
        for i in range(start, stop)
    ]


async def _prepare(config: Config, events: int) -> None:
    """Journal ``events`` published events and put the same into the archive stream."""
    entries = badge_entries(0, events)
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(raw_connection(connection), config.broker)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        async with Journal(config=config.journal) as journal:
            for start in range(0, events, 1000):
                await journal.append(entries[start : start + 1000])
            stored = await journal.pending(after_seq=0, limit=events)
            async with ConfirmWindow(underlay, size=256, timeout=30) as window:
                for row in stored:
                    await window.publish(
                        Outgoing(
                            row.entry.body,
                            config.broker.exchange,
                            row.entry.routing_key,
                            properties_for(row),
                        )
                    )
            await journal.mark_published([r.seq for r in stored], wait=True)
    finally:
        await connection.close()


async def _queue(name: str, *, delete: bool = False, exchange: str | None = None) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        if delete:
            await channel.queue_delete(name)
            if exchange:
                for queue in (f"{exchange}.quarantine", f"{exchange}.archive"):
                    await channel.queue_delete(queue)
                for ex in (exchange, f"{exchange}.quarantine"):
                    await channel.exchange_delete(ex)
        else:
            queue = await channel.declare_queue(name, durable=True, arguments=tap_arguments())
            await queue.purge()
    finally:
        await connection.close()


def _replay(config_path: Path, origin: str, queue: str) -> tuple[int, float]:
    argv = python_module(
        "listener",
        "replay",
        "--config",
        str(config_path),
        "--since",
        "1d",
        "--from",
        origin,
        "--to-queue",
        queue,
    )
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"replay failed ({out.returncode}): {out.stderr.strip()}")
    match = _RATE.search(out.stdout)
    if match is None:
        return 0, elapsed
    published, rate = int(match[1]), int(match[4])
    return published, published / rate if rate else elapsed


def run(*, events: int = EVENTS, seconds: float = 5.0) -> list[list[str]]:
    """Measure ceiling B and both replays; return the table rows (and print them)."""
    exchange = unique("bench.replay")
    queue = f"{exchange}.target"
    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "broker": {"url": BROKER_URL, "exchange": exchange},
            "journal": {"path": str(Path(tmp) / "journal.db")},
            "sources": [],
        }
        config = Config.model_validate(raw)
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        say(f"replay: preparing {events:,} events in the journal and the archive")
        asyncio.run(_prepare(config, events))
        say(f"replay: ceiling B, {seconds:g} s")
        ceiling = ceiling_b(seconds=seconds).rate
        rows: list[list[str]] = [["B   aio-pika publish, confirms w=256", fmt_rate(ceiling), "-"]]
        try:
            for origin in ("journal", "archive"):
                asyncio.run(_queue(queue))
                say(f"replay: from the {origin}")
                published, took = _replay(config_path, origin, queue)
                rate = published / took if took else 0.0
                ratio = rate / ceiling if ceiling else None
                rows.append(
                    [
                        f"replay from the {origin} -> queue ({published:,})",
                        fmt_rate(rate),
                        fmt_ratio(ratio),
                    ]
                )
        finally:
            asyncio.run(_queue(queue, delete=True, exchange=exchange))
    print(table(rows, ["run", "rate", "÷ ceiling B"]))
    print(f"target: ≥ {TARGET} of ceiling B for each replay")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replay")
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    run(events=args.events, seconds=args.seconds)


if __name__ == "__main__":
    main()
