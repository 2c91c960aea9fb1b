"""
The public port's fast path (listener/fast_http.py), on real sockets: which requests it
answers itself, which it hands to aiohttp (and that the connection then stays there),
order under pipelining, bodies split across reads, the read timeout, idle keep-alive
connections, errors and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import pytest
from aiohttp import web

from listener import fast_http
from listener.fast_http import FastServer
from listener.web import PublicRoutes, Reply, error_reply, ok_reply
from tests.test_http_abuse import closed_by_server, drip, read_reply, request

PATH = "/hook"


@dataclass
class Route:
    """A fast route that answers with what it got; ``gate`` holds answers back."""

    path: str = PATH
    max_body: int = 4096
    read_timeout: float = 0.3
    fast: list[tuple[Mapping[str, str], bytes]] = field(default_factory=list)
    timeouts: int = 0
    gate: asyncio.Event | None = None
    fail: bool = False
    reply: Reply | None = None

    async def accept(self, headers: Mapping[str, str], body: bytes) -> Reply:
        self.fast.append((headers, body))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("boom")
        if self.reply is not None:
            return self.reply
        return ok_reply({"path": "fast", "id": headers.get("X-Id"), "size": len(body)})

    def timed_out(self) -> None:
        self.timeouts += 1


@dataclass
class Running:
    port: int
    route: Route
    slow: list[bytes]  # bodies aiohttp's path answered
    runner: web.ServerRunner


@contextlib.asynccontextmanager
async def serve(
    route: Route, head_timeout: float = 30.0, max_connections: int = 4096
) -> AsyncIterator[Running]:
    slow: list[bytes] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        slow.append(body)
        return web.json_response({"data": {"path": "aiohttp", "id": request.headers.get("X-Id")}})

    routes = PublicRoutes()
    routes.add_post(PATH, handler, fast=route)
    runner = web.ServerRunner(
        FastServer(routes, head_timeout=head_timeout, max_connections=max_connections),
        handle_signals=False,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr] # started
    try:
        yield Running(port, route, slow, runner)
    finally:
        await runner.cleanup()


def post(ident: str, body: bytes = b"{}", **headers: str) -> bytes:
    return request("POST", PATH, body, {"X-Id": ident, **headers})


async def answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, str, str]]:
    out = []
    for _ in range(count):
        reply = await read_reply(reader)
        data = reply.json()
        if reply.status == 200:
            out.append((reply.status, data["data"]["path"], data["data"]["id"]))
        else:
            out.append((reply.status, "", data["error"]["code"]))
    return out


async def test_plain_requests_take_the_fast_path_anything_else_aiohttps_for_good() -> None:
    """
    A plain POST is answered by the fast route with its headers (case-insensitive) and
    body; the first request that is not plain, and every later one on that connection,
    by aiohttp; a new connection starts on the fast path again.
    """
    async with serve(Route()) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("a", b'{"x": 1}'))
        assert await answers(reader, 1) == [(200, "fast", "a")]
        headers, body = svc.route.fast[0]
        assert body == b'{"x": 1}' and headers["X-Id"] == "a"
        writer.write(post("b", b"{}", **{"Content-Encoding": "identity"}))
        writer.write(post("c"))
        assert await answers(reader, 2) == [(200, "aiohttp", "b"), (200, "aiohttp", "c")]
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("d"))
        assert await answers(reader, 1) == [(200, "fast", "d")]
        writer.close()
        assert [h["x-id"] for h, _ in svc.route.fast] == ["a", "d"]
        assert svc.slow == [b"{}", b"{}"]


@pytest.mark.parametrize(
    "extra",
    [
        {"Expect": "100-continue"},
        {"Transfer-Encoding": "chunked"},
        {"Connection": "close"},
        {"Connection": "keep-alive", "connection": "close"},
        {"Content-Length": "5"},  # a second one
        {"Bad Name": "x"},
        {"X-Latin": "caf\xe9"},
        {"host": "other"},  # a second Host (RFC 9112 §3.2: a 400)
    ],
    ids=[
        "expect",
        "chunked",
        "close",
        "keep-alive-then-close",
        "two-lengths",
        "bad-name",
        "not-ascii",
        "two-hosts",
    ],
)
async def test_requests_the_fast_path_does_not_judge_go_to_aiohttp(extra: dict[str, str]) -> None:
    """Whatever asks for more than a plain body, or is not plain text, is aiohttp's."""
    async with serve(Route()) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(request("POST", PATH, b"{}", {"X-Id": "z", **extra}))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_reply(reader)  # (aiohttp's answer, whatever it is)
        writer.close()
        assert svc.route.fast == []


