"""
Tests for listener/simulators/layerx402.py: a real websockets client on 127.0.0.1
against the simulator, speaking CONTRACT §6 through handlers/layerx402.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from handlers import Event, Quarantine
from handlers.layerx402 import (
    AuthOk,
    ErrorFrame,
    EventFrame,
    Ping,
    ServerFrame,
    Subscribed,
    Unparseable,
    Unsubscribed,
    auth_frame,
    parse_frame,
    pong_frame,
    subscribe_frame,
    subscription_key,
    unsubscribe_frame,
)
from listener.dev.simulators.layerx402 import Layerx402Simulator, serve_forever
from tests.conftest import UNIT

KEY = "k-test"
MINT = "So11111111111111111111111111111111111111112"
WALLET = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
TRADES = {"mint": MINT}


@pytest.fixture
async def sim() -> AsyncIterator[Layerx402Simulator]:
    """A manual-rate simulator without app-level pings, so frames arrive only when asked."""
    async with Layerx402Simulator(api_keys={KEY}, ping_interval=None) as simulator:
        yield simulator


@contextlib.asynccontextmanager
async def session(sim: Layerx402Simulator, key: str = KEY) -> AsyncIterator[ClientConnection]:
    """A connected, authenticated client."""
    async with connect(sim.url, open_timeout=5 * UNIT, close_timeout=2 * UNIT) as ws:
        await ws.send(auth_frame(key))
        assert await recv(ws) == AuthOk()
        yield ws


async def recv(ws: ClientConnection, timeout: float = 5.0) -> ServerFrame:
    """The next frame, parsed, within a deadline."""
    async with asyncio.timeout(timeout * UNIT):
        return parse_frame(await ws.recv())


async def subscribe(
    ws: ClientConnection,
    channel: str = "trades",
    params: dict[str, str] | None = None,
    since_seq: int | None = None,
    request_id: str = "r1",
) -> Subscribed:
    await ws.send(subscribe_frame(request_id, channel, params or TRADES, since_seq))
    frame = await recv(ws)
    assert isinstance(frame, Subscribed), frame
    assert frame.id == request_id
    return frame


async def events(ws: ClientConnection, n: int) -> list[EventFrame]:
    """The next ``n`` event frames, answering pings on the way."""
    out: list[EventFrame] = []
    while len(out) < n:
        frame = await recv(ws)
        if isinstance(frame, Ping):
            await ws.send(pong_frame(frame.ts))
            continue
        assert isinstance(frame, EventFrame), frame
        out.append(frame)
    return out


async def drain(ws: ClientConnection, quiet: float) -> list[ServerFrame]:
    """Every frame until none arrives for ``quiet`` seconds (bounded overall)."""
    frames: list[ServerFrame] = []
    async with asyncio.timeout(5 * UNIT):
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(await recv(ws, timeout=quiet))
    return frames


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes; the close code it sent (None: no close frame)."""
    async with asyncio.timeout(5 * UNIT):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    received = ws.protocol.close_rcvd
    return received.code if received is not None else None


# --- auth ----------------------------------------------------------------------------


async def test_auth_ok(sim: Layerx402Simulator) -> None:
    """A valid key is answered auth_ok and counted as a connection."""
    async with session(sim):
        await sim.wait_until(lambda: sim.connections == 1, timeout=5 * UNIT)
        assert sim.auth_ok == 1
    await sim.wait_until(lambda: sim.connections == 0, timeout=5 * UNIT)


