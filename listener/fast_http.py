"""
The public port's fast path: the plainest webhook requests answered without aiohttp's
per-request machinery, everything else handed to aiohttp unchanged.

aiohttp's low-level server spends ~50 µs of CPU a request around the route's own work
(its message, stream, request, task and response objects): with this path the
listener's CPU per webhook went from 195 to 132 µs (``python -m bench --only webhooks``).

:class:`FastServer` is an aiohttp :class:`~aiohttp.web.Server` whose connections start
on :class:`_Connection`: it answers a request itself only when all of this holds, and
the request is wholly in its buffer:

* the request line is ``POST <path> HTTP/1.1`` with ``<path>`` exactly a route with a
  fast handler (:class:`listener.web.FastRoute`): no query, no escapes;
* every header line is ``token ":" printable ASCII or tabs``, 64 of them at most, all
  within 8 KiB, exactly one of them ``Host``, and none is ``Transfer-Encoding``,
  ``Content-Encoding``, ``Expect``, ``Upgrade`` or a ``Connection`` other than
  ``keep-alive``;
* exactly one ``Content-Length``, decimal digits, at most ``max_body``.

The first request that is anything else, and every later one on its connection, goes
to aiohttp's own :class:`~aiohttp.web_protocol.RequestHandler`, fed the connection's
bytes from that request's first byte on: the 100-continue, chunked and compressed
bodies, limits, methods, paths and malformed requests keep aiohttp's handling and the
contract's JSON errors (:class:`listener.web.PublicRoutes`,
:class:`listener.web.JsonErrorsHandler`), with at most 64 header lines there too. A
fast request whose body has not all come after ``read_timeout`` closes the connection,
as aiohttp's path does.

Responses go out in request order (a pipelined request waits for the one before it),
idle keep-alive connections close after ``KEEPALIVE`` seconds, and on shutdown the
requests being answered get ``shutdown_timeout`` to finish (:meth:`FastServer.shutdown`).

At most ``max_connections`` are open at once (``http.max_connections``): one more closes
the one quiet the longest (nothing in or out for over a second: idle, or a head or a
body that does not come), else the one whose request began the longest ago, over a
second (a head dripped a byte at a time is never quiet), never one being answered, on
either path (:mod:`listener.http_room`); else the new one is refused;
and unfinished requests hold at most ``routes.held.budget`` bytes in all
(:class:`listener.web.Held`). Any client could otherwise open connections and keep
them, each with a head (and up to ``max_body`` of a body) sent, until the process ran
out of file descriptors or memory. Answers a client does not read stop the reading of
its requests.
"""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any, Literal, cast

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from listener.http_room import Room, shut
from listener.web import REASONS, FastRoute, JsonErrorsHandler, PublicRoutes, Reply, error_reply

__all__ = ["FastServer"]

log = structlog.get_logger("listener.web")

HEAD_MAX = 8192  # bytes of request line and headers, as aiohttp's line limit
HEADERS_MAX = 64
# Seconds an idle connection is kept: aiohttp's own default, longer than a reverse
# proxy's idle timeout, so that the proxy closes first and never reuses a closed one.
KEEPALIVE = 3630.0
SWEEP = 5.0  # how often idle connections are looked for
PAUSE_AT = 256 * 1024  # buffered bytes of pipelined requests before reading pauses

_REQUEST_LINE = re.compile(rb"POST (/[!$&'()*+,;=:@A-Za-z0-9._~/-]*) HTTP/1\.1\r\n")
# A header block of plain lines only; anything else is aiohttp's to judge. Each part
# matches one way only (no character class overlaps the next), so a line that fails
# costs one pass: "[ \t]*[\x20-\x7e]*" matched spaces two ways, and a header block
# that failed late took time doubling with each line (24 lines: 7 s of the loop).
_HEADERS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*\r\n")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\r]*)\r\n")  # (after _HEADERS)
_POST = b"POST /"
_REFUSED = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade"})


