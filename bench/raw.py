"""
The raw ceiling R: what the broker itself accepts, with publisher confirms.

R is measured by a minimal client that builds its frames once and keeps 4,096
publishes in flight over one socket: plain asyncio streams to the broker, ``pamqp``
for the handshake and the control frames, no aio-pika or aiormq. One persistent
~1 KiB message, shaped as the daemon's (``mandatory``, its six properties;
:data:`SHAPES`), is marshalled once (method frame, content header, body frame) and
that same bytes object is written again and again, 256 publishes per ``write``. A
reader task parses the confirms (``Basic.Ack``/``Basic.Nack``, ``multiple``
honoured) and the writer waits whenever the window is full. Almost no client work is
left per message, so the rate is the broker's own publishing ceiling on this machine:
the figure the listener's publisher drain is compared to.

The rate counts from the first publish until the last confirm, of ``count`` messages
or of whatever was published within ``seconds``. :func:`ceiling_r` runs the client in
a child process (``python -m bench.raw``, on uvloop when installed), which prints one
JSON line: ``confirmed``, ``nacked``, ``seconds`` and its own ``cpu_seconds``.

The caller declares the exchange and a durable queue bound to it. Standalone runs can
let the child do it: ``python -m bench.raw --exchange X --declare --cleanup`` declares
a durable topic exchange ``X`` and a durable queue ``X.tap`` bound ``#`` on the same
connection, and deletes both at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.constants import FRAME_END, FRAME_HEADER_SIZE
from pamqp.header import ContentHeader, ProtocolHeader

from listener.envelope import APP_ID, CONTENT_TYPE

__all__ = ["RawResult", "ceiling_r"]

_T = TypeVar("_T")
_F = TypeVar("_F")

CHANNEL = 1
WINDOW = 4096
CHUNK = 256  # publishes per writer.write call
ROUTING_KEY = "bench.raw"
# The message R publishes, again and again. "daemon": shaped as the daemon's (CONTRACT
# §4): mandatory, with its six properties (content type, persistent, a message id as long
# as a UUID, type, timestamp, app id), so that the broker does per message what it does
# for the daemon, as ceiling B's messages are. "bare": the first R's message, not
# mandatory, with three properties: of the daemon's the broker confirmed 20-31% fewer a
# second on the 2-core machine (bench/README.md, Drain).
SHAPES = ("daemon", "bare")
SETTLE_TIMEOUT = 60.0  # seconds to wait for the outstanding confirms after writing stops


@dataclass
class RawResult:
    """What the raw client measured."""

    confirmed: int
    nacked: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        """Confirmed messages per second, first publish to last confirm."""
        return self.confirmed / self.seconds if self.seconds > 0 else 0.0


def ceiling_r(
    exchange: str,
    *,
    count: int = 100_000,
    seconds: float = 10.0,
    window: int = WINDOW,
    size: int = 1024,
    url_host: str = "127.0.0.1",
    port: int = 5672,
    shape: str = "daemon",
) -> RawResult:
    """
    Publish to ``exchange`` (declared by the caller) from a child process; the result.

    Stops after ``count`` confirmed publishes or ``seconds`` of writing, whichever
    comes first, then waits for the outstanding confirms. ``shape``: the message, as the
    daemon publishes it or bare (:data:`SHAPES`).
    """
    from bench.common import python_module  # noqa: PLC0415 - keeps the child lean

    argv = python_module(
        "bench.raw",
        "--exchange",
        exchange,
        "--count",
        str(count),
        "--seconds",
        str(seconds),
        "--window",
        str(window),
        "--size",
        str(size),
        "--host",
        url_host,
        "--port",
        str(port),
        "--shape",
        shape,
    )
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout
    data = json.loads(out.decode().strip().splitlines()[-1])
    return RawResult(
        confirmed=int(data["confirmed"]),
        nacked=int(data["nacked"]),
        seconds=float(data["seconds"]),
        cpu_seconds=float(data["cpu_seconds"]),
    )


# -- the client --------------------------------------------------------------------------


class BrokerClosed(RuntimeError):
    """The broker closed the channel or the connection."""


class _Connection:
    """One socket, channel 1 in confirm mode; frames in and out through ``pamqp``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.frame_max = 0
        self._pending: list[tuple[int, frame.FrameTypes]] = []

    def send(self, value: frame.FrameTypes, channel: int = CHANNEL) -> None:
        self.writer.write(frame.marshal(value, channel))

    async def read_frames(self) -> list[tuple[int, frame.FrameTypes]]:
        """Every complete frame buffered, reading from the socket until there is one."""
        frames: list[tuple[int, frame.FrameTypes]] = []
        while not frames:
            data = await self.reader.read(1 << 16)
            if not data:
                raise BrokerClosed("the broker closed the socket")
            self.buffer += data
            frames = self._parse()
        return frames

    def _parse(self) -> list[tuple[int, frame.FrameTypes]]:
        buffer, offset, frames = self.buffer, 0, []
        while len(buffer) - offset >= FRAME_HEADER_SIZE + 1:
            size = int.from_bytes(buffer[offset + 3 : offset + 7], "big")
            end = offset + FRAME_HEADER_SIZE + size + 1
            if end > len(buffer):
                break  # a partial frame: wait for the rest
            if buffer[end - 1] != FRAME_END:
                raise BrokerClosed(f"malformed frame at byte {offset}")
            consumed, channel, value = frame.unmarshal(bytes(buffer[offset:end]))
            offset += consumed
            frames.append((channel, value))
        del buffer[:offset]
        return frames

    async def expect(self, kind: type[_F]) -> _F:
        """The next frame, which must be a ``kind`` (handshake and control only)."""
        channel, value = await self._next()
        if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
            raise BrokerClosed(f"{value.name}: {value.reply_code} {value.reply_text}")
        if not isinstance(value, kind):
            raise BrokerClosed(f"expected {kind.__name__}, got {value.name} on {channel}")
        return value

    async def _next(self) -> tuple[int, frame.FrameTypes]:
        if not self._pending:
            self._pending.extend(await self.read_frames())
        return self._pending.pop(0)

    async def call(self, value: frame.FrameTypes, kind: type[_F], channel: int = CHANNEL) -> _F:
        self.send(value, channel)
        await self.writer.drain()
        return await self.expect(kind)

    async def open(self, user: str, password: str) -> None:
        """Handshake, channel 1 open, confirm mode."""
        self.writer.write(frame.marshal(ProtocolHeader(), 0))
        await self.expect(commands.Connection.Start)
        properties: dict[str, Any] = {
            "product": "bench.raw",
            "capabilities": {"publisher_confirms": True, "basic.nack": True},
        }
        response = f"\0{user}\0{password}"
        start_ok = commands.Connection.StartOk(properties, "PLAIN", response, "en_US")
        self.send(start_ok, 0)
        tune = await self.expect(commands.Connection.Tune)
        self.frame_max = tune.frame_max
        self.send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        await self.call(commands.Connection.Open("/"), commands.Connection.OpenOk, 0)
        await self.call(commands.Channel.Open(), commands.Channel.OpenOk)
        await self.call(commands.Confirm.Select(), commands.Confirm.SelectOk)

    async def close(self) -> None:
        """Channel.Close, Connection.Close, each awaiting its CloseOk; the socket."""
        try:
            await self.call(commands.Channel.Close(200, "bye", 0, 0), commands.Channel.CloseOk)
            await self.call(
                commands.Connection.Close(200, "bye", 0, 0), commands.Connection.CloseOk, 0
            )
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    def publish_frames(self, exchange: str, size: int, shape: str = "daemon") -> bytes:
        """One publish (:data:`SHAPES`): method frame, content header, body frame(s)."""
        body = (b'{"data":"' + b"x" * size)[: max(size - 2, 0)] + b'"}'
        daemon = shape == "daemon"
        if daemon:
            properties = commands.Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=2,
                message_id=str(uuid.UUID(int=0)),  # an id as long as the daemon's
                message_type=ROUTING_KEY,
                timestamp=datetime.now(UTC).replace(microsecond=0),
                app_id=APP_ID,
            )
        else:
            properties = commands.Basic.Properties(
                content_type="application/json", delivery_mode=2, message_id="bench-raw"
            )
        parts = [
            frame.marshal(commands.Basic.Publish(0, exchange, ROUTING_KEY, daemon), CHANNEL),
            frame.marshal(ContentHeader(0, len(body), properties), CHANNEL),
        ]
        step = self.frame_max - FRAME_HEADER_SIZE - 1 if self.frame_max else len(body) or 1
        parts.extend(
            frame.marshal(ContentBody(body[at : at + step]), CHANNEL)
            for at in range(0, len(body), step)
        )
        return b"".join(parts)


