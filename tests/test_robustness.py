"""
Regression tests of issue 12: no input, peer or operator mistake stops the daemon,
stalls a queue or loses an event. Each reproduces a defect found against a real
``listener run`` and fails without its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from websockets.asyncio.server import ServerConnection, serve

from handlers import Event
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.envelope import Entry, event_entry
from listener.journal import Journal
from listener.sources.poll import PollSource
from listener.sources.supervisor import supervised
from tests.conftest import make_config, running, tap, wait_for
from tests.process import ListenerProcess
from tests.test_poll import tt_source
from tests.test_streams import MINT, expected_ids, lx_source, stream_config, stream_source
from tests.test_webhooks import gst_source
from tests.webhook_sender import Sender, gst_event

pytestmark = pytest.mark.usefixtures("cleanup_topology")

TRADE = {"channel": "trades", "params": {"mint": MINT}}
BADGE = {"badge_id": "b_1", "user_id": "u_1", "badge_type": "gold"}


def badges(prefix: str, count: int) -> list[Entry]:
    """``count`` journal entries of Get Smart Token badges, ids ``<prefix><i>``."""
    now = time.time()
    return [
        event_entry(
            source="gst",
            provider="getstoken",
            event=Event(id=f"{prefix}{i}", type="getstoken.badge.issued", time=None, data=BADGE),
            received_at=now,
        )
        for i in range(count)
    ]


def nested(depth: int) -> bytes:
    """A JSON value nested ``depth`` arrays deep (orjson cannot even write it)."""
    return b"[" * depth + b"]" * depth


def trade_with(extra: bytes, n: int = 1) -> bytes:
    """A valid trade whose extra field ``deep`` holds ``extra`` (raw JSON)."""
    return (
        b'{"signature":"sig%d","mint":"%s","side":"buy","amount":"1.5","price_usd":"2.25",'
        b'"wallet":"w1","ts":1764000000000,"deep":%s}' % (n, MINT.encode(), extra)
    )


@contextlib.asynccontextmanager
async def mute_server() -> AsyncIterator[str]:
    """A WebSocket server that accepts the upgrade and then never says anything."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def test_server_that_never_answers_auth_does_not_end_the_service(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A stream server silent after the upgrade is retried; webhooks go on, the service lives."""
    async with mute_server() as ws_url, aiohttp.ClientSession() as session:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source(), lx_source(ws_url, open_timeout="300ms", subscriptions=[TRADE])],
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.connections >= 3, timeout=15, what="three attempts")
            status, _, _ = await Sender(
                session, f"http://127.0.0.1:{service.public_port}/webhooks/gst"
            ).post(gst_event())
            assert status == 200
            assert source.status == "reconnecting"


async def test_event_that_cannot_be_enveloped_is_quarantined_and_passed(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A valid trade nested 300 deep is quarantined, its seq passed; later events flow, also after a restart."""
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE])
        for _ in range(2):  # the second run resumes past the bad event instead of dying on it
            async with running(config) as service:
                source = stream_source(service)
                await wait_for(lambda s=source: s.status == "connected", what="connected")
                if not sim.produced:
                    sim.emit("trades", {"mint": MINT}, 3)
                    sim.emit_data("trades", {"mint": MINT}, trade_with(nested(300)))
                sim.emit("trades", {"mint": MINT}, 3)
                await q.wait_count(1)
                ids = {i for ids in expected_ids_without_raw(sim).values() for i in ids}
                await t.wait_ids(ids)
                await wait_for(
                    lambda s=source: (
                        s.state()["subscriptions"][0]["last_seq"]
                        == sim.last_seq("trades", {"mint": MINT})
                    ),
                    what="the cursor past the bad event",
                )
                assert service.journal is not None
        assert q.messages[0].headers["x-quarantine-reason"] == "too_deep"
        assert len(q.messages) == 1


def expected_ids_without_raw(sim: Layerx402Simulator) -> dict[str, list[str]]:
    """Like expected_ids, skipping the events emitted with raw data."""
    saved = sim.produced
    sim.produced = {k: [e for e in v if "raw" not in e["data"]] for k, v in saved.items()}
    try:
        return expected_ids(sim)
    finally:
        sim.produced = saved


async def test_seq_past_64_bits_is_quarantined_not_a_rollback(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An event with seq 2^63 is quarantined alone; webhooks journaled beside it all get 200."""
    async with (
        Layerx402Simulator(rate=200) as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
        aiohttp.ClientSession() as session,
    ):
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source(), lx_source(sim.url, subscriptions=[TRADE])],
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(
                lambda: source.status == "connected" and source.events_received > 5, what="events"
            )
            sub_id = next(iter(sim._keys[f"trades?mint={MINT}"].subscribers))
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            posts = [asyncio.create_task(sender.post(gst_event())) for _ in range(100)]
            sim.send_raw(
                b'{"type":"event","subscription":"%s","channel":"trades","seq":%d,"data":%s}'
                % (sub_id.encode(), 2**63, trade_with(b"1"))
            )
            statuses = [status for status, _, _ in await asyncio.gather(*posts)]
            assert statuses == [200] * 100
            await q.wait_count(1)
            assert q.messages[0].headers["x-quarantine-reason"] == "schema_violation"
            last = source.state()["subscriptions"][0]["last_seq"]
            assert last is not None and last < 2**63