async def test_bad_key_gets_unauthorized_and_close_4001(sim: Layerx402Simulator) -> None:
    """A wrong key gets an UNAUTHORIZED error frame, then close code 4001."""
    async with connect(sim.url) as ws:
        await ws.send(auth_frame("wrong"))
        frame = await recv(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == "UNAUTHORIZED"
        assert await close_code(ws) == 4001
    assert sim.auth_failed == 1


async def test_subscribing_before_auth_is_unauthorized(sim: Layerx402Simulator) -> None:
    """A first frame that is not auth gets UNAUTHORIZED and close 4001."""
    async with connect(sim.url) as ws:
        await ws.send(subscribe_frame("r1", "trades", TRADES))
        frame = await recv(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == "UNAUTHORIZED"
        assert await close_code(ws) == 4001


async def test_unknown_path_is_404(sim: Layerx402Simulator) -> None:
    """Only the /ws path takes WebSocket connections."""
    with pytest.raises(InvalidStatus) as caught:
        async with asyncio.timeout(5 * UNIT):
            await connect(sim.url.replace("/ws", "/other"))
    assert caught.value.response.status_code == 404


# --- subscriptions and events --------------------------------------------------------


async def test_events_arrive_with_seq_rising_by_one(sim: Layerx402Simulator) -> None:
    """After subscribed, events carry the subscription id and seq 1, 2, 3... and valid data."""
    async with session(sim) as ws:
        sub = await subscribe(ws)
        assert sub.channel == "trades"
        sim.emit("trades", TRADES, 5)
        got = await events(ws, 5)
    assert [f.seq for f in got] == [1, 2, 3, 4, 5]
    assert {f.subscription for f in got} == {sub.subscription}
    ledger = sim.produced[subscription_key("trades", TRADES)]
    for frame, record in zip(got, ledger, strict=True):
        assert isinstance(frame.result, Event), frame.result
        assert frame.result.type == "layerx402.trade"
        assert dict(frame.result.data) == record["data"]
        assert frame.seq == record["seq"]


@pytest.mark.parametrize(
    ("channel", "params"), [("token", {"mint": MINT}), ("portfolio", {"wallet": WALLET})]
)
async def test_every_channel_produces_valid_events(
    sim: Layerx402Simulator, channel: str, params: dict[str, str]
) -> None:
    """token and portfolio events validate against the handler's models, with distinct ids."""
    async with session(sim) as ws:
        await subscribe(ws, channel, params)
        sim.emit(channel, params, 20)
        got = await events(ws, 20)
    results = [f.result for f in got]
    assert all(isinstance(r, Event) for r in results), results
    assert len({r.id for r in results if isinstance(r, Event)}) == 20


async def test_seq_is_per_key_and_shared_by_connections(sim: Layerx402Simulator) -> None:
    """Two clients on one key see the same seqs and ids; another key counts on its own."""
    other = {"mint": "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"}
    async with session(sim) as a, session(sim) as b:
        sub_a = await subscribe(a)
        sub_b = await subscribe(b)
        await subscribe(b, params=other, request_id="r2")
        sim.emit("trades", other, 2)
        sim.emit("trades", TRADES, 3)
        got_a = await events(a, 3)
        got_b = await events(b, 5)
    assert sub_a.subscription != sub_b.subscription
    assert [f.seq for f in got_a] == [1, 2, 3]
    assert [f.seq for f in got_b] == [1, 2, 1, 2, 3]
    ids_a = [r.id for r in (f.result for f in got_a) if isinstance(r, Event)]
    ids_b = [r.id for r in (f.result for f in got_b[2:]) if isinstance(r, Event)]
    assert ids_a == ids_b


async def test_since_seq_resends_what_was_missed_after_a_reconnect(
    sim: Layerx402Simulator,
) -> None:
    """After an abrupt drop, resubscribing with since_seq gets every later event, then live ones."""
    async with session(sim) as ws:
        await subscribe(ws)
        sim.emit("trades", TRADES, 3)
        before = await events(ws, 3)
        await sim.drop_all()
        assert await close_code(ws) is None
    sim.emit("trades", TRADES, 4)  # produced while nobody was connected
    async with session(sim) as ws:
        await subscribe(ws, since_seq=before[-1].seq)
        resent = await events(ws, 4)
        sim.emit("trades", TRADES, 1)
        live = await events(ws, 1)
    assert [f.seq for f in before + resent + live] == list(range(1, 9))
    again = [f.result for f in resent]
    assert all(isinstance(r, Event) for r in again)


async def test_resent_events_keep_their_ids(sim: Layerx402Simulator) -> None:
    """An event resent through since_seq has the same data and id as the first time."""
    async with session(sim) as ws:
        await subscribe(ws)
        sim.emit("trades", TRADES, 3)
        first = await events(ws, 3)
    async with session(sim) as ws:
        await subscribe(ws, since_seq=0)
        second = await events(ws, 3)
    assert [f.result for f in first] == [f.result for f in second]


async def test_since_seq_older_than_the_buffer_gets_what_is_held() -> None:
    """since_seq before the retained buffer resends only the events still held."""
    async with Layerx402Simulator(api_keys={KEY}, ping_interval=None, buffer_size=5) as sim:
        sim.emit("trades", TRADES, 12)
        async with session(sim) as ws:
            await subscribe(ws, since_seq=2)
            got = await events(ws, 5)
            sim.emit("trades", TRADES, 1)
            live = await events(ws, 1)
    assert [f.seq for f in got + live] == [8, 9, 10, 11, 12, 13]


async def test_unsubscribe_stops_events(sim: Layerx402Simulator) -> None:
    """unsubscribe is answered unsubscribed and no more events come for it."""
    other = {"mint": "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"}
    async with session(sim) as ws:
        sub = await subscribe(ws)
        await subscribe(ws, params=other, request_id="r2")
        await ws.send(unsubscribe_frame("r3", sub.subscription))
        assert await recv(ws) == Unsubscribed(id="r3", subscription=sub.subscription)
        sim.emit("trades", TRADES, 2)
        sim.emit("trades", other, 1)
        (only,) = await events(ws, 1)
    assert only.seq == 1
    assert only.subscription != sub.subscription


async def test_flat_out_rate_streams_contiguous_seqs() -> None:
    """rate=0 produces as fast as the client reads, with no gap in seq."""
    async with (
        Layerx402Simulator(api_keys={KEY}, ping_interval=None, rate=0) as sim,
        session(sim) as ws,
    ):
        await subscribe(ws)
        got = await events(ws, 3000)
        # Read up to the unsubscribed answer: a client that stops reading under a flood
        # cannot finish the closing handshake (the close frame queues behind events).
        await ws.send(unsubscribe_frame("r9", got[0].subscription))
        while not isinstance(await recv(ws), Unsubscribed):
            pass
    assert [f.seq for f in got] == list(range(1, 3001))


# --- errors on subscribe -------------------------------------------------------------


async def test_forbidden_channel_gets_forbidden_and_the_connection_stays() -> None:
    """A forbidden channel is answered FORBIDDEN with the request id; others still work."""
    async with (
        Layerx402Simulator(api_keys={KEY}, ping_interval=None, forbidden={"portfolio"}) as sim,
        session(sim) as ws,
    ):
        await ws.send(subscribe_frame("r1", "portfolio", {"wallet": WALLET}))
        assert await recv(ws) == ErrorFrame(
            id="r1", code="FORBIDDEN", message="not allowed: portfolio", kind="forbidden"
        )
        await subscribe(ws, request_id="r2")


@pytest.mark.parametrize(
    "frame",
    [
        subscribe_frame("r1", "trades", {}),
        subscribe_frame("r1", "portfolio", {"mint": MINT}),
        subscribe_frame("r1", "orderbook", {"mint": MINT}),
        subscribe_frame("r1", "trades", {"mint": MINT, "extra": "x"}),
        '{"type": "subscribe", "id": "r1", "channel": "trades", "params": {"mint": 5}}',
        '{"type": "subscribe", "id": "r1", "channel": "trades", "params": {"mint": "m"}, "since_seq": -1}',
    ],
)
async def test_bad_params_get_invalid_params(sim: Layerx402Simulator, frame: str) -> None:
    """Missing, unknown or mistyped params (or channel) are answered INVALID_PARAMS."""
    async with session(sim) as ws:
        await ws.send(frame)
        answer = await recv(ws)
    assert isinstance(answer, ErrorFrame), answer
    assert (answer.id, answer.code) == ("r1", "INVALID_PARAMS")


# --- pings ---------------------------------------------------------------------------


async def test_app_pings_are_recorded_with_their_pongs() -> None:
    """The server pings with ts at its interval and records the pongs it gets back."""
    async with (
        Layerx402Simulator(api_keys={KEY}, ping_interval=0.05) as sim,
        session(sim) as ws,
    ):
        ping = await recv(ws)
        assert isinstance(ping, Ping)
        assert ping.ts in sim.pings_sent
        await ws.send(pong_frame(ping.ts))
        await sim.wait_until(lambda: ping.ts in sim.pongs, timeout=5 * UNIT, what="pong")


async def test_pause_silences_events_and_pings_until_resume() -> None:
    """pause() stops events and app pings (silence); resume() starts them again."""
    async with (
        Layerx402Simulator(api_keys={KEY}, ping_interval=0.05, rate=200) as sim,
        session(sim) as ws,
    ):
        await subscribe(ws)
        await events(ws, 5)
        sim.pause()
        await drain(ws, quiet=0.2)  # what was in flight when it paused
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=0.3)
        sim.resume()
        assert len(await events(ws, 5)) == 5


# --- faults --------------------------------------------------------------------------


async def test_drop_all_with_a_code_closes_with_it(sim: Layerx402Simulator) -> None:
    """drop_all(code) closes every connection with that code."""
    async with session(sim) as a, session(sim) as b:
        await sim.drop_all(4003, "forbidden")
        assert await close_code(a) == 4003
        assert await close_code(b) == 4003
    assert sim.connections == 0


async def test_drop_all_without_a_code_aborts_without_close_frame(
    sim: Layerx402Simulator,
) -> None:
    """drop_all() aborts TCP: the client sees an error with no close frame."""
    async with session(sim) as ws:
        await sim.drop_all()
        with pytest.raises(ConnectionClosedError) as caught:
            async with asyncio.timeout(5 * UNIT):
                await ws.recv()
        assert caught.value.rcvd is None


async def test_rate_limit_sends_retry_after_then_4029_until_it_expires(
    sim: Layerx402Simulator,
) -> None:
    """rate_limit() closes 4029 after an error with retry_after, and refuses until it passes."""
    async with session(sim) as ws:
        limited = asyncio.create_task(sim.rate_limit(retry_after=0.5 * UNIT))
        frame = await recv(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == "RATE_LIMITED"
        assert frame.retry_after == pytest.approx(0.5 * UNIT)
        assert await close_code(ws) == 4029
        await limited
    async with connect(sim.url) as early:
        frame = await recv(early)
        assert isinstance(frame, ErrorFrame)
        assert frame.retry_after is not None
        assert 0 < frame.retry_after <= 0.5 * UNIT
        assert await close_code(early) == 4029
    assert sim.rate_limited_rejections == 1
    # Honour retry_after as a client must (CONTRACT §6); then the server takes us again.
    await asyncio.sleep(frame.retry_after)
    async with session(sim):
        pass
    assert sim.connect_times[-1] - sim.connect_times[0] >= 0.5 * UNIT


async def test_send_raw_delivers_malformed_frames(sim: Layerx402Simulator) -> None:
    """send_raw() reaches the client as is, and the handler quarantines it as invalid_json."""
    async with session(sim) as ws:
        sim.send_raw('{"type": "event", "seq": ')
        frame = await recv(ws)
    assert isinstance(frame, Unparseable)
    assert frame.verdict == Quarantine(reason="invalid_json", detail=frame.verdict.detail)


async def test_oversize_frame_makes_the_client_close_1009(sim: Layerx402Simulator) -> None:
    """A frame over the client's max_size makes the client close with 1009 (too big)."""
    async with connect(sim.url, max_size=2**20) as ws:
        await ws.send(auth_frame(KEY))
        assert await recv(ws) == AuthOk()
        sim.inject_oversize(2 * 2**20)
        with pytest.raises(ConnectionClosedError):
            async with asyncio.timeout(5 * UNIT):
                await ws.recv()
        assert ws.protocol.close_sent is not None
        assert ws.protocol.close_sent.code == 1009


async def test_reject_handshakes_answers_http_status(sim: Layerx402Simulator) -> None:
    """reject_handshakes(503) refuses the upgrade with that status until cleared."""
    sim.reject_handshakes(503)
    with pytest.raises(InvalidStatus) as caught:
        async with asyncio.timeout(5 * UNIT):
            await connect(sim.url)
    assert caught.value.response.status_code == 503
    sim.reject_handshakes(None)
    async with session(sim):
        pass


async def test_data_is_a_function_of_key_and_seq() -> None:
    """Two simulators produce identical data for the same key and seq (reproducible ids)."""
    records: list[list[dict[str, Any]]] = []
    for _ in range(2):
        async with Layerx402Simulator(api_keys={KEY}, ping_interval=None) as sim:
            records.append(sim.emit("portfolio", {"wallet": WALLET}, 10))
    assert records[0] == records[1]


async def test_freeze_leaves_websocket_pings_unanswered() -> None:
    """freeze() stops reading sockets, so a client's keepalive ping times out and it closes."""
    async with Layerx402Simulator(api_keys={KEY}, ping_interval=None) as sim:
        async with connect(sim.url, ping_interval=0.05, ping_timeout=0.1, close_timeout=0.2) as ws:
            await ws.send(auth_frame(KEY))
            assert await recv(ws) == AuthOk()
            sim.freeze()
            with pytest.raises(ConnectionClosedError):
                async with asyncio.timeout(5 * UNIT):
                    await ws.recv()
        sim.resume()
        await sim.wait_until(lambda: sim.connections == 0, timeout=15 * UNIT)


async def test_rate_per_channel() -> None:
    """A per-channel rate paces the channels it names; the others stay manual."""
    async with (
        Layerx402Simulator(api_keys={KEY}, ping_interval=None, rate={"token": 100.0}) as sim,
        session(sim) as ws,
    ):
        await subscribe(ws, "trades", TRADES, request_id="r1")
        await subscribe(ws, "token", {"mint": MINT}, request_id="r2")
        got = await events(ws, 10)
        assert {f.channel for f in got} == {"token"}
        assert sim.last_seq("trades", TRADES) == 0


async def test_serve_forever_runs_until_cancelled() -> None:
    """serve_forever serves paced events with current times until its task is cancelled."""
    ready: asyncio.Future[Layerx402Simulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_forever(port=0, rate=50.0, api_keys=["demo"], on_ready=ready.set_result)
    )
    try:
        async with asyncio.timeout(5 * UNIT):
            simulator = await ready
        async with session(simulator, key="demo") as ws:
            await subscribe(ws)
            (frame,) = await events(ws, 1)
        assert isinstance(frame.result, Event)
        assert frame.result.time is not None
        age = datetime.now(UTC) - frame.result.time
        assert abs(age.total_seconds()) < 60
        assert simulator.produced == {}  # no ledger on long runs
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