class _Confirms:
    """Settled delivery tags, ``multiple`` honoured, acks and nacks counted apart."""

    def __init__(self) -> None:
        self.low = 0  # every tag up to here is settled
        self.singles: set[int] = set()  # tags above ``low`` settled one by one
        self.acked = 0
        self.nacked = 0

    @property
    def settled(self) -> int:
        return self.acked + self.nacked

    def settle(self, tag: int, multiple: bool) -> int:
        """Settle ``tag`` (and every tag below it when ``multiple``); how many were new."""
        if multiple:
            if tag <= self.low:
                return 0
            below = {t for t in self.singles if t <= tag}
            self.singles -= below
            new = tag - self.low - len(below)
            self.low = tag
        else:
            if tag <= self.low or tag in self.singles:
                return 0
            self.singles.add(tag)
            new = 1
        while self.low + 1 in self.singles:
            self.low += 1
            self.singles.discard(self.low)
        return new


async def _read_confirms(
    conn: _Connection, confirms: _Confirms, room: asyncio.Event, done: Callable[[], bool]
) -> None:
    """Count confirms until ``done()``; wakes the writer after every batch of frames."""
    try:
        while not done():
            for _channel, value in await conn.read_frames():
                if isinstance(value, commands.Basic.Ack):
                    confirms.acked += confirms.settle(value.delivery_tag, value.multiple)
                elif isinstance(value, commands.Basic.Nack):
                    confirms.nacked += confirms.settle(value.delivery_tag, value.multiple)
                elif isinstance(value, commands.Channel.Close | commands.Connection.Close):
                    raise BrokerClosed(f"{value.name}: {value.reply_code} {value.reply_text}")
            room.set()
    finally:
        room.set()


