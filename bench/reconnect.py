"""
How soon the listener is back after a healthy stream connection drops: a Layerx402
simulator (in this process, paced at 200 events/s) aborts the listener's TCP
connection without a close frame, like a network failure, five times, each after the
connection had been up past ``healthy_after``; measured is the time from the abort
until the simulator holds an authenticated connection again (the reconnect attempt,
the handshake and the auth: an upper bound on when the attempt started). Goal (the
performance issue): the first reconnect attempt within 250 ms, jittered.

The listener runs as ``python -m listener run`` with ``healthy_after: 2s`` (the
default is 30 s: the same policy, sooner).

``python -m bench.reconnect`` runs it alone; ``python -m bench`` runs it after the
stream part.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import child, fmt_ms, free_port, python_module, say, unique
from bench.streams import API_KEY, SOURCE, SUBSCRIPTIONS, listener_config
from listener.dev.simulators.layerx402 import Layerx402Simulator

__all__ = ["run"]

DROPS = 5
HEALTHY_AFTER = 2.0
GOAL_MS = 250.0


async def _connected(simulator: Layerx402Simulator) -> None:
    """Until the simulator holds one authenticated connection (30 s at most)."""
    await simulator.wait_until(
        lambda: simulator.connections == 1, timeout=30.0, what="the listener connected"
    )


async def _measure(directory: Path) -> list[float]:
    async with Layerx402Simulator(
        port=0, api_keys={API_KEY}, rate=200, record=False, compression=None
    ) as simulator:
        config = listener_config(
            directory,
            url=simulator.url,
            subscriptions=1,
            http_port=free_port(),
            admin_port=free_port(),
            exchange=unique("bench.reconnect"),
            archive=False,
        )
        config["broker"]["url"] = "amqp://guest:guest@127.0.0.1:1/"  # journaling only
        config["sources"][0]["reconnect"] = {"healthy_after": f"{HEALTHY_AFTER:g}s"}
        path = directory / "listener.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = python_module("listener", "run", "--config", str(path))
        with child(argv, log=directory / "listener.log"):
            await _connected(simulator)
            took: list[float] = []
            for _ in range(DROPS):
                await asyncio.sleep(HEALTHY_AFTER + 0.5)
                started = time.monotonic()
                await simulator.drop_all(None)
                await _connected(simulator)
                took.append((time.monotonic() - started) * 1000)
            return took


def run() -> list[float]:
    """Measure and print the reconnect times (milliseconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        say(f"reconnect: {DROPS} abrupt drops of a healthy stream connection")
        took = asyncio.run(_measure(Path(tmp)))
    verdict = "PASS" if max(took) <= GOAL_MS else "BELOW"
    print(
        f"reconnect after an abrupt drop of a healthy connection (source {SOURCE!r}, "
        f"{len(SUBSCRIPTIONS[1])} subscription): "
        + ", ".join(fmt_ms(t) for t in took)
        + f"; median {fmt_ms(statistics.median(took))}, max {fmt_ms(max(took))} "
        f"-> goal <= {GOAL_MS:g} ms {verdict}"
    )
    return took


if __name__ == "__main__":
    run()