class FastServer(web.Server):
    """aiohttp's low-level server for ``routes``, with the fast path in front."""

    def __init__(
        self,
        routes: PublicRoutes,
        *,
        head_timeout: float,
        max_connections: int = 4096,
        on_refused: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        # aiohttp cannot tell an idle connection from one whose next head is dripping in:
        # on its path both close after head_timeout (the fast path keeps idle ones longer).
        kwargs.setdefault("keepalive_timeout", head_timeout)
        # As many header lines as the fast path takes: aiohttp's 128 of 8 KiB each held
        # ~2 MiB a connection whose head never ended, outside the budget of held bytes.
        kwargs.setdefault("max_headers", HEADERS_MAX)
        super().__init__(routes, **kwargs)
        self.routes = routes
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.held = routes.held  # (the budget of unfinished requests, shared with aiohttp's)
        self.refused = 0  # connections refused at the limit (none idle or waiting to close)
        self.on_refused = on_refused  # (the service's metric)
        self._warned_at = -60.0
        self.fast: set[_Connection] = set()
        self.room = Room()  # every open connection, on either path
        # Made by __call__ but not yet connection_made: counted too (a burst's connections
        # are all made before the first connection_made runs, on asyncio's loop).
        self._unmade: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._date = b""
        self._date_at = 0.0
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> Any:  # aiohttp's type is RequestHandler; this is a Protocol
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP, self._sweep)
        open_ = len(self.room) + len(self._unmade)
        if open_ >= self.max_connections and not self.room.make_room(self._loop.time()):
            return _Refused(self)
        connection = _Connection(self)
        self._unmade.add(connection)
        return connection

    def made(self, connection: _Connection, transport: asyncio.BaseTransport) -> None:
        """``connection`` is open: counted in :attr:`room` from now on."""
        self._unmade.discard(connection)
        self.fast.add(connection)
        self.room.join(transport, connection, connection.heard)

    def at_limit(self) -> None:
        """A connection was refused: count it, and say so at most once a minute."""
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused()
        now = self._loop.time()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            log.warning(
                "public_connections_at_limit",
                max_connections=self.max_connections,
                refused=self.refused,
                note="every connection is busy: raise http.max_connections (and the file limit)",
            )

    def aiohttp_handler(self) -> JsonErrorsHandler:
        """A connection handler of aiohttp's own (what the fast path hands over to)."""
        handler = JsonErrorsHandler(self, loop=self._loop, **self._kwargs)
        handler.room, handler.held = self.room, self.held
        return handler

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = time.time()
        if not 0.0 <= now - self._date_at < 1.0:  # (also after the clock stepped back)
            self._date_at = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    def _sweep(self) -> None:
        now = self._loop.time()
        for conn in list(self.fast):
            conn.expire_idle(now)
        self._sweeper = self._loop.call_later(SWEEP, self._sweep)

    def pre_shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.fast):
            conn.close_if_idle()  # (gently: answers written are sent first)
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's signature
        answering = [c.answering for c in self.fast if c.answering is not None]
        if answering:
            await asyncio.wait(answering, timeout=timeout)
        for conn in list(self.fast):
            conn.close(gently=True)
        await super().shutdown(timeout)


