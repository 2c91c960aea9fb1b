"""
A Layerx402-compatible WebSocket server (CONTRACT §6) for tests, the demo and benchmarks.

::

    async with Layerx402Simulator(api_keys={"k"}, rate="manual") as sim:
        ...connect to sim.url, send {"type": "auth", "api_key": "k"}, subscribe...
        sim.emit("trades", {"mint": MINT}, 3)       # three events now
        await sim.drop_all()                        # abrupt TCP abort, no close frame
        await sim.wait_until(lambda: sim.subscribers("trades", {"mint": MINT}) == 1)

What it keeps per subscription key (channel + sorted params), across connections:
``seq`` (rising by one per event), a buffer of the last ``buffer_size`` events that
``since_seq`` replays from, and, when ``record`` is on, the ledger :attr:`produced`
of every event it made. Event data is derived from the key and ``seq`` alone, so the
same (key, seq) always carries the same data and therefore the same event id.

Fault controls: :meth:`drop_all`, :meth:`send_raw`, :meth:`inject_oversize`,
:meth:`rate_limit`, :meth:`pause` / :meth:`freeze` / :meth:`resume`,
:meth:`reject_handshakes`.

The provider side is written from the contract, not from ``handlers/layerx402.py``,
so the two check each other; only the key spelling is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, TypeAlias

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from handlers.layerx402 import subscription_key

__all__ = ["Layerx402Simulator", "Rate", "run_standalone", "serve_forever"]

# Events per second for a channel: > 0 paced, 0 as fast as subscribers read,
# "manual" only through Layerx402Simulator.emit().
Rate: TypeAlias = float | Literal["manual"]

# CONTRACT §6 table: channel → required params (the only params accepted).
_CHANNELS: Final[Mapping[str, tuple[str, ...]]] = {
    "token": ("mint",),
    "trades": ("mint",),
    "portfolio": ("wallet",),
}
# 2026-01-01T00:00:00Z: event times are derived from seq, so ids are reproducible.
DEFAULT_TIME_BASE_MS: Final = 1_767_225_600_000
_STEP_MS: Final = 250
# A subscriber's outbound queue above HIGH pauses production until it drains to LOW,
# so a slow reader gets TCP backpressure, not an unbounded queue (NOTES: websockets traps).
_HIGH: Final = 1024
_LOW: Final = 256
# A paced producer catches up at most this many events per wake-up.
_MAX_BURST: Final = 1000
_B58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_SOL: Final = "So11111111111111111111111111111111111111112"
_USDC: Final = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
_VENUES: Final = ("raydium", "orca", "meteora", "pumpswap")


def _b58(raw: bytes) -> str:
    """Base58 (Bitcoin alphabet), the spelling of Solana keys and signatures."""
    n = int.from_bytes(raw, "big")
    out: list[str] = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + "".join(reversed(out))


def _digest(text: str, size: int = 64) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def _decimal(units: int, places: int) -> str:
    """``units`` of 10**-places as a decimal string (CONTRACT §6: decimals are strings)."""
    whole, frac = divmod(units, 10**places)
    return f"{whole}.{frac:0{places}d}"


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Raw:
    __slots__ = ("payload",)

    def __init__(self, payload: str | bytes) -> None:
        self.payload = payload


# Outbound items: bytes = a UTF-8 JSON text frame (the fast path); _Raw = sent as given
# (str text, bytes binary); _Close = close with a code; None = stop writing.
_Out: TypeAlias = bytes | _Raw | _Close | None


class _Conn:
    """One authenticated-or-not connection and its outbound queue."""

    __slots__ = ("closed", "out", "room", "subs", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.out: asyncio.Queue[_Out] = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.closed = asyncio.Event()
        self.subs: dict[str, _Key] = {}


class _Key:
    """State of one subscription key; it outlives connections (CONTRACT §6)."""

    def __init__(self, channel: str, params: Mapping[str, str], buffer_size: int) -> None:
        self.channel = channel
        self.params = dict(params)
        self.name = subscription_key(channel, params)
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_size)
        self.subscribers: dict[str, _Conn] = {}
        self.active = asyncio.Event()
        self._head = b'","channel":"' + channel.encode() + b'","seq":'
        seed = _digest(self.name)
        # A price of 0.0001 to ~167 USD, in micro-dollars, per key.
        self.price_micro = 100 + int.from_bytes(seed[:3], "big") * 10
        self.wallets = [_b58(_digest(f"{self.name}/wallet/{i}", 32)) for i in range(16)]
        self.mints = [_SOL, _USDC, *(_b58(_digest(f"{self.name}/mint/{i}", 32)) for i in range(4))]

    def frame(self, subscription: str, seq: int, data_json: bytes) -> bytes:
        """``{"type": "event", ...}`` for one subscriber, without re-serialising data."""
        return (
            b'{"type":"event","subscription":"'
            + subscription.encode()
            + self._head
            + str(seq).encode()
            + b',"data":'
            + data_json
            + b"}"
        )

    def generate(self, seq: int, time_base_ms: int) -> dict[str, Any]:
        """The data of event ``seq``: a function of (key, seq) only."""
        d = _digest(f"{self.name}#{seq}")
        ts = time_base_ms + seq * _STEP_MS
        # ±1% around the key's price, so a chart of it looks like a market.
        price = _decimal(self.price_micro + self.price_micro * (d[5] - 128) // 12800, 6)
        if self.channel == "token":
            return {
                "mint": self.params["mint"],
                "price_usd": price,
                "updated_at": ts,
                "volume_24h_usd": _decimal(int.from_bytes(d[8:13], "big"), 2),
                "holders": int.from_bytes(d[13:16], "big"),
            }
        if self.channel == "trades":
            return {
                "signature": _b58(d),
                "mint": self.params["mint"],
                "side": "buy" if d[0] & 1 else "sell",
                "amount": _decimal(int.from_bytes(d[1:5], "big"), 6),
                "price_usd": price,
                "wallet": self.wallets[d[6] % len(self.wallets)],
                "ts": ts,
                "slot": 300_000_000 + seq,
                "venue": _VENUES[d[7] % len(_VENUES)],
            }
        return {
            "wallet": self.params["wallet"],
            "mint": self.mints[d[0] % len(self.mints)],
            "balance": _decimal(int.from_bytes(d[1:7], "big"), 9),
            "ts": ts,
            "value_usd": _decimal(int.from_bytes(d[8:12], "big"), 2),
        }


class Layerx402Simulator:
    """
    A Layerx402 server on ``host:port`` (port 0: a free one; see :attr:`port`, :attr:`url`).

    Args:
        api_keys: keys that authenticate; any other gets UNAUTHORIZED and close 4001.
        rate: events per second, for every channel or per channel name (:data:`Rate`).
        buffer_size: events held per key for ``since_seq``.
        ping_interval: seconds between app-level pings (``None``: none).
        forbidden: channels, or full keys (``trades?mint=...``), answered FORBIDDEN.
        record: keep every produced event in :attr:`produced` (off for long runs).
        time_base_ms: event time of seq 0 (``None``: now); event ``seq`` is at
            ``time_base_ms + seq * 250``.
        auth_timeout: seconds a connection has to authenticate.
        ws_ping_interval: WebSocket-level ping interval of the server (``None``: off).
        compression: ``"deflate"`` (offered to clients that ask) or ``None``.
        max_size: largest frame accepted from a client.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/ws",
        api_keys: Iterable[str] = ("test-key",),
        rate: Rate | Mapping[str, Rate] = "manual",
        buffer_size: int = 10_000,
        ping_interval: float | None = 20.0,
        forbidden: Iterable[str] = (),
        record: bool = True,
        time_base_ms: int | None = DEFAULT_TIME_BASE_MS,
        auth_timeout: float = 10.0,
        ws_ping_interval: float | None = 20.0,
        compression: Literal["deflate"] | None = "deflate",
        max_size: int = 2**20,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.api_keys = frozenset(api_keys)
        self.rate = rate
        self.buffer_size = buffer_size
        self.ping_interval = ping_interval
        self.forbidden = set(forbidden)
        self.record = record
        self.time_base_ms = int(time.time() * 1000) if time_base_ms is None else time_base_ms
        self.auth_timeout = auth_timeout
        self._ws_ping_interval = ws_ping_interval
        self._compression = compression
        self._max_size = max_size

        #: Ledger: key → every event produced, as ``{"seq", "channel", "data"}``.
        self.produced: dict[str, list[dict[str, Any]]] = {}
        #: Every frame a client sent, parsed (auth, subscribe, unsubscribe, pong, ...).
        self.requests: list[dict[str, Any]] = []
        #: ``ts`` of every app-level ping sent, and of every pong received.
        self.pings_sent: list[int] = []
        self.pongs: list[int] = []
        #: Loop time of every WebSocket handshake, to check reconnect delays.
        self.connect_times: list[float] = []
        self.auth_ok = 0
        self.auth_failed = 0
        self.rate_limited_rejections = 0

        self._keys: dict[str, _Key] = {}
        self._all: set[_Conn] = set()
        self._authed: set[_Conn] = set()
        self._sub_ids = itertools.count(1)
        self._running = asyncio.Event()
        self._running.set()
        self._pings_on = True
        self._frozen = False
        self._rate_limited_until = 0.0
        self._handshake_status: int | None = None
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._producers: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``ws://host:port/ws`` once started."""
        return f"ws://{self.host}:{self.port}{self.path}"

    async def __aenter__(self) -> Layerx402Simulator:
        if self._main is not None:
            raise RuntimeError("this simulator was already started; create a new one")
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # One owned task runs the server and a TaskGroup of producers. Not a TaskGroup
        # entered here: __aenter__ and __aexit__ may run in different tasks (pytest
        # fixtures do), which a TaskGroup does not allow.
        self._main = asyncio.create_task(self._run(ready), name="layerx402-simulator")
        await asyncio.wait({ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            self._main.result()  # raises why it could not start (e.g. port in use)
            raise RuntimeError("the simulator stopped before it started listening")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop producing, close every connection (1001) and the listening socket."""
        self._stopping.set()
        self._running.set()
        if self._main is not None:
            await self._main

    async def _run(self, ready: asyncio.Future[None]) -> None:
        async with serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression=self._compression,
            ping_interval=self._ws_ping_interval,
            max_size=self._max_size,
        ) as server:
            self.port = _bound_port(server)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for key in self._keys.values():
                    self._start_producer(key)
                ready.set_result(None)
                await self._stopping.wait()
                self._tg = None
                for task in self._producers:
                    task.cancel()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._handshake_status is not None:
            return connection.respond(self._handshake_status, "rejected by the simulator\n")
        if request.path.split("?", 1)[0] != self.path:
            return connection.respond(404, f"no WebSocket endpoint here; use {self.path}\n")
        return None

    # --- observation -----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Authenticated connections open now."""
        return len(self._authed)

    def subscribers(self, channel: str, params: Mapping[str, str]) -> int:
        """Subscriptions to this key open now, over all connections."""
        key = self._keys.get(subscription_key(channel, params))
        return len(key.subscribers) if key else 0

    def last_seq(self, channel: str, params: Mapping[str, str]) -> int:
        """The last ``seq`` produced for this key (0: none yet)."""
        key = self._keys.get(subscription_key(channel, params))
        return key.seq if key else 0

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the deadline is built in so no caller forgets one
        what: str = "",
    ) -> None:
        """
        Wait until ``predicate()`` holds; it is re-checked on every state change.

        Raises:
            TimeoutError: it did not hold within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"simulator: not {what or 'true'} after {timeout}s") from None

    def _pulse(self) -> None:
        # Wake every wait_until; the next waiters get a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- producing -------------------------------------------------------------------

    def _rate_of(self, channel: str) -> Rate:
        if isinstance(self.rate, Mapping):
            return self.rate.get(channel, "manual")
        return self.rate

    def _key(self, channel: str, params: Mapping[str, str]) -> _Key:
        name = subscription_key(channel, params)
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = _Key(channel, params, self.buffer_size)
            self._start_producer(key)
        return key

    def _start_producer(self, key: _Key) -> None:
        rate = self._rate_of(key.channel)
        if rate == "manual" or self._tg is None:
            return
        task = self._tg.create_task(self._produce(key, float(rate)), name=f"produce {key.name}")
        self._producers.add(task)
        task.add_done_callback(self._producers.discard)

    def emit(self, channel: str, params: Mapping[str, str], n: int = 1) -> list[dict[str, Any]]:
        """Produce ``n`` events for this key now (any rate mode); returns their records."""
        if channel not in _CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {sorted(_CHANNELS)}")
        key = self._key(channel, params)
        records = [self._emit_one(key) for _ in range(n)]
        self._pulse()
        return records

    def _emit_one(self, key: _Key) -> dict[str, Any]:
        key.seq += 1
        seq = key.seq
        data = key.generate(seq, self.time_base_ms)
        data_json = orjson.dumps(data)
        key.buffer.append((seq, data_json))
        record = {"seq": seq, "channel": key.channel, "data": data}
        if self.record:
            self.produced.setdefault(key.name, []).append(record)
        for sub_id, conn in key.subscribers.items():
            conn.out.put_nowait(key.frame(sub_id, seq, data_json))
        return record

    async def _room(self, key: _Key) -> None:
        # Backpressure: wait for every subscriber's queue to drain below _HIGH.
        for conn in list(key.subscribers.values()):
            while conn.out.qsize() >= _HIGH and not conn.closed.is_set():
                conn.room.clear()
                await conn.room.wait()

    async def _idle(self, delay: float) -> None:
        # An interruptible pause: ends early when the simulator stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    async def _produce(self, key: _Key, rate: float) -> None:
        if rate <= 0:
            await self._produce_flat_out(key)
        else:
            await self._produce_paced(key, rate)

    async def _produce_flat_out(self, key: _Key) -> None:
        # As fast as the subscribers read; nothing while nobody listens.
        for turn in itertools.count(1):
            await key.active.wait()
            await self._running.wait()
            await self._room(key)
            if key.subscribers and self._running.is_set():
                self._emit_one(key)
            if turn % 64 == 0:
                self._pulse()
                # Awaiting a set event does not yield, so yield to the loop here, or
                # a producer whose subscribers just closed would starve their cleanup.
                await asyncio.sleep(0)

    async def _produce_paced(self, key: _Key, rate: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        next_at = loop.time()
        while not self._stopping.is_set():
            if not self._running.is_set():
                await self._running.wait()
                next_at = loop.time()  # no burst of the time spent paused
            now = loop.time()
            if now < next_at:
                await self._idle(next_at - now)
                continue
            burst = 0
            while next_at <= now and burst < _MAX_BURST:
                self._emit_one(key)
                next_at += interval
                burst += 1
            if burst == _MAX_BURST:
                next_at = now + interval
            self._pulse()
            await self._room(key)

    # --- connections -----------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self.connect_times.append(loop.time())
        conn = _Conn(ws)
        self._all.add(conn)
        try:
            remaining = self._rate_limited_until - loop.time()
            if remaining > 0:
                # CONTRACT §6: error with retry_after, then close 4029.
                self.rate_limited_rejections += 1
                await _refuse(ws, 4029, _rate_limited_frame(remaining))
                return
            if not await self._authenticate(ws):
                return
            self._authed.add(conn)
            self._pulse()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(conn))
                if self.ping_interval:
                    tg.create_task(self._pinger(conn, self.ping_interval))
                with contextlib.suppress(ConnectionClosed):
                    async for message in ws:
                        self._on_frame(conn, message)
                conn.closed.set()
                conn.out.put_nowait(None)
        finally:
            conn.closed.set()
            conn.room.set()
            for sub_id, key in conn.subs.items():
                key.subscribers.pop(sub_id, None)
                if not key.subscribers:
                    key.active.clear()
            self._authed.discard(conn)
            self._all.discard(conn)
            self._pulse()

    async def _authenticate(self, ws: ServerConnection) -> bool:
        try:
            async with asyncio.timeout(self.auth_timeout):
                message = await ws.recv()
        except TimeoutError:
            self.auth_failed += 1
            await _refuse(ws, 4001, _error(None, "UNAUTHORIZED", "no auth frame in time"))
            return False
        except ConnectionClosed:
            return False
        frame = _loads(message)
        if frame is not None:
            self.requests.append(frame)
        api_key = frame.get("api_key") if frame and frame.get("type") == "auth" else None
        if not isinstance(api_key, str) or api_key not in self.api_keys:
            self.auth_failed += 1
            self._pulse()
            await _refuse(ws, 4001, _error(None, "UNAUTHORIZED", "invalid or missing api_key"))
            return False
        with contextlib.suppress(ConnectionClosed):
            await ws.send(b'{"type":"auth_ok"}', text=True)
            self.auth_ok += 1
            return True
        return False

    async def _writer(self, conn: _Conn) -> None:
        ws = conn.ws
        try:
            while True:
                item = await conn.out.get()
                if conn.out.qsize() < _LOW:
                    conn.room.set()
                if item is None:
                    return
                if isinstance(item, bytes):
                    await ws.send(item, text=True)
                elif isinstance(item, _Raw):
                    await ws.send(item.payload)
                else:
                    await ws.close(item.code, item.reason)
                    return
        except ConnectionClosed:
            return
        finally:
            conn.closed.set()
            conn.room.set()

    async def _pinger(self, conn: _Conn, interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await conn.closed.wait()
            if conn.closed.is_set():
                return
            if self._pings_on:
                ts = int(time.time() * 1000)
                self.pings_sent.append(ts)
                conn.out.put_nowait(b'{"type":"ping","ts":' + str(ts).encode() + b"}")
                self._pulse()

    def _on_frame(self, conn: _Conn, message: str | bytes) -> None:
        frame = _loads(message)
        if frame is None:
            conn.out.put_nowait(_error(None, "BAD_REQUEST", "frames are JSON objects"))
            return
        self.requests.append(frame)
        kind = frame.get("type")
        if kind == "pong":
            ts = frame.get("ts")
            if isinstance(ts, int) and not isinstance(ts, bool):
                self.pongs.append(ts)
        elif kind == "subscribe":
            self._subscribe(conn, frame)
        elif kind == "unsubscribe":
            self._unsubscribe(conn, frame)
        else:
            request_id = _request_id(frame)
            conn.out.put_nowait(_error(request_id, "BAD_REQUEST", f"unknown type {kind!r}"))
        self._pulse()

    def _subscribe(self, conn: _Conn, frame: dict[str, Any]) -> None:
        request_id = _request_id(frame)
        channel = frame.get("channel")
        params = frame.get("params", {})
        since = frame.get("since_seq")
        problem = _check_subscribe(request_id, channel, params, since)
        if problem:
            conn.out.put_nowait(_error(request_id, "INVALID_PARAMS", problem))
            return
        assert isinstance(channel, str)  # _check_subscribe proved it
        if channel in self.forbidden or subscription_key(channel, params) in self.forbidden:
            conn.out.put_nowait(_error(request_id, "FORBIDDEN", f"not allowed: {channel}"))
            return
        key = self._key(channel, params)
        sub_id = f"sub_{next(self._sub_ids)}"
        conn.out.put_nowait(
            orjson.dumps(
                {"type": "subscribed", "id": request_id, "channel": channel, "subscription": sub_id}
            )
        )
        # Replay and registration happen with no await in between, so the held events
        # and the live ones follow each other without a gap or a duplicate.
        if since is not None and key.buffer:
            first = key.buffer[0][0]
            for i in range(max(since + 1 - first, 0), len(key.buffer)):
                seq, data_json = key.buffer[i]
                conn.out.put_nowait(key.frame(sub_id, seq, data_json))
        key.subscribers[sub_id] = conn
        conn.subs[sub_id] = key
        key.active.set()

    def _unsubscribe(self, conn: _Conn, frame: dict[str, Any]) -> None:
        request_id = _request_id(frame)
        sub_id = frame.get("subscription")
        key = conn.subs.pop(sub_id, None) if isinstance(sub_id, str) else None
        if key is None:
            conn.out.put_nowait(_error(request_id, "INVALID_PARAMS", "no such subscription"))
            return
        key.subscribers.pop(str(sub_id), None)
        if not key.subscribers:
            key.active.clear()
        conn.out.put_nowait(
            orjson.dumps({"type": "unsubscribed", "id": request_id, "subscription": sub_id})
        )

    # --- faults ----------------------------------------------------------------------

    async def drop_all(self, code: int | None = None, reason: str = "") -> None:
        """
        Close every connection and wait until they are gone.

        Args:
            code: close code (e.g. 1011, 4003); ``None`` aborts the TCP connection
                without a close frame, like a network failure.
            reason: close reason sent with ``code``.
        """
        conns = list(self._all)
        if code is None:
            for conn in conns:
                conn.ws.transport.abort()
        else:
            async with asyncio.TaskGroup() as tg:
                for conn in conns:
                    tg.create_task(conn.ws.close(code, reason))
        await self.wait_until(
            lambda: not self._all.intersection(conns), timeout=15.0, what="all dropped"
        )

    def send_raw(self, payload: str | bytes) -> None:
        """Send ``payload`` as is to every authenticated connection (str: text, bytes: binary)."""
        for conn in self._authed:
            conn.out.put_nowait(_Raw(payload))

    def inject_oversize(self, size: int = 2 * 2**20) -> None:
        """Send every authenticated connection a valid JSON frame of ``size`` bytes."""
        head, tail = b'{"type":"notice","padding":"', b'"}'
        frame = head + b"x" * max(size - len(head) - len(tail), 0) + tail
        for conn in self._authed:
            conn.out.put_nowait(frame)

    async def rate_limit(self, retry_after: float = 1.0) -> None:
        """
        Rate-limit for ``retry_after`` seconds: every open connection, and every new one
        until then, gets ``RATE_LIMITED`` with ``retry_after`` and close 4029.
        """
        self._rate_limited_until = asyncio.get_running_loop().time() + retry_after
        conns = list(self._authed)
        for conn in conns:
            conn.out.put_nowait(_rate_limited_frame(retry_after))
            conn.out.put_nowait(_Close(4029, "rate limited"))
        await self.wait_until(
            lambda: not self._all.intersection(conns), timeout=15.0, what="rate-limited closed"
        )

    def pause(self, *, pings: bool = True) -> None:
        """Stop producing events (and app-level pings, unless ``pings=False``): silence."""
        self._running.clear()
        self._pings_on = not pings

    def freeze(self) -> None:
        """As :meth:`pause`, and stop reading sockets: WebSocket pings go unanswered."""
        self.pause()
        self._frozen = True
        for conn in self._all:
            conn.ws.transport.pause_reading()

    def resume(self) -> None:
        """Undo :meth:`pause` and :meth:`freeze`."""
        self._running.set()
        self._pings_on = True
        if self._frozen:
            self._frozen = False
            for conn in self._all:
                conn.ws.transport.resume_reading()

    def reject_handshakes(self, status: int | None) -> None:
        """Answer new WebSocket handshakes with HTTP ``status`` (``None``: accept again)."""
        self._handshake_status = status


# --- helpers -------------------------------------------------------------------------


def _bound_port(server: Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


def _loads(message: str | bytes) -> dict[str, Any] | None:
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None


def _request_id(frame: Mapping[str, Any]) -> str | None:
    request_id = frame.get("id")
    return request_id if isinstance(request_id, str) else None


def _error(request_id: str | None, code: str, message: str) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame = {"type": "error", "id": request_id, "code": code, "message": message}
    return orjson.dumps(frame)


def _rate_limited_frame(retry_after: float) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "code": "RATE_LIMITED",
            "message": "too many requests",
            "retry_after": round(retry_after, 3),
        }
    )


def _check_subscribe(request_id: str | None, channel: object, params: object, since: object) -> str:
    """The INVALID_PARAMS message for a bad subscribe, or "" when it is fine."""
    if not request_id:
        return "id must be a non-empty string"
    if not isinstance(channel, str) or channel not in _CHANNELS:
        return f"unknown channel; expected one of {sorted(_CHANNELS)}"
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        return "params must be an object of strings"
    required = _CHANNELS[channel]
    missing = [name for name in required if not params.get(name)]
    if missing:
        return f"missing params: {', '.join(missing)}"
    unknown = sorted(set(params) - set(required))
    if unknown:
        return f"unknown params: {', '.join(unknown)}"
    if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
        return "since_seq must be a non-negative integer"
    return ""


async def _refuse(ws: ServerConnection, code: int, error: bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(error, text=True)
        await ws.close(code, "unauthorized" if code == 4001 else "rate limited")


# --- standalone ----------------------------------------------------------------------


async def serve_forever(
    *,
    host: str = "127.0.0.1",
    port: int = 8402,
    rate: Rate | Mapping[str, Rate] = 10.0,
    api_keys: Iterable[str] = ("demo",),
    on_ready: Callable[[Layerx402Simulator], None] | None = None,
) -> None:
    """Run a simulator until cancelled; no ledger, event times from now."""
    simulator = Layerx402Simulator(
        host=host, port=port, rate=rate, api_keys=api_keys, record=False, time_base_ms=None
    )
    async with simulator:
        if on_ready is not None:
            on_ready(simulator)
        await asyncio.get_running_loop().create_future()  # until cancelled


def run_standalone(
    host: str,
    port: int,
    rate: Rate | Mapping[str, Rate],
    api_keys: Iterable[str],
    on_ready: Callable[[Layerx402Simulator], None] | None = None,
) -> None:
    """Run :func:`serve_forever` in a new event loop until SIGINT or SIGTERM."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None  # always inside asyncio.run
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_forever(
                host=host, port=port, rate=rate, api_keys=api_keys, on_ready=on_ready
            )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
