"""
Three ``listener run`` processes on one broker (CONTRACT §10), the Layerx402 simulator
counting connections at the server side: each subscription is held by exactly one
connection, units spread, and a SIGKILL, a SIGTERM, a broker restart and a replica
blackholed from the broker each hand the units over, with the ledger's verdict
(lost 0; duplicates counted) and the failover time in the chaos table.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from listener.dev.replicas import held_units
from listener.dev.simulators.layerx402 import Layerx402Simulator
from tests.chaos import rabbit
from tests.chaos.ledger import Ledger, ledger
from tests.conftest import BROKER_HOST, BROKER_PORT, UNIT, config_data, wait_for
from tests.faults import TcpProxy, proxy
from tests.process import ListenerProcess
from tests.test_cluster import MINTS, SUBS
from tests.test_streams import expected_ids, lx_source

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("cleanup_topology")]

LEASE_RETRY = 1.0
HEARTBEAT = 3.0  # the cluster default


class Replicas:
    """Three replica processes, and what the simulator says about their connections."""

    def __init__(self, sim: Layerx402Simulator, processes: list[ListenerProcess]) -> None:
        self.sim = sim
        self.processes = processes
        self.held: list[set[str]] = [set() for _ in processes]
        #: The longest time any subscription had two connections at once (s).
        self.longest_double = 0.0
        self._double_since: dict[str, float] = {}

    def counts(self) -> list[int]:
        return [self.sim.subscribers("trades", {"mint": m}) for m in MINTS]

    async def sample(self) -> None:
        """Every 50 ms: how many connections hold each subscription at the server."""
        while True:
            now = time.monotonic()
            for mint, count in zip(MINTS, self.counts(), strict=True):
                if count > 1:
                    since = self._double_since.setdefault(mint, now)
                    self.longest_double = max(self.longest_double, now - since)
                else:
                    self._double_since.pop(mint, None)
            await asyncio.sleep(0.05)

    async def refresh(self) -> None:
        """Each live replica's held units, from its /metrics."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            for i, process in enumerate(self.processes):
                if process.proc is None or process.proc.returncode is not None:
                    self.held[i] = set()
                    continue
                try:
                    async with http.get(f"http://127.0.0.1:{process.admin_port}/metrics") as r:
                        self.held[i] = held_units(await r.text())
                except (aiohttp.ClientError, TimeoutError):
                    self.held[i] = set()

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Refresh until ``predicate()``; return how long it took."""
        started = time.monotonic()

        async def check() -> bool:
            await self.refresh()
            return predicate()

        while not await check():
            if time.monotonic() - started > timeout * UNIT:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {self.held}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def spread(self) -> bool:
        live = [
            held
            for held, p in zip(self.held, self.processes, strict=True)
            if p.proc and p.proc.returncode is None
        ]
        return (
            self.counts() == [1, 1, 1]
            and max(len(h) for h in live) - min(len(h) for h in live) <= 1
            and sum(len(h) for h in live) == 3
        )

    def holder_of(self, unit: str) -> int:
        return next(i for i, held in enumerate(self.held) if unit in held)


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path,
    broker_urls: list[str],
    exchange: str,
    sim: Layerx402Simulator,
) -> AsyncIterator[Replicas]:
    processes = []
    for i, url in enumerate(broker_urls):
        directory = tmp_path / f"r{i}"
        directory.mkdir()
        data = config_data(
            directory,
            broker_url=url,
            exchange=exchange,
            sources=[lx_source(sim.url, subscriptions=SUBS)],
            cluster={"enabled": True, "lease_retry": f"{LEASE_RETRY}s"},
        )
        del data["broker"]["heartbeat"]  # the cluster default, 3 s
        processes.append(ListenerProcess(directory, data))
    group = Replicas(sim, processes)
    sampler = asyncio.create_task(group.sample())
    try:
        await asyncio.gather(*(p.start() for p in processes))
        yield group
    finally:
        sampler.cancel()
        for process in processes:
            await process.stop()


@contextlib.asynccontextmanager
async def producing(sim: Layerx402Simulator) -> AsyncIterator[None]:
    """40 events a second per subscription, from now on (the simulator runs manual)."""

    async def produce() -> None:
        while True:
            for mint in MINTS:
                sim.emit("trades", {"mint": mint}, 2)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(produce())
    try:
        yield
    finally:
        task.cancel()


def acknowledge_produced(book: Ledger, sim: Layerx402Simulator) -> None:
    """
    Every event the simulator produced is owed: production started once every
    subscription was held, and the simulator keeps them all for since_seq.
    """
    book.acknowledge("lx", [i for ids in expected_ids(sim).values() for i in ids])


async def flowing(book: Ledger, sim: Layerx402Simulator, timeout: float = 15) -> None:
    """Events of every subscription reach the exchange again."""
    before = dict(book.deliveries)
    await wait_for(
        lambda: sum(1 for k, n in book.deliveries.items() if n and k not in before) >= 3 * 5,
        timeout=timeout,
        what="events flowing again",
    )


@contextlib.asynccontextmanager
async def scenario(
    tmp_path: Path,
    broker_url: str,
    exchange: str,
    *,
    name: str,
    run: str,
    urls: list[str] | None = None,
) -> AsyncIterator[tuple[Ledger, Layerx402Simulator, Replicas]]:
    """
    Three replicas holding one unit each, events flowing; after the block, every event
    produced is owed: the ledger checks that none was lost, and no subscription had two
    connections for a heartbeat or longer.
    """
    async with (
        ledger(broker_url, exchange, scenario=name, run=run) as book,
        Layerx402Simulator(rate="manual") as sim,
        replicas(tmp_path, urls or [broker_url] * 3, exchange, sim) as group,
    ):
        await group.until(group.spread, 20, "units spread, one each")
        async with producing(sim):
            await flowing(book, sim)
            yield book, sim, group
        acknowledge_produced(book, sim)
        book.fault_cleared()
        book.note(double_held_s=round(group.longest_double, 2))
        verdict = await book.check()
        assert verdict.lost == 0
        assert group.longest_double < HEARTBEAT, group.longest_double


@pytest.mark.timeout(150)
async def test_replicas_sigkill_and_sigterm_of_the_holder(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """SIGKILL of a holder → a survivor within 10 s; SIGTERM → within lease_retry + 2 s."""
    async with scenario(
        tmp_path, broker_url, exchange_name, name="replicas: SIGKILL, SIGTERM", run=chaos_run
    ) as (book, sim, group):
        unit = f"lx.trades?mint={MINTS[0]}"
        victim = group.holder_of(unit)
        group.processes[victim].kill()
        killed = time.monotonic()
        await group.until(lambda: any(unit in h for h in group.held), 10, "a survivor holds it")
        await wait_for(lambda: group.counts()[0] == 1, timeout=10, what="subscribed again")
        await flowing(book, sim)
        sigkill_failover = time.monotonic() - killed
        assert sigkill_failover < 10, sigkill_failover

        await group.processes[victim].start()  # it comes back; the units spread again
        await group.until(group.spread, 20, "spread again after the restart")
        holder = group.holder_of(unit)
        terminating = asyncio.create_task(group.processes[holder].terminate())
        stopped = time.monotonic()
        await group.until(
            lambda: any(unit in h for i, h in enumerate(group.held) if i != holder),
            LEASE_RETRY * 1.25 + 2,
            "taken over after SIGTERM",
        )
        sigterm_failover = time.monotonic() - stopped
        assert await terminating == 0
        await wait_for(lambda: group.counts()[0] == 1, timeout=10, what="subscribed again")
        await flowing(book, sim)
        book.note(failover_s=f"kill {sigkill_failover:.2f} / term {sigterm_failover:.2f}")


@pytest.mark.timeout(150)
async def test_replicas_broker_restart(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """The broker restarts under three replicas: every unit held again, never twice for long."""
    async with (
        rabbit.broker_app() as app,
        scenario(
            tmp_path, broker_url, exchange_name, name="replicas: broker restart", run=chaos_run
        ) as (book, sim, group),
    ):
        await app.stop()
        await asyncio.sleep(2)
        await app.start()
        restarted = time.monotonic()
        await group.until(group.spread, 30, "every unit held again")
        await flowing(book, sim, timeout=30)
        book.note(failover_s=round(time.monotonic() - restarted, 2))


@pytest.mark.timeout(150)
async def test_replica_blackholed_from_the_broker(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """A replica that cannot reach the broker stops its units; the others take them."""
    async with contextlib.AsyncExitStack() as stack:
        proxies: list[TcpProxy] = [
            await stack.enter_async_context(proxy(BROKER_HOST, BROKER_PORT)) for _ in range(3)
        ]
        urls = [p.url("amqp", "/", "guest:guest") for p in proxies]
        book, sim, group = await stack.enter_async_context(
            scenario(
                tmp_path,
                broker_url,
                exchange_name,
                name="replicas: one blackholed",
                run=chaos_run,
                urls=urls,
            )
        )
        victim = 0
        lost_units = set(group.held[victim])
        proxies[victim].blackhole()
        cut = time.monotonic()
        await group.until(
            lambda: all(any(u in h for h in group.held[1:]) for u in lost_units),
            20,
            "the others hold its units",
        )
        await wait_for(lambda: group.counts() == [1, 1, 1], timeout=10, what="held once each")
        await flowing(book, sim)
        book.note(failover_s=round(time.monotonic() - cut, 2))
        proxies[victim].cut()
        proxies[victim].restore()
        await asyncio.sleep(2)  # its journal drains through the restored proxy
