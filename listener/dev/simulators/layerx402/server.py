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
import itertools
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from handlers.layerx402 import subscription_key
from listener.dev.simulators.layerx402.faults import Faults
from listener.dev.simulators.layerx402.feed import (
    DEFAULT_TIME_BASE_MS,
    LOW,
    Conn,
    Key,
    Rate,
    Raw,
    check_subscribe,
    error_frame,
    frame_request_id,
    loads,
    rate_limited_frame,
    refuse,
)
from listener.dev.simulators.layerx402.production import Production

__all__ = ["Layerx402Simulator", "run_standalone", "serve_forever"]


class Layerx402Simulator(Production, Faults):
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
        #: Channels whose next subscribe gets an error frame of this code, or no answer
        #: at all (``None``; refuse_next).
        self.refuse_once: dict[str, str | None] = {}
        #: Text frames sent to each connection that authenticates, before its auth_ok.
        self.before_auth_ok: list[str] = []
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

        self._keys: dict[str, Key] = {}
        self._all: set[Conn] = set()
        self._authed: set[Conn] = set()
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
            self.port = bound_port(server)
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

    # --- connections -----------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self.connect_times.append(loop.time())
        conn = Conn(ws)
        self._all.add(conn)
        try:
            remaining = self._rate_limited_until - loop.time()
            if remaining > 0:
                # CONTRACT §6: error with retry_after, then close 4029.
                self.rate_limited_rejections += 1
                await refuse(ws, 4029, rate_limited_frame(remaining))
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
            await refuse(ws, 4001, error_frame(None, "UNAUTHORIZED", "no auth frame in time"))
            return False
        except ConnectionClosed:
            return False
        frame = loads(message)
        if frame is not None:
            self.requests.append(frame)
        api_key = frame.get("api_key") if frame and frame.get("type") == "auth" else None
        if not isinstance(api_key, str) or api_key not in self.api_keys:
            self.auth_failed += 1
            self._pulse()
            await refuse(ws, 4001, error_frame(None, "UNAUTHORIZED", "invalid or missing api_key"))
            return False
        with contextlib.suppress(ConnectionClosed):
            for early in self.before_auth_ok:  # (what a server may send before it)
                await ws.send(early)
            await ws.send(b'{"type":"auth_ok"}', text=True)
            self.auth_ok += 1
            return True
        return False

    async def _writer(self, conn: Conn) -> None:
        ws = conn.ws
        try:
            while True:
                item = await conn.out.get()
                if conn.out.qsize() < LOW:
                    conn.room.set()
                if item is None:
                    return
                if isinstance(item, bytes):
                    await ws.send(item, text=True)
                elif isinstance(item, Raw):
                    await ws.send(item.payload)
                else:
                    await ws.close(item.code, item.reason)
                    return
        except ConnectionClosed:
            return
        finally:
            conn.closed.set()
            conn.room.set()

    async def _pinger(self, conn: Conn, interval: float) -> None:
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

    def _on_frame(self, conn: Conn, message: str | bytes) -> None:
        frame = loads(message)
        if frame is None:
            conn.out.put_nowait(error_frame(None, "BAD_REQUEST", "frames are JSON objects"))
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
            request_id = frame_request_id(frame)
            conn.out.put_nowait(error_frame(request_id, "BAD_REQUEST", f"unknown type {kind!r}"))
        self._pulse()

    def _subscribe(self, conn: Conn, frame: dict[str, Any]) -> None:
        request_id = frame_request_id(frame)
        channel = frame.get("channel")
        params = frame.get("params", {})
        since = frame.get("since_seq")
        problem = check_subscribe(request_id, channel, params, since)
        if problem:
            conn.out.put_nowait(error_frame(request_id, "INVALID_PARAMS", problem))
            return
        assert isinstance(channel, str)  # check_subscribe proved it
        if channel in self.forbidden or subscription_key(channel, params) in self.forbidden:
            conn.out.put_nowait(error_frame(request_id, "FORBIDDEN", f"not allowed: {channel}"))
            return
        if channel in self.refuse_once:
            if (code := self.refuse_once.pop(channel)) is not None:
                conn.out.put_nowait(error_frame(request_id, code, "try again later"))
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

    def _unsubscribe(self, conn: Conn, frame: dict[str, Any]) -> None:
        request_id = frame_request_id(frame)
        sub_id = frame.get("subscription")
        key = conn.subs.pop(sub_id, None) if isinstance(sub_id, str) else None
        if key is None:
            conn.out.put_nowait(error_frame(request_id, "INVALID_PARAMS", "no such subscription"))
            return
        key.subscribers.pop(str(sub_id), None)
        if not key.subscribers:
            key.active.clear()
        conn.out.put_nowait(
            orjson.dumps({"type": "unsubscribed", "id": request_id, "subscription": sub_id})
        )


def bound_port(server: Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


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
