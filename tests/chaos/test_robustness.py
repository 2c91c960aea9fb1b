"""
Chaos rows for issue 12's defects (each ends with the ledger check: lost 0, and
duplicates 0 where no fault warrants one):

1. hostile stream peers (a server mute after the upgrade, a poison event) beside
   webhook load: the process lives, nothing acknowledged is lost;
2. one event type that no binding takes, under load: the others arrive once each and
   the journal drains; the returned ones arrive once a binding appears;
3. intermittent journal commit failures under stream and webhook load: no cursor
   skips an event, nothing is lost;
6. two daemons on one journal (an overlapping deploy): the second refuses to start;
   nothing is lost or published twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.journal import writes
from tests.chaos.ledger import ledger
from tests.chaos.load import load
from tests.conftest import make_config, running, wait_for
from tests.process import ListenerProcess
from tests.test_robustness import TRADE, expected_ids_without_raw, mute_server, nested, trade_with
from tests.test_streams import MINT, lx_source, stream_source
from tests.test_webhooks import gst_source
from tests.webhook_sender import Sender, gst_event

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("cleanup_topology")]


async def stream_caught_up(service: Any, sim: Layerx402Simulator, name: str) -> None:
    """Wait until the journaled cursor of every key reached what the simulator produced."""
    assert service.journal is not None
    produced = {key: len(events) for key, events in sim.produced.items()}

    async def caught_up() -> bool:
        cursors = await service.journal.cursors(name)
        return all(cursors.get(key, 0) >= n for key, n in produced.items())

    await wait_for(caught_up, timeout=30, what="stream cursors caught up")


@pytest.mark.timeout(90)
async def test_hostile_stream_peers_beside_webhooks(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """A mute stream server and a poison event never end the process; nothing acknowledged is lost."""
    async with (
        ledger(
            broker_url, exchange_name, scenario="hostile stream peers + webhooks", run=chaos_run
        ) as book,
        mute_server() as mute_url,
        Layerx402Simulator(rate=200) as sim,
    ):
        mute = {**lx_source(mute_url, open_timeout="300ms", subscriptions=[TRADE]), "name": "mute"}
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source(), mute, lx_source(sim.url, subscriptions=[TRADE])],
        )
        async with running(config) as service:
            source = next(s for s in service.streams if s.name == "lx")
            silent = next(s for s in service.streams if s.name == "mute")
            url = f"http://127.0.0.1:{service.public_port}/webhooks/gst"
            async with load(url, book, prefix="hostile") as traffic:
                await traffic.wait_acknowledged(100)
                sim.emit_data("trades", {"mint": MINT}, trade_with(nested(300)))
                await wait_for(lambda: silent.connections >= 3, timeout=20, what="mute retried")
                await traffic.wait_acknowledged(100)
            sim.pause()
            await stream_caught_up(service, sim, "lx")
            book.fault_cleared()
            for ids in expected_ids_without_raw(sim).values():
                book.acknowledge("lx", ids)
            book.note(mute_attempts=silent.connections, stream_status=source.status)
            verdict = await book.check()
            assert verdict.duplicates == 0, verdict
            assert service.metrics.source_errors.labels("lx")._value.get() == 0


@pytest.mark.timeout(90)
async def test_unroutable_type_under_load(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """One type no binding takes: the rest arrive once, pending drains; the rest arrive once bound."""
    async with ledger(
        broker_url,
        exchange_name,
        scenario="one unroutable type under load",
        run=chaos_run,
        routing_key="getstoken.badge.#",
    ) as book:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source()],
            broker={"archive": {"enabled": False}},
        )
        async with running(config) as service, aiohttp.ClientSession() as session:
            journal = service.journal
            assert journal is not None
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            unroutable = [f"unr-{i}" for i in range(20)]
            async with load(sender.url, book, prefix="routable") as traffic:
                for event_id in unroutable:
                    status, _, _ = await sender.post(
                        gst_event(event_id, type_="user.created", data={"user_id": "u"})
                    )
                    assert status == 200
                await traffic.wait_acknowledged(300)
            await wait_for(lambda: journal.pending_count == 0, timeout=30, what="pending drained")
            assert journal.deferred_count == len(unroutable)
            readiness = service.admin.readiness() if service.admin else (False, {})
            assert readiness[0] and readiness[1]["status"] == "degraded"
            book.acknowledge("gst", unroutable)
            await book.bind("getstoken.user.#")
            book.fault_cleared()
            await wait_for(lambda: journal.deferred_count == 0, timeout=30, what="deferred sent")
            verdict = await book.check()
            assert verdict.duplicates == 0, verdict


@pytest.mark.timeout(120)
async def test_intermittent_commit_failures(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    chaos_run: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every 7th group commit fails under stream and webhook load: no cursor skips, nothing lost."""
    calls = 0
    real_commit = writes.commit

    def flaky(conn: sqlite3.Connection, ops: Any) -> writes.Committed:
        nonlocal calls
        calls += 1
        if calls % 7 == 0:
            error = sqlite3.OperationalError("disk I/O error (injected)")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # (as SQLite's own carry it)
            error.sqlite_errorname = "SQLITE_IOERR"
            raise error
        return real_commit(conn, ops)

    monkeypatch.setattr("listener.journal.store.commit", flaky)
    async with (
        ledger(
            broker_url, exchange_name, scenario="intermittent commit failures", run=chaos_run
        ) as book,
        Layerx402Simulator(rate=300, buffer_size=50_000) as sim,
    ):
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source(), lx_source(sim.url, subscriptions=[TRADE], journal_window=16)],
            http={"retry_after": 1},
        )
        async with running(config) as service:
            source = stream_source(service)
            url = f"http://127.0.0.1:{service.public_port}/webhooks/gst"
            async with load(url, book, prefix="flaky", concurrency=4, pace=0.005) as traffic:
                await traffic.wait_acknowledged(200, timeout=40)
                await wait_for(lambda: calls > 100, timeout=30, what="many commits")
            monkeypatch.setattr("listener.journal.store.commit", real_commit)
            book.fault_cleared()
            await wait_for(lambda: source.status == "connected", timeout=20, what="connected")
            sim.pause()
            await stream_caught_up(service, sim, source.name)
            for ids in expected_ids_without_raw(sim).values():
                book.acknowledge("lx", ids)
            book.note(commits=calls, failed=calls // 7, reconnects=source.connections - 1)
            verdict = await book.check()
            assert verdict.duplicates == 0, verdict


@pytest.mark.timeout(120)
async def test_two_daemons_on_one_journal(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """A second daemon on a journal in use exits 2; the first goes on; nothing lost or doubled."""
    config = {
        "broker": {"url": broker_url, "exchange": exchange_name},
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": [gst_source()],
    }
    first = ListenerProcess(tmp_path, config)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = ListenerProcess(second_dir, config)
    async with ledger(
        broker_url, exchange_name, scenario="two daemons, one journal", run=chaos_run
    ) as book:
        try:
            await first.start()
            async with load(f"{first.webhook_url}/webhooks/gst", book, prefix="two") as traffic:
                await traffic.wait_acknowledged(200)
                with pytest.raises(AssertionError, match="exited 2"):
                    await second.start()
                await traffic.wait_acknowledged(200)
            assert "in use by another listener" in second.logs()
            assert await first.terminate() == 0
            book.fault_cleared()
            # The deploy goes on: the second takes the journal once the first is gone.
            await second.start()
            verdict = await book.check()
            assert verdict.duplicates == 0, verdict
        finally:
            await first.stop()
            await second.stop()
            await asyncio.sleep(0)
