"""Layerx402 streams end to end: real simulator, real broker, ledger checks."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from handlers import Event
from handlers.frames import ErrorFrame, Subscribed
from handlers.layerx402 import PROVIDER as LAYERX402
from handlers.layerx402 import EventFrame, parse_frame
from listener.config import Config, SubscriptionConfig
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.envelope import Entry
from listener.journal import Journal
from listener.metrics import Metrics
from listener.sources import subscriptions
from listener.sources.intake import Intake
from listener.sources.websocket import StreamSource
from listener.sources.websocket_policy import Outcome
from tests.conftest import make_config, running, tap, wait_for
from tests.process import ListenerProcess
from tests.test_journal import entry

pytestmark = pytest.mark.usefixtures("cleanup_topology")

MINT = "So11111111111111111111111111111111111111112"
WALLET = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
SUBS = [
    {"channel": "trades", "params": {"mint": MINT}},
    {"channel": "portfolio", "params": {"wallet": WALLET}},
]


def lx_source(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "lx",
        "kind": "websocket",
        "provider": "layerx402",
        "url": url,
        "api_key": "test-key",
        "subscriptions": extra.pop("subscriptions", SUBS),
        "reconnect": {"initial": "50ms", "max": "500ms", "healthy_after": "5s"},
        **extra,
    }


def stream_config(tmp_path: Path, broker_url: str, exchange: str, url: str, **extra: Any) -> Config:
    journal = extra.pop("journal", {})
    return make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange,
        sources=[lx_source(url, **extra)],
        journal={"path": str(tmp_path / "journal.db"), **journal},
    )


def expected_ids(sim: Layerx402Simulator) -> dict[str, list[str]]:
    """The stable CloudEvent id of every event the simulator produced, per subscription key."""
    ids: dict[str, list[str]] = {}
    for key, events in sim.produced.items():
        out = []
        for event in events:
            frame = parse_frame(orjson.dumps({"type": "event", "subscription": "x", **event}))
            assert isinstance(frame, EventFrame) and isinstance(frame.result, Event)
            out.append(frame.result.id)
        ids[key] = out
    return ids


def stream_source(service: Any) -> StreamSource:
    source = service.streams[0]
    assert isinstance(source, StreamSource)
    return source


async def test_resume_across_abrupt_drops_loses_nothing(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Abrupt drops lose nothing: every produced event arrives once resumed, ids stable, order kept."""
    async with (
        Layerx402Simulator(rate=400, ping_interval=0.5) as sim,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)
            for drops in range(3):
                # The connection made after the last drop (a stale "connected" of the
                # dropped one would let the next drop hit no connection at all).
                await wait_for(
                    lambda d=drops: source.connections > d and source.status == "connected",
                    what=f"connection {drops + 1}",
                )
                floor = source.events_received + 50
                await wait_for(lambda f=floor: source.events_received > f, what="events flowing")
                await sim.drop_all(None)
            await wait_for(lambda: source.status == "connected", what="reconnected")
            await wait_for(lambda: source.connections >= 4, what="4 connections")
            await wait_for(lambda: bool(sim.pongs), what="app-level pings answered")
            sim.pause()
            wanted = expected_ids(sim)
            every = {i for ids in wanted.values() for i in ids}
            assert len(every) > 300
            await t.wait_ids(every, timeout=60)
            # since_seq was used on reconnects
            subscribes = [r for r in sim.requests if r.get("type") == "subscribe"]
            assert any("since_seq" in r for r in subscribes)
            # order kept within a subscription: first arrivals follow production order
            arrived: dict[str, list[str]] = defaultdict(list)
            seen: set[str] = set()
            owner = {i: key for key, ids in wanted.items() for i in ids}
            for message_id in t.ids:
                if message_id in owner and message_id not in seen:
                    seen.add(message_id)
                    arrived[owner[message_id]].append(message_id)
            for key, ids in wanted.items():
                assert arrived[key] == ids, key