async def _publish(
    conn: _Connection,
    exchange: str,
    count: int,
    seconds: float,
    window: int,
    size: int,
    shape: str = "daemon",
) -> dict[str, Any]:
    one = conn.publish_frames(exchange, size, shape)
    chunk = one * CHUNK
    confirms = _Confirms()
    room = asyncio.Event()
    published = 0
    writing = True

    def done() -> bool:
        return not writing and confirms.settled >= published

    cpu_started = time.process_time()
    started = time.monotonic()
    deadline = started + seconds
    reader = asyncio.create_task(_read_confirms(conn, confirms, room, done))
    try:
        while published < count and time.monotonic() < deadline:
            free = window - (published - confirms.settled)
            if free <= 0:
                room.clear()
                await room.wait()
                if reader.done():
                    break
                continue
            k = min(free, CHUNK, count - published)
            conn.writer.write(chunk if k == CHUNK else one * k)
            published += k
            await conn.writer.drain()
        writing = False
        settle_by = time.monotonic() + SETTLE_TIMEOUT
        while not done() and not reader.done():
            room.clear()
            await asyncio.wait_for(room.wait(), max(settle_by - time.monotonic(), 0.001))
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    finally:
        writing = False
        if not reader.done():
            reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        error = reader.exception()
        raise BrokerClosed(f"{error} (after {published:,} publishes)") from error
    return {
        "confirmed": confirms.acked,
        "nacked": confirms.nacked,
        "seconds": elapsed,
        "cpu_seconds": cpu,
    }


async def _declare(conn: _Connection, exchange: str) -> None:
    queue = f"{exchange}.tap"
    declare = commands.Exchange.Declare(exchange=exchange, exchange_type="topic", durable=True)
    await conn.call(declare, commands.Exchange.DeclareOk)
    await conn.call(commands.Queue.Declare(queue=queue, durable=True), commands.Queue.DeclareOk)
    bind = commands.Queue.Bind(queue=queue, exchange=exchange, routing_key="#")
    await conn.call(bind, commands.Queue.BindOk)


async def _cleanup(conn: _Connection, exchange: str) -> int:
    """Delete the tap queue and the exchange; how many messages the queue held."""
    deleted = await conn.call(
        commands.Queue.Delete(queue=f"{exchange}.tap"), commands.Queue.DeleteOk
    )
    await conn.call(commands.Exchange.Delete(exchange=exchange), commands.Exchange.DeleteOk)
    return int(deleted.message_count or 0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, optionally declare, publish, optionally clean up, close."""
    reader, writer = await asyncio.open_connection(args.host, args.port)
    conn = _Connection(reader, writer)
    try:
        await conn.open("guest", "guest")
        if args.declare:
            await _declare(conn, args.exchange)
        result = await _publish(
            conn, args.exchange, args.count, args.seconds, args.window, args.size, args.shape
        )
        if args.cleanup:
            queued = await _cleanup(conn, args.exchange)
            _say(f"queue {args.exchange}.tap held {queued:,} messages when deleted")
    except BaseException:
        writer.close()  # the broker drops what the connection left behind
        raise
    await conn.close()
    return result


def _run_loop(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``main()`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main() -> None:
    """``python -m bench.raw --exchange X [...]``: one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.raw")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--shape", choices=SHAPES, default="daemon", help="the message (daemon)")
    parser.add_argument("--declare", action="store_true", help="declare EXCHANGE and EXCHANGE.tap")
    parser.add_argument("--cleanup", action="store_true", help="delete both at the end")
    args = parser.parse_args()
    result = _run_loop(lambda: run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    rate = result["confirmed"] / result["seconds"] if result["seconds"] > 0 else 0.0
    _say(
        f"ceiling R: {rate:,.0f} msg/s ({result['confirmed']:,} confirmed, "
        f"{result['nacked']:,} nacked, {result['seconds']:.2f}s, "
        f"{result['cpu_seconds']:.2f} CPU s)"
    )


if __name__ == "__main__":
    main()