async def test_other_paths_methods_versions_and_oversized_bodies_go_to_aiohttp() -> None:
    async with serve(Route(max_body=10)) as svc:
        for raw in (
            request("POST", PATH + "?q=1", b"{}"),
            request("GET", PATH),
            request("POST", "/other", b"{}"),
            request("POST", PATH, b"x" * 11),
            post("v", b"{}").replace(b"HTTP/1.1", b"HTTP/1.0"),
            post("h", b"{}").replace(b"Host: 127.0.0.1\r\n", b""),  # no Host: aiohttp's 400
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(raw)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await read_reply(reader)
            writer.close()
        assert svc.route.fast == []


async def test_an_unreadable_request_is_a_json_400_logged_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    Each request aiohttp could not parse was logged at error level with a traceback and
    up to 100 of the client's bytes: a log line per bad request, anyone could send them.
    """
    async with serve(Route()) as svc:
        for raw in (
            b"POST /hook HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            request("POST", PATH, b"", {"Transfer-Encoding": "chunked"}) + b"ZZ\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            with caplog.at_level(logging.DEBUG):
                writer.write(raw)
                reply = await read_reply(reader)
            writer.close()
            assert reply.status == 400 and reply.json()["error"]["code"] == "BAD_REQUEST"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_aiohttps_path_takes_as_many_header_lines_as_the_fast_path() -> None:
    """aiohttp took 128 lines of 8 KiB each: a head that never ended held ~2 MiB."""
    async with serve(Route()) as svc:
        for count, status in ((fast_http.HEADERS_MAX, 200), (fast_http.HEADERS_MAX + 1, 400)):
            raw = post("n", **{"Content-Encoding": "identity"})
            head, body = raw.split(b"\r\n\r\n", 1)
            lines = [f"X-Line-{i}: v".encode() for i in range(count - head.count(b"\r\n"))]
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(b"\r\n".join([head, *lines]) + b"\r\n\r\n" + body)
            assert (await read_reply(reader)).status == status, count
            writer.close()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over() -> None:
    """Requests sent at once: each answer in turn, the fast ones held while one is slow."""
    route = Route(gate=asyncio.Event())
    async with serve(route) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("1"))
        await asyncio.sleep(0.05)  # (the rest comes while "1" is being answered)
        writer.write(post("2") + post("3", Expect="100-continue") + post("4"))
        await asyncio.sleep(0.1)
        assert [h["X-Id"] for h, _ in route.fast] == ["1"]  # one at a time
        route.gate.set()
        replies = []
        while len(replies) < 4:
            reply = await read_reply(reader)
            if reply.status != 100:
                replies.append(reply.json())
        writer.close()
        paths = [(r["data"]["path"], r["data"]["id"]) for r in replies]
        assert paths[:2] == [("fast", "1"), ("fast", "2")]
        assert ("aiohttp", "4") in paths


async def test_a_body_split_across_reads_is_put_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its head is parsed once, not again at each read of the body (a body dripped a
    byte at a time re-parsed up to 8 KiB of head each time: 250 ms loop stalls)."""
    parses = 0
    parse = fast_http._Connection._parse

    def counted(self: fast_http._Connection) -> object:
        nonlocal parses
        parses += 1
        return parse(self)

    monkeypatch.setattr(fast_http._Connection, "_parse", counted)
    async with serve(Route()) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        raw = post("s", b'{"long": "' + b"y" * 2000 + b'"}')
        head = raw.index(b"\r\n\r\n") + 4
        assert 20 < head < 200
        for part in (raw[:20], raw[20:200], raw[200:1000], raw[1000:1500], raw[1500:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        assert await answers(reader, 1) == [(200, "fast", "s")]
        writer.close()
        assert svc.route.fast[0][1] == raw[head:]
        assert parses == 2  # the part without the whole head, and the one that ended it


async def dripped_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """Send a byte now and then until the server closes; the seconds that took (< 2)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    dripping = asyncio.create_task(drip(writer, times=40, every=0.05))
    try:
        assert await closed_by_server(reader, timeout=2)
    finally:
        dripping.cancel()
        writer.close()
    return loop.time() - started


async def test_a_body_that_does_not_all_come_is_cut_at_the_read_timeout() -> None:
    """The timeout runs from the head: a byte now and then does not extend it."""
    async with serve(Route(read_timeout=0.3)) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(request("POST", PATH, headers={"Content-Length": "100"}, length=False))
        assert await dripped_until_closed(reader, writer) < 0.8
        assert svc.route.timeouts == 1 and svc.route.fast == []


async def test_a_head_that_does_not_all_come_is_cut_at_the_head_timeout() -> None:
    """
    A head dripped a byte at a time is cut at head_timeout from its first byte: after
    an answer and an idle while longer than that, the next head still has all of it.
    """
    async with serve(Route(), head_timeout=0.3) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("first"))
        assert await answers(reader, 1) == [(200, "fast", "first")]
        await asyncio.sleep(0.4)
        writer.write(b"POST /hook HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert 0.25 < await dripped_until_closed(reader, writer) < 0.8
        assert len(svc.route.fast) == 1 and svc.route.timeouts == 0  # not a body's timeout


async def test_a_new_connection_must_send_its_first_head_in_time_an_idle_one_stays() -> None:
    """
    A connection that sends nothing is closed at head_timeout after it opened; one that
    was answered stays idle past it (the keep-alive time) and is answered again.
    """
    async with serve(Route(), head_timeout=0.3) as svc:
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", svc.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("first"))
        assert await answers(reader, 1) == [(200, "fast", "first")]
        assert await closed_by_server(silent_reader, timeout=2)
        await asyncio.sleep(0.4)
        writer.write(post("again"))
        assert await answers(reader, 1) == [(200, "fast", "again")]
        silent_writer.close()
        writer.close()


@pytest.mark.parametrize("answered_first", [False, True], ids=["handed-over", "after-an-answer"])
async def test_on_aiohttps_path_a_head_that_does_not_all_come_is_cut(answered_first: bool) -> None:
    """
    A connection handed to aiohttp (a request the fast path does not take) is closed when
    a head has not all come head_timeout after the hand-over or the last answer.
    """
    async with serve(Route(), head_timeout=0.3) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        if answered_first:
            writer.write(post("b", b"{}", **{"Content-Encoding": "identity"}))
            assert await answers(reader, 1) == [(200, "aiohttp", "b")]
            writer.write(b"POST /hook HTTP/1.1\r\nX-Slow: ")
        else:
            writer.write(b"GET /other HTTP/1.1\r\nX-Slow: ")  # not a fast one: handed over
        assert await dripped_until_closed(reader, writer) < 0.8
        assert svc.route.fast == []


async def test_an_exception_is_a_json_500_and_the_connection_goes_on() -> None:
    async with serve(Route(fail=True)) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("e"))
        reply = await read_reply(reader)
        assert reply.status == 500 and reply.json()["error"]["code"] == "INTERNAL"
        svc.route.fail = False
        writer.write(post("f"))
        assert await answers(reader, 1) == [(200, "fast", "f")]
        writer.close()


async def test_idle_connections_close_after_the_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_http, "KEEPALIVE", 0.2)
    monkeypatch.setattr(fast_http, "SWEEP", 0.1)
    async with serve(Route()) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("k"))
        assert await answers(reader, 1) == [(200, "fast", "k")]
        assert await closed_by_server(reader, timeout=2)
        writer.close()


async def test_shutdown_answers_the_request_in_hand_and_closes_idle_connections() -> None:
    route = Route(gate=asyncio.Event())
    async with serve(route) as svc:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", svc.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("w"))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(svc.runner.cleanup())
        await asyncio.sleep(0.1)
        assert await closed_by_server(idle_reader, timeout=1)
        assert not stopping.done()
        route.gate.set()
        assert await answers(reader, 1) == [(200, "fast", "w")]
        await stopping
        idle_writer.close()
        writer.close()


async def test_an_error_reply_keeps_its_status_and_headers() -> None:
    """What aiohttp's path would send: the status, the JSON body, Retry-After, a Date."""
    route = Route(reply=error_reply(503, "UNAVAILABLE", "later", {"Retry-After": "7"}))
    async with serve(route) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("r"))
        reply = await read_reply(reader)
        writer.close()
    assert reply.status == 503 and reply.json()["error"] == {
        "code": "UNAVAILABLE",
        "message": "later",
    }
    assert reply.headers["retry-after"] == "7"
    assert reply.headers["content-type"] == "application/json" and "date" in reply.headers


async def test_the_date_follows_a_clock_stepped_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was formatted again only once a second had passed: stepped back, it froze for hours."""
    stepped = [0.0]
    clock = type("Clock", (), {"time": staticmethod(lambda: time.time() + stepped[0])})
    monkeypatch.setattr(fast_http, "time", clock)
    route = Route()
    async with serve(route) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        dates = []
        for step in (0.0, -7200.0):
            stepped[0] = step
            writer.write(post("d"))
            dates.append(parsedate_to_datetime((await read_reply(reader)).headers["date"]))
        writer.close()
    assert 7190 <= (dates[0] - dates[1]).total_seconds() <= 7210
