"""
Several replicas (CONTRACT §10), in this process: real broker, real Layerx402 simulator,
real services. Leases, spreading, hand-over of the cursor, fencing on a lost broker
connection, ``broker.urls`` and a quorum quarantine queue. The same with real
``listener run`` processes, SIGKILL and a broker restart: tests/chaos/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import orjson
import pytest
from pydantic import SecretStr

from listener.broker.connection import connect
from listener.cluster import leases
from listener.config import BrokerConfig, Config
from listener.config_loader import load_config
from listener.dev.replicas import MINTS
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.exceptions import BrokerUnreachable, ConfigError
from listener.service import Service
from tests.conftest import UNIT, config_data, running, tap, wait_for
from tests.faults import proxy
from tests.test_poll import poll_once, poll_source, tt_source
from tests.test_streams import expected_ids, lx_source

pytestmark = pytest.mark.usefixtures("cleanup_topology")

SUBS = [{"channel": "trades", "params": {"mint": m}} for m in MINTS]


def replica_config(
    tmp_path: Path, name: str, broker_url: str, exchange: str, sim_url: str, **extra: Any
) -> Config:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    data = config_data(
        directory,
        broker_url=broker_url,
        exchange=exchange,
        sources=[lx_source(sim_url, subscriptions=SUBS)],
        cluster={"enabled": True, "lease_retry": "300ms"},
        **extra,
    )
    if "urls" in data["broker"]:
        del data["broker"]["url"]
    return Config.model_validate(data)


def holders(services: list[Service]) -> dict[str, list[int]]:
    """unit → the indexes of the services that hold it now."""
    held: dict[str, list[int]] = {}
    for index, service in enumerate(services):
        assert service.coordinator is not None
        for unit in service.coordinator.units:
            held.setdefault(unit.name, [])
            if unit.held:
                held[unit.name].append(index)
    return held


def counts(sim: Layerx402Simulator) -> list[int]:
    return [sim.subscribers("trades", {"mint": m}) for m in MINTS]


@contextlib.asynccontextmanager
async def replicas(configs: list[Config]) -> AsyncIterator[list[Service]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running(c)) for c in configs]


async def test_three_units_spread_over_three_replicas_each_held_once(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Each subscription is held by exactly one connection at the server, one unit each."""
    async with Layerx402Simulator(rate=50) as sim:
        configs = [
            replica_config(tmp_path, f"r{i}", broker_url, exchange_name, sim.url) for i in range(3)
        ]
        async with replicas(configs) as services:
            await wait_for(lambda: counts(sim) == [1, 1, 1], timeout=15 * UNIT, what="all held")
            await wait_for(
                lambda: (
                    sorted(len(v) for v in holders(services).values()) == [1, 1, 1]
                    and sorted(len(s.coordinator.held()) for s in services if s.coordinator)
                    == [1, 1, 1]
                ),
                timeout=15 * UNIT,
                what="one unit each",
            )
            for _ in range(20):  # never two connections for one subscription
                assert max(counts(sim)) <= 1, counts(sim)
                assert all(len(v) <= 1 for v in holders(services).values())
                await asyncio.sleep(0.1)
            # /v1/sources's view: each subscription names its holder.
            views = [s.source_states()["lx"] for s in services]
            for view in views:
                assert view["status"] in {"connected", "standby"}
                assert len(view["subscriptions"]) == 3
            for i, mint in enumerate(MINTS):
                seen = Counter(
                    sub["holder"]
                    for view in views
                    for sub in view["subscriptions"]
                    if sub["params"]["mint"] == mint
                )
                assert seen["self"] == 1 and seen["other"] == 2, (i, seen)
            metrics = services[0].metrics.render().decode()
            assert 'listener_lease_held{unit="lx.trades?mint=' in metrics
            for service in services:  # its one unit's connection is up: the source is
                text = service.metrics.render().decode()
                assert 'listener_source_connected{source="lx"} 1.0' in text