async def test_oversize_retained_event_does_not_wedge_its_subscription(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An event over max_size, resent first after every reconnect, is taken once; the stream goes on."""
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(
            tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE], max_size="64KiB"
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            sim.emit("trades", {"mint": MINT}, 2)
            sim.emit_data("trades", {"mint": MINT}, trade_with(b'"' + b"x" * 200_000 + b'"'))
            sim.emit("trades", {"mint": MINT}, 5)
            ids = {i for ids in expected_ids_without_raw(sim).values() for i in ids}
            await t.wait_ids(ids, timeout=20)
            # One record of the refusal, then the frame itself (its head), once.
            await q.wait_count(2)
            assert {m.headers["x-quarantine-reason"] for m in q.messages} == {"frame_too_large"}
            assert sum(b"sig1" in m.body for m in q.messages) == 1
            sim.emit("trades", {"mint": MINT}, 3)
            ids = {i for ids in expected_ids_without_raw(sim).values() for i in ids}
            await t.wait_ids(ids, timeout=20)
            assert len(q.messages) == 2
            assert source.connections <= 3


async def test_signed_webhooks_that_cannot_be_enveloped_are_quarantined(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A created_at past UTC's range and data nested 300 deep: 200 + quarantine, never 500."""
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    async with (
        running(config) as service,
        aiohttp.ClientSession() as session,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
    ):
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        late = gst_event("evt_late")
        late["created_at"] = "9999-12-31T23:59:59-23:59"
        status, body, _ = await sender.post(late)
        assert status == 200 and body["data"]["quarantined"] is True
        assert body["data"]["reason"] == "schema_violation"
        deep = (
            b'{"id":"evt_deep","type":"badge.issued","created_at":"2026-11-22T10:00:00Z",'
            b'"environment":"production","data":{"badge_id":"b","user_id":"u","badge_type":"g",'
            b'"x":%s}}' % nested(300)
        )
        status, body, _ = await sender.post(deep)
        assert status == 200 and body["data"]["reason"] == "too_deep"
        await q.wait_count(2)


async def test_a_crashing_source_is_restarted_and_counted(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Any exception out of a source is logged, counted and the source restarted; nothing else ends."""
    from listener.metrics import Metrics

    metrics = Metrics()
    runs = 0

    class Flaky:
        name = "flaky"

        async def run(self) -> None:
            nonlocal runs
            runs += 1
            if runs < 3:
                raise RuntimeError("boom")
            await asyncio.Event().wait()

        def state(self) -> dict[str, Any]:
            return {"status": "connected"}

    task = asyncio.create_task(supervised(Flaky(), metrics=metrics, initial=0.01, maximum=0.05))
    try:
        await wait_for(lambda: runs >= 3, what="two restarts")
        assert not task.done()
        text = metrics.render().decode()
        assert 'listener_source_errors_total{source="flaky"} 2.0' in text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_service_runs_its_sources_under_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A source of the real service that raises is counted and started again, and the
    service goes on (the test above calls the supervisor itself: a service starting its
    sources without it passed every test).
    """
    runs = 0
    again = asyncio.Event()

    async def crashing_once(self: PollSource) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        again.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(PollSource, "run", crashing_once)
    # (no broker needed: it would be left the default exchange's topology)
    nobody = "amqp://guest:guest@127.0.0.1:1/"
    config = make_config(tmp_path, broker_url=nobody, sources=[tt_source("http://127.0.0.1:1")])
    async with running(config) as service:
        await asyncio.wait_for(again.wait(), 10)  # (the supervisor's first backoff: ~1 s)
        errors = service.metrics.registry.get_sample_value(
            "listener_source_errors_total", {"source": "tt"}
        )
        assert errors == 1 and runs == 2


async def test_second_daemon_on_one_journal_exits_2_naming_the_holder(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A second `listener run` on a journal in use exits 2, naming the file and the holder's pid."""
    data = {
        "broker": {"url": broker_url, "exchange": exchange_name},
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": [],
    }
    first = ListenerProcess(tmp_path, data)
    await first.start()
    try:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = ListenerProcess(second_dir, data)
        with pytest.raises(AssertionError, match="exited 2"):
            await second.start()
        assert "journal.db" in second.logs() and "in use by another listener" in second.logs()
        assert first.proc is not None and f"pid {first.proc.pid}" in second.logs()
    finally:
        await first.terminate()


async def test_a_journal_read_that_fails_ends_a_publish_session_not_the_service(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    SQLite fails the publisher's read of pending rows once (an I/O error): the session
    ends with a failure counted, the next reads again, and every event is published. The
    error used to leave the journal as a bare ``sqlite3.Error`` that no one caught: the
    publisher's task ended, and with it the service.
    """
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source()],
        broker={"retry_initial": "100ms"},
    )
    entries = badges("evt_io_", 20)
    async with Journal(config=config.journal) as journal:
        await journal.append(entries)
    read = Journal._read
    failed: list[str] = []

    def failing(self: Journal, sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
        if "status = 0" in sql and not failed:
            failed.append(sql)
            raise sqlite3.OperationalError("disk I/O error")
        return read(self, sql, args)

    monkeypatch.setattr(Journal, "_read", failing)
    async with tap(broker_url, exchange_name) as t, running(config) as service:
        await t.wait_ids({e.event_id for e in entries}, timeout=20)
        assert failed, "the read never failed: the test proves nothing"
        samples = {
            s.labels["reason"]: s.value
            for m in service.metrics.publish_failures.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert samples.get("journal") == 1, samples


async def test_an_exchange_deleted_while_running_is_declared_again(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Someone deletes the exchange while the daemon runs: the next publish is refused
    (404, the channel closes), the publisher declares its topology again on the next
    channel, and the event goes out once something is bound (no archive: until then it
    is returned and deferred). It used to declare only once per connection: every
    publish failed the same way until the connection dropped.
    """
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source()],
        broker={"retry_initial": "100ms", "archive": {"enabled": False}},
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        journal = service.journal
        assert journal is not None
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        assert (await sender.post(gst_event("evt_before")))[0] == 200
        await wait_for(lambda: journal.pending_count == 0, what="the first event confirmed")
        connection = await aio_pika.connect(broker_url)
        try:
            channel = await connection.channel()
            await channel.exchange_delete(exchange_name)
            assert (await sender.post(gst_event("evt_after")))[0] == 200

            async def exists() -> bool:
                probe = await connection.channel()
                try:
                    await probe.declare_exchange(exchange_name, passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    return False
                await probe.close()
                return True

            deadline = time.monotonic() + 10
            while not await exists():
                assert time.monotonic() < deadline, "the exchange was not declared again"
                await asyncio.sleep(0.1)
        finally:
            await connection.close()
        async with tap(broker_url, exchange_name) as t:
            await t.wait_ids({"evt_after"}, timeout=30)


async def test_rows_another_process_adds_never_make_the_pending_count_negative(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    A `quarantine redrive` journals rows as pending from its own process (the daemon
    does not count them) and the daemon publishes them: marking them used to take
    the daemon's pending count below zero (-3 on /readyz, and a shutdown that waited
    its whole timeout for a count that could not reach 0). It is counted again.
    """
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    entries = badges("evt_other_", 3)
    async with tap(broker_url, exchange_name) as t, running(config) as service:
        journal = service.journal
        assert journal is not None
        async with Journal(config=config.journal, lock=False) as other:  # another process's
            await other.append(entries)
        await t.wait_ids({e.event_id for e in entries}, timeout=20)
        await wait_for(lambda: journal.pending_count == 0, what="pending 0")
        await asyncio.sleep(0.3)
        assert journal.pending_count == 0