async def test_bad_key_backs_off_and_reports_unauthorized(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A refused key shows unauthorized and reconnects with growing delays, not in a hot loop."""
    async with Layerx402Simulator(api_keys={"other"}) as sim:
        config = stream_config(
            tmp_path,
            broker_url,
            exchange_name,
            sim.url,
            reconnect={"initial": "100ms", "max": "800ms", "healthy_after": "5s"},
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: sim.auth_failed >= 4, timeout=20, what="4 refused attempts")
            assert source.status == "unauthorized"
            times = sim.connect_times[:4]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g >= 0.04 for g in gaps), gaps
            assert sim.auth_failed < 30
            assert service.admin is not None
            ready, body = service.admin.readiness()
            assert not ready and body["sources"]["lx"]["status"] == "unauthorized"


async def test_a_rate_limit_at_connect_holds_the_next_attempt_for_its_retry_after(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    The server rate-limits before ``auth_ok`` (an error frame with ``retry_after``, then
    close 4029): the next attempt waits that long (CONTRACT §6), not the 50 ms backoff.
    The frame used to be dropped there: ten attempts in the time one was allowed.
    """
    async with Layerx402Simulator(rate="manual") as sim:
        await sim.rate_limit(retry_after=1.5)  # (no connection yet: every new one is refused)
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", timeout=15, what="connected")
        assert sim.rate_limited_rejections == 1, sim.connect_times
        assert sim.connect_times[1] - sim.connect_times[0] >= 1.4, sim.connect_times


async def test_forbidden_channel_is_isolated(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A FORBIDDEN subscription is marked failed while the other keeps delivering."""
    async with (
        Layerx402Simulator(rate=200, forbidden={"portfolio"}) as sim,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)
            await t.wait_count(20)
            subs = {s["channel"]: s for s in source.state()["subscriptions"]}
            assert subs["portfolio"]["state"] == "forbidden"
            assert subs["trades"]["state"] == "active"
            assert {m.routing_key for m in t.messages} == {"layerx402.trade"}
            text = service.metrics.render().decode()
            assert (
                'listener_subscription_failed{source="lx",subscription="portfolio?wallet=' in text
            )
            assert service.admin is not None
            ready, body = service.admin.readiness()
            assert ready and body["status"] == "degraded"  # (it said "ready": all was well)
        # Stopped (a unit gone to another replica): the refusal is not this one's any more.
        text = service.metrics.render().decode()
        assert 'subscription="portfolio?wallet=' in text
        assert [
            line
            for line in text.splitlines()
            if line.endswith(" 1.0") and "subscription_failed" in line
        ] == []


@pytest.mark.parametrize("how", ["reconnect", "live"])
async def test_a_refused_subscription_is_asked_for_again(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    The server refuses a channel (FORBIDDEN), then allows it (a plan upgraded, a key
    rotated): the subscription is asked for again on the next connection, and on a
    live one after FORBIDDEN_RETRY. It used to stay refused until a restart.
    """
    retry = 0.5 if how == "live" else 3600.0
    monkeypatch.setattr(subscriptions, "FORBIDDEN_RETRY", retry, raising=False)
    async with Layerx402Simulator(rate=200, forbidden={"portfolio"}) as sim:
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)

            def portfolio() -> str:
                return next(
                    s["state"]
                    for s in source.state()["subscriptions"]
                    if s["channel"] == "portfolio"
                )

            await wait_for(lambda: portfolio() == "forbidden", what="refused")
            sim.forbidden.clear()
            if how == "reconnect":
                await sim.drop_all(1011, "restart")
            await wait_for(lambda: portfolio() == "active", timeout=10, what="asked again")
            assert source.connections == (2 if how == "reconnect" else 1)


@pytest.mark.parametrize("how", ["error", "unsubscribed"])
async def test_a_subscription_refused_for_now_or_ended_by_the_server_comes_back(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A subscribe answered with an error other than FORBIDDEN or INVALID_PARAMS (here a
    rate limit), or a subscription the server ends (``unsubscribed``), stayed pending
    for the life of the connection: nothing more came for it, maybe for days, and what
    the server no longer held by the next connection was lost. It is asked for again
    on the live connection, from its last seq.
    """
    monkeypatch.setattr(subscriptions, "RETRY_BASE", 0.2)
    async with Layerx402Simulator(rate=200) as sim:
        if how == "error":
            sim.refuse_next("portfolio", "RATE_LIMITED")
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)

            def portfolio() -> dict[str, Any]:
                subs = source.state()["subscriptions"]
                return next(s for s in subs if s["channel"] == "portfolio")

            if how == "error":
                await wait_for(lambda: portfolio().get("error") is not None, what="refused")
                assert portfolio()["state"] == "pending"
            else:
                await wait_for(lambda: (portfolio()["last_seq"] or 0) > 5, what="events")
                with structlog.testing.capture_logs() as logs:
                    assert sim.end_subscriptions("portfolio") == 1
                    await wait_for(lambda: portfolio()["state"] == "pending", what="ended")
                assert [e["subscription"] for e in logs if e["event"] == "stream_unsubscribed"]
            await wait_for(lambda: portfolio()["state"] == "active", timeout=10, what="back")
            seen = portfolio()["last_seq"] or 0
            await wait_for(lambda: (portfolio()["last_seq"] or 0) > seen, what="events again")
            assert source.connections == 1 and "error" not in portfolio()
            asks = [r for r in sim.requests if r.get("channel") == "portfolio"]
            assert len(asks) == 2
            if how == "unsubscribed":
                assert asks[1]["since_seq"] is not None  # (resumed from its position)


async def test_malformed_and_oversize_frames_are_quarantined(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Malformed and oversize frames are quarantined with reasons while the stream goes on."""
    async with (
        Layerx402Simulator(rate=100) as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, max_size="64KiB")
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            sim.send_raw("{not json")
            sim.send_raw(
                orjson.dumps(
                    {
                        "type": "event",
                        "subscription": "nope",
                        "channel": "trades",
                        "seq": 1,
                        "data": {},
                    }
                ).decode()
            )
            await q.wait_count(2)
            sim.inject_oversize(200_000)
            await q.wait_count(3)
            reasons = {m.headers["x-quarantine-reason"] for m in q.messages}
            assert {"invalid_json", "frame_too_large"} <= reasons
            before = len(t.messages)
            await wait_for(
                lambda: source.status == "connected" and len(t.messages) > before + 20,
                what="stream goes on",
            )


async def test_frames_to_quarantine_before_auth_ok_are_kept(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Sent between the auth frame and its auth_ok, they were dropped without a record."""
    unknown = {"type": "event", "subscription": "nope", "channel": "trades", "seq": 1, "data": {}}
    async with (
        Layerx402Simulator(rate=100) as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
    ):
        sim.before_auth_ok = ["{not json", orjson.dumps(unknown).decode()]
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)
            await q.wait_count(2)
            reasons = [m.headers["x-quarantine-reason"] for m in q.messages]
            assert sorted(reasons) == ["invalid_json", "unknown_subscription"]
            await wait_for(lambda: source.events_received > 5, what="the stream goes on")
            assert source.connections == 1


@pytest.mark.parametrize("silent", ["connection", "subscription"])
async def test_silent_stream_reconnects(
    tmp_path: Path, broker_url: str, exchange_name: str, silent: str
) -> None:
    """
    A connection that carries nothing for stale_after, or with a subscription that has
    had no event for subscription_stale_after (pings still coming), is closed and
    reopened.
    """
    pings = 0.1 if silent == "subscription" else None
    async with Layerx402Simulator(rate=50, ping_interval=pings) as sim:
        limit = "subscription_stale_after" if silent == "subscription" else "stale_after"
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, **{limit: "700ms"})
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.events_received > 5, what="events")
            with structlog.testing.capture_logs() as logs:
                sim.pause(pings=silent == "connection")  # (pings=True: they stop too)
                await wait_for(lambda: source.connections >= 2, timeout=10, what="a reconnect")
            sim.resume()
            await wait_for(lambda: source.status == "connected", what="connected again")
    (gone, *_) = [e for e in logs if e["event"] == "stream_disconnected"]
    want = "a subscription went silent" if silent == "subscription" else "nothing received for"
    assert gone["stale"] and gone["reason"].startswith(want), gone


async def test_backpressure_pauses_reading_and_recovers(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """With the broker unreachable and the journal at its limit, reading stops; then all flows."""
    async with (
        Layerx402Simulator(rate=0, buffer_size=100_000) as sim,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(
            tmp_path,
            "amqp://guest:guest@127.0.0.1:1/",
            exchange_name,
            sim.url,
            journal={"max_pending": 500},
            journal_window=64,
        )
        async with running(config) as service:
            source = stream_source(service)
            assert service.journal is not None
            journal = service.journal
            await wait_for(
                lambda: journal.over_limit() == "max_pending", timeout=20, what="journal full"
            )
            received = source.events_received
            await asyncio.sleep(0.5)  # a stopped reader stays stopped: nothing more is taken in
            assert source.events_received - received <= 64
            assert journal.pending_count <= 500 + 64
            sim.pause()
        produced_before = expected_ids(sim)
        # Restart against the real broker: the journal drains and the stream resumes via since_seq.
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            every = {i for ids in produced_before.values() for i in ids}
            held = {i for ids in produced_before.values() for i in ids[-90_000:]}
            await t.wait_ids(held & every, timeout=120)


async def test_a_subscribe_with_no_answer_ends_the_connection(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A subscribe the server never answered stayed pending for the life of the connection.
    Asked again on it, a late answer to the first would leave two subscriptions at the
    server; so the connection ends, and the next subscribes everything again.
    """
    monkeypatch.setattr(subscriptions, "ACK_WAIT", 1.0)
    async with Layerx402Simulator(rate=200) as sim:
        sim.refuse_next("portfolio", None)
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        with structlog.testing.capture_logs() as logs:
            async with running(config) as service:
                source = stream_source(service)
                await wait_for(
                    lambda: all(s["state"] == "active" for s in source.state()["subscriptions"]),
                    what="both active",
                )
                assert source.connections == 2
    (gone,) = [e for e in logs if e["event"] == "stream_disconnected"]
    assert gone["reason"] == "a subscribe had no answer within 1s"


def test_a_subscription_ended_again_and_again_backs_off() -> None:
    """Ended by the server right after each answer, it was asked for every second."""
    config = SubscriptionConfig(channel="trades", params={"mint": MINT})
    subs = subscriptions.Subscriptions("lx", (config,), LAYERX402, Metrics())
    (sub,) = subs.to_subscribe(connecting=True)
    waits = []
    for n in range(8):
        subs.subscribed(Subscribed(id=sub.request_id, channel="trades", subscription=f"s{n}"))
        subs.unsubscribed(f"s{n}")
        waits.append(round(sub.retry_due - time.monotonic()))
        assert subs.retry_at == sub.retry_due and subs.to_subscribe(connecting=False) == []
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert subs.fresh(sub, 1)  # an event: the next one is asked again after a second
    subs.subscribed(Subscribed(id=sub.request_id, channel="trades", subscription="s9"))
    subs.unsubscribed("s9")
    assert round(sub.retry_due - time.monotonic()) == 1


async def test_a_frame_read_as_the_journal_fills_waits_for_room(
    tmp_path: Path, exchange_name: str
) -> None:
    """
    The journal's limit was looked at before each read: one reached while the source
    waited for a frame refused that frame's append, which ended the connection, and a
    frame to quarantine (no seq to ask for again) was lost. Now the frame waits for
    room, on the same connection; and a wait longer than stale_after is not counted as
    the server's silence (the connection was closed as stale the moment it read again).
    """
    async with Layerx402Simulator(ping_interval=0.2) as sim:
        config = stream_config(
            tmp_path,
            "amqp://guest:guest@127.0.0.1:1/",  # (nothing is published: pending stays)
            exchange_name,
            sim.url,
            journal={"max_pending": 3},
            stale_after="2s",
        )
        async with running(config) as service:
            source, journal = stream_source(service), service.journal
            assert journal is not None

            def quarantined() -> float:
                text = service.metrics.render().decode()
                lines = [
                    x for x in text.splitlines() if x.startswith("listener_events_quarantined_t")
                ]
                return sum(float(x.split()[-1]) for x in lines)

            await wait_for(lambda: all(s.state == "active" for s in source._subs), what="subs")
            await journal.append([entry(i, source="elsewhere") for i in range(3)])
            assert journal.over_limit() == "max_pending"  # (while the source waits to read)
            sim.pause()  # (no ping after the frame: nothing waits unread behind it)
            sim.send_raw("not a frame")
            await asyncio.sleep(2.5)  # (the frame is read; nothing is to come of it yet)
            assert quarantined() == 0 and source.connections == 1 and journal.appending == 0
            await journal.mark_published([1, 2, 3], wait=True)  # room again
            await wait_for(lambda: quarantined() == 1, what="the frame quarantined")
            await asyncio.sleep(0.5)  # (stale 2 s after it read again, not at once)
            assert source.connections == 1
            sim.resume()


@pytest.mark.parametrize("window", [1, 8])
async def test_a_stalled_journal_holds_the_stream_to_its_window(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    window: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    While another process holds the journal's write lock, a stream hands the journal at
    most ``journal_window`` events that are not on disk yet, then waits. With a window
    of 1 it used to wait for none (half of 1 rounded down) and read on without bound.
    """
    submitted = 0
    submit = Journal.submit

    def counted(self: Journal, *args: Any, **kwargs: Any) -> Any:
        nonlocal submitted
        submitted += 1
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "submit", counted)
    async with Layerx402Simulator(rate=200) as sim:
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, journal_window=window)
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.events_received > 20, what="events flowing")
            other = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                await asyncio.sleep(0.1)  # the commit under way is now waiting for the lock
                before = submitted
                await asyncio.sleep(0.5)  # ~100 events produced meanwhile
                assert submitted - before <= window
                other.execute("COMMIT")
            finally:
                other.close()
            received = source.events_received
            await wait_for(lambda: source.events_received > received + 50, what="flowing again")


async def test_sigkill_mid_stream_resumes_from_stored_cursor(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """SIGKILL of a real listener mid-stream, then restart: it resumes from the stored cursor."""
    async with (
        Layerx402Simulator(rate=300, buffer_size=100_000) as sim,
        tap(broker_url, exchange_name) as t,
    ):
        raw = {
            "broker": {"url": broker_url, "exchange": exchange_name},
            "journal": {"path": str(tmp_path / "journal.db")},
            "sources": [lx_source(sim.url)],
        }
        listener = ListenerProcess(tmp_path, raw)
        try:
            await listener.start()
            await wait_for(lambda: len(t.messages) > 200, timeout=20, what="events flowing")
            listener.kill()
            await listener.wait()
            await listener.start()
            await wait_for(
                lambda: sum(1 for r in sim.requests if r.get("since_seq")) >= 1,
                what="since_seq resume",
            )
            await wait_for(lambda: len(t.messages) > 600, timeout=30, what="more events")
            sim.pause()
            every = {i for ids in expected_ids(sim).values() for i in ids}
            await t.wait_ids(every, timeout=60)
            assert await listener.terminate() == 0
        finally:
            await listener.stop()


async def test_an_event_whose_append_fails_alone_is_asked_for_again(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    One event's append fails on its own (its neighbours in the same commit go through):
    the subscription's cursor does not pass it, so the next connection asks for it again
    and nothing is lost. (A cursor written apart from its event, ahead of it, passed every
    stream test: they failed whole commits, which take both down together.)
    """
    build = Intake.build
    failed: list[str] = []

    def unstorable_once(self: Intake, result: Any, **kwargs: Any) -> Entry:
        entry = build(self, result, **kwargs)
        if entry.kind == "event" and len(failed) == 0 and self.events_received >= 40:
            failed.append(entry.event_id)
            return dataclasses.replace(entry, body=object())  # type: ignore[arg-type]  # (SQLite cannot bind it)
        return entry

    monkeypatch.setattr(Intake, "build", unstorable_once)
    async with (
        Layerx402Simulator(rate=400) as sim,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url)
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: bool(failed), what="the failed append")
            await wait_for(lambda: source.connections >= 2, what="a new connection")
            await wait_for(lambda: source.events_received > 200, what="events flowing")
            sim.pause()
            every = {i for ids in expected_ids(sim).values() for i in ids}
            assert failed[0] in every
            await t.wait_ids(every, timeout=60)


def test_a_subscription_refused_for_its_params_stays_reported_across_a_restart() -> None:
    """
    A stream source stopped and run again (the supervisor after a crash, a unit that came
    back) does not ask again for a subscription refused for its params: it stays
    refused, and ``listener_subscription_failed`` says so again (it stayed 0 after the
    stop, while ``/readyz`` said degraded).
    """
    metrics = Metrics()
    config = SubscriptionConfig(channel="trades", params={"mint": MINT})
    subs = subscriptions.Subscriptions("lx", (config,), LAYERX402, metrics)
    (sub,) = subs.to_subscribe(connecting=True)
    frame = ErrorFrame(
        id=sub.request_id, code="INVALID_PARAMS", message="no", kind="invalid_params"
    )
    subs.error(frame, Outcome())

    def failed() -> float | None:
        return metrics.registry.get_sample_value(
            "listener_subscription_failed", {"source": "lx", "subscription": sub.key}
        )

    assert failed() == 1
    subs.stopped()
    assert failed() == 0
    assert subs.to_subscribe(connecting=True) == []  # (the same params fail again)
    assert failed() == 1
