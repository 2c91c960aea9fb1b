"""
``listener demo --replicas N``: N real ``listener run`` processes with
``cluster.enabled`` against the local broker and an in-process Layerx402 simulator
(three trade subscriptions, so three units), showing every second which replica holds
each unit and how many connections the simulator counts for it. A third of the way in,
the holder of the first unit is killed (SIGKILL); two thirds in, it starts again; the
end says how long the failover took and whether a unit was ever held twice.

Each replica has its own journal and config in a temporary directory and logs there;
the exchange is ``demo.<random>``; its queues are deleted at the end. Exit 1 when a
unit is unheld at the end or was held by two connections for longer than a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiormq
import yaml
from rich import box
from rich.table import Table

from listener.cluster.leases import Names
from listener.config import Config
from listener.config_loader import secret_values
from listener.dev.simulators.layerx402 import Layerx402Simulator

__all__ = ["MINTS", "ReplicasDemo", "held_units"]

MINTS = (
    "So11111111111111111111111111111111111111112",
    "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
    "Es9vMFrzaCERmJfrF8H2yFnByPjv2Y6Gk8tgTKxnxEq5",
)
LEASE_RETRY = 1.0
HEARTBEAT = 3.0
_HELD = re.compile(r'^listener_lease_held\{unit="([^"]+)"\} 1\.0$', re.MULTILINE)


def held_units(metrics: str) -> set[str]:
    """The units a replica's ``/metrics`` text says it holds (``listener_lease_held`` 1)."""
    return set(_HELD.findall(metrics))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Replica:
    """One ``listener run`` child."""

    number: int
    directory: Path
    admin_port: int
    proc: asyncio.subprocess.Process | None = None
    held: set[str] = field(default_factory=set)
    state: str = "starting"

    async def start(self) -> None:
        log = (self.directory / "listener.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "listener",
            "run",
            "--config",
            str(self.directory / "config.yaml"),
            cwd=self.directory,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.state = "running"

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        self.state, self.held = "killed", set()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def refresh(self, http: aiohttp.ClientSession) -> None:
        if self.proc is None or self.proc.returncode is not None:
            self.held = set()
            return
        try:
            async with http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as answer:
                self.held = held_units(await answer.text())
        except (aiohttp.ClientError, TimeoutError):
            self.held = set()


class ReplicasDemo:
    """Runs the replicas and the simulator; :meth:`table` shows them."""

    def __init__(self, *, base: Config, replicas: int, seconds: float) -> None:
        self.base = base
        self.count = replicas
        self.seconds = seconds
        self.exchange = f"demo.{secrets.token_hex(4)}"
        self.units = [f"lx.trades?mint={m}" for m in MINTS]
        self.replicas: list[Replica] = []
        self.sim: Layerx402Simulator | None = None
        self.notes: list[str] = []
        self.longest_double = 0.0
        self._double_since: dict[int, float] = {}
        self.failover: float | None = None
        self._stop = asyncio.Event()

    def redacted(self) -> list[str]:
        """What the log redaction must hide: the broker's passwords."""
        return secret_values(self.base)

    def interrupt(self) -> None:
        """Ctrl-C: end early (the replicas are still stopped cleanly)."""
        self._stop.set()

    def _connections(self) -> list[int]:
        sim = self.sim
        return [sim.subscribers("trades", {"mint": m}) if sim else 0 for m in MINTS]

    def table(self) -> Table:
        """Each unit: its holder and the connections the simulator counts for it."""
        table = Table(
            title=f"listener demo --replicas {self.count} · exchange {self.exchange}",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        table.add_column("unit")
        table.add_column("held by")
        table.add_column("connections at the provider", justify="right")
        for unit, connections in zip(self.units, self._connections(), strict=True):
            holders = [f"replica {r.number}" for r in self.replicas if unit in r.held]
            table.add_row(unit[:40] + "…", ", ".join(holders) or "-", str(connections))
        states = ", ".join(f"{r.number}: {r.state} ({len(r.held)})" for r in self.replicas)
        table.caption = f"replicas {states}" + (f"\n{self.notes[-1]}" if self.notes else "")
        return table

    def _configure(self, workdir: Path, sim_url: str) -> None:
        broker: dict[str, Any] = {
            "exchange": self.exchange,
            "archive": {"enabled": False},
        }
        nodes = [n.get_secret_value() for n in self.base.broker.nodes]
        broker["urls"] = nodes
        for number in range(1, self.count + 1):
            directory = workdir / f"replica-{number}"
            directory.mkdir()
            replica = Replica(number, directory, _free_port())
            config = {
                "log": {"level": "info", "format": "json"},
                "http": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": replica.admin_port},
                "broker": broker,
                "journal": {"path": str(directory / "journal.db")},
                "cluster": {"enabled": True, "lease_retry": f"{LEASE_RETRY}s"},
                "shutdown_timeout": "5s",
                "sources": [
                    {
                        "name": "lx",
                        "kind": "websocket",
                        "provider": "layerx402",
                        "url": sim_url,
                        "api_key": "test-key",
                        "subscriptions": [
                            {"channel": "trades", "params": {"mint": m}} for m in MINTS
                        ],
                    }
                ],
            }
            (directory / "config.yaml").write_text(yaml.safe_dump(config))
            self.replicas.append(replica)

    def _sample(self) -> None:
        now = time.monotonic()
        for index, connections in enumerate(self._connections()):
            if connections > 1:
                since = self._double_since.setdefault(index, now)
                self.longest_double = max(self.longest_double, now - since)
            else:
                self._double_since.pop(index, None)

    async def run(self, show: Callable[[], None]) -> tuple[str, int]:
        """Run the scenario; return the summary line and 0 (good) or 1."""
        with tempfile.TemporaryDirectory(prefix="listener-replicas-") as workdir:
            async with (
                Layerx402Simulator(rate=20) as sim,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            ):
                self.sim = sim
                self._configure(Path(workdir), sim.url)
                try:
                    await asyncio.gather(*(r.start() for r in self.replicas))
                    await self._scenario(http, show)
                    counted = self._connections()
                finally:
                    await asyncio.gather(*(r.stop() for r in self.replicas))
                    await self._cleanup()
                unheld = [u for u, c in zip(self.units, counted, strict=True) if c != 1]
        failover = f"{self.failover:.1f}s" if self.failover is not None else "not measured"
        bad = bool(unheld) or self.longest_double >= HEARTBEAT
        summary = (
            f"listener demo --replicas {self.count}: failover after SIGKILL {failover};"
            f" longest double hold {self.longest_double:.1f}s;"
            f" units not held once at the end: {len(unheld)}"
        )
        return summary, 1 if bad else 0

    async def _scenario(self, http: aiohttp.ClientSession, show: Callable[[], None]) -> None:
        started = time.monotonic()
        victim: Replica | None = None
        killed_at = 0.0
        while not self._stop.is_set() and time.monotonic() - started < self.seconds:
            elapsed = time.monotonic() - started
            for replica in self.replicas:
                await replica.refresh(http)
            self._sample()
            if victim is None and elapsed >= self.seconds / 3:
                holder = next((r for r in self.replicas if self.units[0] in r.held), None)
                if holder is not None:
                    victim, killed_at = holder, time.monotonic()
                    holder.kill()
                    self.notes.append(f"killed replica {holder.number} (SIGKILL)")
            elif victim is not None and self.failover is None:
                taker = next((r for r in self.replicas if self.units[0] in r.held), None)
                if taker is not None and self._connections()[0] == 1:
                    self.failover = time.monotonic() - killed_at
                    self.notes.append(
                        f"replica {taker.number} holds it {self.failover:.1f}s after the kill"
                    )
            if victim is not None and victim.state == "killed" and elapsed >= 2 * self.seconds / 3:
                await victim.start()
                self.notes.append(f"replica {victim.number} started again")
            show()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._stop.wait()

    async def _cleanup(self) -> None:
        """Delete the demo's exchanges and queues (leases vanish with the replicas)."""
        names = Names(self.exchange)
        with contextlib.suppress(Exception):  # best effort: a demo exchange is harmless
            connection = await aiormq.connect(self.base.broker.nodes[0].get_secret_value())
            try:
                channel = await connection.channel()
                for unit in self.units:
                    await channel.queue_delete(names.cursor(unit))
                await channel.queue_delete(f"{self.exchange}.quarantine")
                for name in (
                    self.exchange,
                    f"{self.exchange}.quarantine",
                    f"{self.exchange}.cluster",
                ):
                    await channel.exchange_delete(name)
            finally:
                await connection.close()