async def test_sigterm_hands_the_units_over_with_their_cursor(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Rebalance, then SIGTERM: the holder releases at once and the other resumes from the
    cursor in RabbitMQ: nothing lost, nothing received twice.
    """
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, exchange_name) as t,
    ):
        first = replica_config(tmp_path, "a", broker_url, exchange_name, sim.url)
        second = replica_config(tmp_path, "b", broker_url, exchange_name, sim.url)
        async with running(first) as a:
            await wait_for(lambda: counts(sim) == [1, 1, 1], timeout=10 * UNIT, what="held")
            for mint in MINTS:
                sim.emit("trades", {"mint": mint}, 20)
            await t.wait_count(60)
            await asyncio.sleep(1.5)  # a checkpoint round writes the cursors
            async with running(second) as b:
                assert b.coordinator is not None
                assert a.coordinator is not None
                # b holds none, a three: a gives one up (rebalance), b takes it over
                # from the cursor a wrote; one only (a waits to hear b's new count).
                await wait_for(
                    lambda: len(b.coordinator.held()) == 1 and len(a.coordinator.held()) == 2,
                    timeout=10 * UNIT,
                    what="rebalanced",
                )
                await asyncio.sleep(1.5)  # several rounds: no second give-up
                assert (len(a.coordinator.held()), len(b.coordinator.held())) == (2, 1)
                await wait_for(
                    lambda: b.source_states()["lx"]["status"] == "connected",
                    timeout=5 * UNIT,
                    what="b connected",
                )
                a.stop()
                stopped = time.monotonic()
                await wait_for(
                    lambda: len(b.coordinator.held()) == 3, timeout=10 * UNIT, what="taken over"
                )
                failover = time.monotonic() - stopped
                assert failover < 0.3 * 1.25 + 2.0, failover
                await wait_for(lambda: counts(sim) == [1, 1, 1], timeout=10 * UNIT, what="resub")
                for mint in MINTS:
                    sim.emit("trades", {"mint": mint}, 20)
                expected = {i for ids in expected_ids(sim).values() for i in ids}
                await t.wait_ids(expected, timeout=20 * UNIT)
    seen = Counter(t.ids)
    assert set(seen) == expected  # lost: none
    # The cursor was handed over: the events before it were not received again.
    duplicates = sum(n - 1 for n in seen.values())
    assert duplicates == 0, duplicates


async def test_a_replica_cut_off_from_the_broker_stops_its_units(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Blackholed from the broker before it could write a cursor: its units stop (fencing),
    the other replica takes them and resumes from all the provider holds, so what the
    cut-off one journaled but cannot publish arrives anyway, before it is reconnected.
    """
    host, port = "127.0.0.1", aiormq_port(broker_url)
    async with (
        Layerx402Simulator(rate="manual") as sim,
        proxy(host, port) as cut_off,
        tap(broker_url, exchange_name) as t,
    ):
        through = broker_url.replace(f"{host}:{port}", f"{host}:{cut_off.port}")
        first = replica_config(
            tmp_path, "a", through, exchange_name, sim.url, broker={"heartbeat": "1s"}
        )
        second = replica_config(tmp_path, "b", broker_url, exchange_name, sim.url)
        async with running(first) as a:
            assert a.coordinator is not None
            await wait_for(lambda: len(a.coordinator.held()) == 3, timeout=10 * UNIT, what="a")
            await asyncio.sleep(1.5)  # checkpoint rounds pass: a has no position to write
            async with running(second) as b:
                assert b.coordinator is not None
                cut_off.blackhole()
                cut = time.monotonic()
                for mint in MINTS:  # a journals these and cannot publish them
                    sim.emit("trades", {"mint": mint}, 10)
                await wait_for(
                    lambda: a.source_states()["lx"]["events_received"] == 30,
                    timeout=5 * UNIT,
                    what="a journaled them",
                )
                await wait_for(lambda: a.coordinator.held() == [], timeout=10 * UNIT, what="fenced")
                fenced = time.monotonic() - cut
                await wait_for(
                    lambda: len(b.coordinator.held()) == 3, timeout=15 * UNIT, what="b took over"
                )
                await wait_for(lambda: counts(sim) == [1, 1, 1], timeout=10 * UNIT, what="once")
                assert fenced < 3.5, fenced  # two heartbeats of 1 s, and a probe
                expected = {i for ids in expected_ids(sim).values() for i in ids}
                await t.wait_ids(expected, timeout=10 * UNIT)  # a is still cut off
                cut_off.restore()


async def test_a_replica_fenced_on_a_connection_that_stayed_open_gives_its_leases_back(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    The watchdog fenced a replica whose broker stopped answering while the connection
    stayed open: its units stopped, but their lease queues stayed on that connection.
    When the broker answered again it took back only its share, and the other units
    could be taken by nobody: run by none until that connection closed.
    """
    async with Layerx402Simulator(rate=50) as sim:
        first = replica_config(
            tmp_path, "a", broker_url, exchange_name, sim.url, broker={"heartbeat": "1s"}
        )
        second = replica_config(tmp_path, "b", broker_url, exchange_name, sim.url)
        async with running(first) as a:
            coordinator = a.coordinator
            assert coordinator is not None
            await wait_for(lambda: len(coordinator.held()) == 3, timeout=10 * UNIT, what="a")
            answers, silent = coordinator._answers, True

            async def unanswered(conn: Any, within: float) -> bool:
                if silent:  # (a broker that does not answer: the connection stays)
                    await asyncio.sleep(within)
                    return False
                return await answers(conn, within)

            coordinator._answers = unanswered  # type: ignore[method-assign] # the broker's silence
            await wait_for(lambda: coordinator.held() == [], timeout=10 * UNIT, what="fenced")
            async with running(second) as b:
                assert b.coordinator is not None
                await asyncio.sleep(1.0)  # b's rounds: every lease is still a's
                assert b.coordinator.held() == []
                silent = False
                await wait_for(
                    lambda: sorted(len(v) for v in holders([a, b]).values()) == [1, 1, 1],
                    timeout=15 * UNIT,
                    what="every unit held again",
                )
                await wait_for(lambda: counts(sim) == [1, 1, 1], timeout=10 * UNIT, what="run")


def aiormq_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


async def test_lease_queue_is_exclusive_to_one_connection(
    broker_url: str, exchange_name: str
) -> None:
    """The lease primitive: a second connection is refused; it frees with the holder's connection."""
    names = leases.Names(exchange_name)
    queue = names.lease("lx.trades?mint=x")
    one = await aiormq.connect(broker_url)
    two = await aiormq.connect(broker_url)
    try:
        assert await leases.take(one, queue)
        assert not await leases.take(two, queue)
        assert await leases.still_held(one, queue)
        await one.close()
        assert await leases.take(two, queue)
        await leases.write_cursor(
            two, names.cursor("u"), {"state": {"seq": 1}}, queue_type="classic"
        )
        await leases.write_cursor(
            two, names.cursor("u"), {"state": {"seq": 2}}, queue_type="classic"
        )
        cursor = await leases.read_cursor(two, names.cursor("u"), queue_type="classic")
        assert cursor == {"state": {"seq": 2}}  # the last one only
        assert await leases.read_cursor(two, names.cursor("u"), queue_type="classic") == cursor
        await leases.release(two, queue)
        assert not await leases.still_held(two, queue)
    finally:
        channel = await two.channel()
        await channel.queue_delete(names.cursor("u"))
        await two.close()
        if not one.is_closed:
            await one.close()


async def test_broker_urls_move_on_to_a_node_that_answers(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """broker.urls: a dead first node is skipped; losing a node moves on to the next."""
    host, port = "127.0.0.1", aiormq_port(broker_url)
    async with (
        proxy(host, port) as node_a,
        proxy(host, port) as node_b,
        tap(broker_url, exchange_name) as t,
        Layerx402Simulator(rate=20) as sim,
    ):
        node_a.refuse()
        urls = [broker_url.replace(f":{port}", f":{p.port}") for p in (node_a, node_b)]
        config = replica_config(
            tmp_path,
            "a",
            broker_url,
            exchange_name,
            sim.url,
            broker={"urls": urls, "queue_type": "quorum"},
        )
        async with running(config) as service:
            await t.wait_count(5)
            assert service.publisher is not None and service.publisher.connected
            node_a.restore()
            node_b.refuse()
            node_b.cut()  # node b goes: the publisher moves on to a
            before = len(t.messages)
            await wait_for(lambda: len(t.messages) > before + 5, timeout=15 * UNIT, what="via a")
            assert node_a.connections >= 1
        # queue_type: quorum made the quarantine queue a quorum queue: declaring it as
        # such agrees, as a classic one is refused (406).
        check = await aiormq.connect(broker_url)
        try:
            quarantine = f"{exchange_name}.quarantine"
            channel = await check.channel()
            await channel.queue_declare(
                quarantine, durable=True, arguments={"x-queue-type": "quorum"}
            )
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.queue_declare(quarantine, durable=True)
        finally:
            await check.close()


@pytest.mark.parametrize("fault", ["blackhole", "handshake-stalls"])
async def test_a_failed_connect_attempt_closes_its_connection(
    broker_url: str, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A node that takes the TCP connection and then says nothing (or stops halfway through
    the AMQP handshake) fails the attempt at its deadline, and the attempt closes the
    aio-pika connection it made: left to the garbage collector, its close is dropped
    when no loop runs ("coroutine 'Connection.close' was never awaited").
    """
    made: list[aio_pika.Connection] = []
    init = aio_pika.Connection.__init__

    def recorded(self: aio_pika.Connection, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(aio_pika.Connection, "__init__", recorded)
    port = aiormq_port(broker_url)
    async with proxy("127.0.0.1", port) as node:
        if fault == "blackhole":
            node.blackhole()
        else:
            node.stall_after_frames = 1  # Connection.Start, then nothing
        url = broker_url.replace(f":{port}", f":{node.port}")
        config = BrokerConfig(url=SecretStr(url), connect_timeout=0.2)
        with pytest.raises(BrokerUnreachable):
            await connect(config, name="test")
        assert node.connections == 1
    assert len(made) == 1 and made[0].is_closed


async def test_a_poll_source_is_a_unit_handed_over_with_its_state(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    One replica polls; the other stands by (not polling). After a SIGTERM the other
    takes the poll state from RabbitMQ: no first-sight events again, only what changed.
    """
    async with (
        TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim,
        tap(broker_url, exchange_name) as t,
    ):

        def config(name: str) -> Config:
            directory = tmp_path / name
            directory.mkdir()
            return Config.model_validate(
                config_data(
                    directory,
                    broker_url=broker_url,
                    exchange=exchange_name,
                    sources=[tt_source(sim.url)],
                    cluster={"enabled": True, "lease_retry": "300ms"},
                )
            )

        async with running(config("a")) as a:
            await t.wait_count(4)  # 3 days of lookback + today: first sight
            await asyncio.sleep(1.5)  # the state's checkpoint is written once confirmed
            async with running(config("b")) as b:
                assert a.coordinator is not None and b.coordinator is not None
                await asyncio.sleep(1.0)
                assert [u.name for u in a.coordinator.held()] == ["tt"]
                assert b.coordinator.held() == []
                standby = b.source_states()["tt"]
                assert (standby["status"], standby["holder"]) == ("standby", "other")
                async with aiohttp.ClientSession() as http:
                    admin = f"http://127.0.0.1:{b.admin_port}"
                    async with http.get(f"{admin}/readyz") as ready:
                        assert ready.status == 200  # a healthy standby is ready
                        body = await ready.json()
                    assert body["sources"]["tt"]["status"] == "standby", body
                assert b.poll_now("tt") == "not_held" and a.poll_now("tt") == "ok"
                polled = len(sim.ledger)
                a.stop()
                await wait_for(lambda: b.coordinator.held() != [], timeout=5, what="taken over")
                # a polled moments ago: b's first poll is due an interval (1 h) after
                # a's start, not at once (CONTRACT §9: interval between two starts).
                await wait_for(lambda: poll_source(b, "tt").status == "polling", what="b runs")
                await asyncio.sleep(0.5)
                assert len(sim.ledger) == polled
                assert poll_source(b, "tt").resources[0].next_poll - time.time() > 3000
                await poll_once(b, "tt")
                assert len(t.messages) == 4  # b knew what a had seen
                past = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
                sim.restate("aave", past, "fees", "99.5", chain="ethereum")
                await poll_once(b, "tt")
                await t.wait_count(5)
                changed = orjson.loads(t.messages[-1].body)["data"]
                assert changed["changed"] == ["fees"] and changed["row"]["fees"] == "99.5"
    assert len(set(t.ids)) == 5


def test_cluster_configuration(tmp_path: Path) -> None:
    """3 s heartbeat by default under cluster.enabled; url or urls, not both; bad node named."""
    path = tmp_path / "config.yaml"

    def load(text: str) -> Config:
        path.write_text(text)
        return load_config(path, environ={})

    clustered = load("cluster: {enabled: true}\nsources: []\n")
    assert clustered.broker.heartbeat == 3.0 and clustered.cluster.lease_retry == 2.0
    assert load("sources: []\n").broker.heartbeat == 5.0
    assert (
        load("cluster: {enabled: true}\nbroker: {heartbeat: 10s}\nsources: []\n").broker.heartbeat
        == 10.0
    )
    nodes = load("broker: {urls: ['amqp://a:5672/', 'amqp://b:5672/']}\nsources: []\n").broker.nodes
    assert [n.get_secret_value() for n in nodes] == ["amqp://a:5672/", "amqp://b:5672/"]
    with pytest.raises(ConfigError) as both:
        load("broker: {url: 'amqp://a/', urls: ['amqp://b/']}\nsources: []\n")
    assert any("broker" in p and "not both" in p for p in both.value.problems), both.value.problems
    with pytest.raises(ConfigError) as bad:
        load("broker: {urls: ['amqp://a/', 'http://b/']}\nsources: []\n")
    assert any(p.startswith("broker.urls[1]") for p in bad.value.problems), bad.value.problems
    with pytest.raises(ConfigError) as quorum:
        load("broker: {queue_type: mirrored}\nsources: []\n")
    assert any(p.startswith("broker.queue_type") for p in quorum.value.problems)


async def test_a_malformed_cursor_is_ignored_not_fatal(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A cursor message that is no checkpoint: logged, the unit runs from its own journal."""
    names = leases.Names(exchange_name)
    connection = await aiormq.connect(broker_url)
    try:
        await leases.write_cursor(
            connection, names.cursor("tt"), {"state": {"states": [[1]]}}, queue_type="classic"
        )
        async with (
            TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim,
            tap(broker_url, exchange_name) as t,
        ):
            data = config_data(
                tmp_path,
                broker_url=broker_url,
                exchange=exchange_name,
                sources=[tt_source(sim.url)],
                cluster={"enabled": True, "lease_retry": "300ms"},
            )
            async with running(Config.model_validate(data)) as service:
                await t.wait_count(4)  # polled: first sight of 4 rows
                assert service.coordinator is not None
                assert [u.name for u in service.coordinator.held()] == ["tt"]
    finally:
        channel = await connection.channel()
        await channel.queue_delete(names.cursor("tt"))
        await connection.close()


async def test_shutdown_ends_even_when_a_cancel_is_swallowed(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq may swallow a cancel landing in a channel operation: shutdown still ends."""
    swallowed = 0

    async def swallowing_probe(_: object) -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed += 1  # as aiormq does while the connection closes under it

    monkeypatch.setattr(leases, "probe", swallowing_probe)
    data = config_data(
        tmp_path, broker_url=broker_url, exchange=exchange_name, cluster={"enabled": True}
    )
    started = time.monotonic()
    async with running(Config.model_validate(data)):
        await asyncio.sleep(1.5)  # the watchdog is inside a probe
    assert swallowed >= 1
    assert time.monotonic() - started < 15