class _Connection(asyncio.Protocol):
    """One connection while its requests take the fast path (see the module docstring)."""

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._paused = False
        self._writing_held = False  # the client does not read its answers
        self.heard = 0.0  # when a byte last came or an answer went
        self._timer: asyncio.TimerHandle | None = None
        self._body = False  # whether the timer is a body's (else a head's)
        #: The head of the request whose body is still coming (parsed once).
        self._head: tuple[FastRoute, CIMultiDictProxy[str], int, int] | None = None
        #: The request being answered (responses go out in order: one at a time).
        self.answering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's (uvloop's transports do not subclass asyncio's).
        self._transport = cast(asyncio.Transport, transport)
        self.heard = self._loop.time()
        self._server.made(self, transport)
        self._time_head()  # the first request's head: from the connection's opening on

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.fast.discard(self)
        if self._transport is not None:
            self._server.room.leave(self._transport)
        self._server.held.set(self._transport, 0)
        self._transport = None
        self._cancel_timer()

    def _count(self) -> None:
        self._server.held.set(self._transport, len(self._buffer))

    def pause_writing(self) -> None:  # (asyncio: the answers are not read)
        self._writing_held = True
        self._hold_reading()

    def resume_writing(self) -> None:
        self._writing_held = False
        if self.answering is None:
            self._go_on()

    def data_received(self, data: bytes) -> None:
        self.heard = now = self._loop.time()
        if self._transport is not None:
            room = self._server.room
            room.heard(self._transport, now)
            if not self._buffer and self.answering is None:
                room.begun(self._transport, now)  # (a request begins)
        self._buffer += data
        self._count()  # (over the port's budget, the biggest holder is closed: maybe this)
        if self.answering is None and not self._writing_held:
            self._next()
        elif len(self._buffer) > PAUSE_AT:
            self._hold_reading()

    def _hold_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _go_on(self) -> None:
        """After an answer: read again if little is buffered, and answer the next."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._paused and len(self._buffer) <= PAUSE_AT:
            self._paused = False
            transport.resume_reading()
        self._next()

    def expire_idle(self, now: float) -> None:
        """Close the connection if nothing came for ``KEEPALIVE`` seconds (nor went out)."""
        if self.answering is None and now - self.heard > KEEPALIVE:
            self.close()

    def close_if_idle(self) -> None:
        """Close the connection unless a request is being answered (shutdown)."""
        if self.answering is None:
            self.close(gently=True)

    def close(self, *, gently: bool = False) -> None:
        """Close it; at once if answers not read are still buffered, unless ``gently``."""
        if self._transport is not None:
            if gently:
                self._transport.close()
            else:
                shut(self._transport)

    def can_close(self) -> bool:
        """Whether it may be closed for room: not while its request is being answered."""
        return self.answering is None

    def close_for_room(self) -> None:
        self._server.fast.discard(self)

    def _next(self) -> None:
        """Answer the next buffered request, wait for the rest of it, or hand over."""
        buffer = self._buffer
        if not buffer:
            return
        # While a body comes, its head is not parsed again at each read (a body dripped
        # a byte at a time would cost a parse of up to 8 KiB each).
        parsed = self._head or self._parse()
        if parsed is None:  # not all of the head has come yet
            self._time_head()
            return
        if parsed is False:
            self._cancel_timer()
            self._hand_over()
            return
        route, headers, start, length = parsed
        end = start + length
        if len(buffer) < end:  # the body is still coming: read_timeout from its head on
            self._head = parsed
            if not self._body:
                self._cancel_timer()
                self._timer = self._loop.call_later(route.read_timeout, self._time_out, route)
                self._body = True
            return
        self._cancel_timer()
        self._head = None
        body = bytes(buffer[start:end])
        del buffer[:end]
        self._count()
        self.answering = self._loop.create_task(self._answer(route, headers, body))
        if self._transport is not None:
            self._server.room.busy(self._transport)

    def _parse(
        self,
    ) -> tuple[FastRoute, CIMultiDictProxy[str], int, int] | Literal[False] | None:
        """The buffered request's route, headers, body offset and length; ``False``: not
        a fast one; ``None``: its head is not all here yet."""
        buffer = self._buffer
        line = _REQUEST_LINE.match(buffer)
        if line is None:  # not one, or not all here yet: wait only while it could be one
            whole = buffer.find(b"\n", 0, HEAD_MAX) >= 0 or len(buffer) >= HEAD_MAX
            return False if whole or not _POST.startswith(buffer[:6]) else None
        head_end = buffer.find(b"\r\n\r\n", line.end() - 2, HEAD_MAX)
        if head_end < 0:
            return None if len(buffer) < HEAD_MAX else False
        route = self._server.routes.fast_route(line.group(1).decode("ascii"))
        if route is None or _HEADERS.fullmatch(buffer, line.end(), head_end + 4) is None:
            return False
        fields = _HEADER.findall(buffer, line.end(), head_end + 2)
        if len(fields) > HEADERS_MAX:
            return False
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("ascii"), value.strip(b" \t").decode("ascii")) for name, value in fields
        )
        if len(headers.getall("Host", ())) != 1:
            return False  # none, or several: aiohttp's 400 (RFC 9112 §3.2)
        lengths = headers.getall("Content-Length", ())
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 12:
            return False
        length = int(lengths[0])
        if length > route.max_body or not _plain(headers):
            return False
        return route, CIMultiDictProxy(headers), head_end + 4, length

    async def _answer(self, route: FastRoute, headers: Mapping[str, str], body: bytes) -> None:
        try:
            reply = await route.accept(headers, body)
        except Exception:  # the last line of defence, as aiohttp's path (listener.web)
            log.exception("request_failed", path=route.path, method="POST")
            reply = error_reply(500, "INTERNAL", "an unexpected error; it was logged")
        transport = self._transport
        if transport is not None:
            transport.write(self._encode(reply))
        self.answering = None
        self.heard = now = self._loop.time()
        if transport is not None:
            self._server.room.answered(transport, now)
        if not self._writing_held:
            self._go_on()

    def _encode(self, reply: Reply) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items()) if reply.headers else ""
        head = (
            f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(reply.body)}\r\n{extra}"
        ).encode()
        return b"%sDate: %s\r\n\r\n%s" % (head, self._server.date(), reply.body)

    def _time_head(self) -> None:
        """Time the head being waited for: ``head_timeout`` from now, unless already timed."""
        if self._timer is None:
            self._timer = self._loop.call_later(self._server.head_timeout, self._time_out, None)

    def _time_out(self, route: FastRoute | None) -> None:
        self._timer = None
        if route is not None:
            route.timed_out()
        else:  # debug: at info, a slowloris's connections would flood the log
            log.debug("request_head_timeout", after=self._server.head_timeout)
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body = False

    def _hand_over(self) -> None:
        """The rest of this connection is aiohttp's, from the buffered request on."""
        transport = self._transport
        if transport is None:
            return
        self._server.fast.discard(self)
        self._transport = None
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        self._server.room.rebind(transport, handler)  # (its times and place kept)
        if self._paused:
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        self._server.held.set(transport, 0)  # (aiohttp's path counts its body itself)
        handler.data_received(data)


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections`` with none to close for it: closed at once."""

    def __init__(self, server: FastServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server.at_limit()
        transport.close()


def _plain(headers: CIMultiDict[str]) -> bool:
    """No header that asks for aiohttp's handling (a body encoding, an expectation...)."""
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _REFUSED:
            return False
        if lowered == "connection" and value.lower() != "keep-alive":
            return False
    return True
