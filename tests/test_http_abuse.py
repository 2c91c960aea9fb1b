"""
Abuse of the HTTP ports (issue 5, "bad input"): oversized, chunked, compressed and
slow-dripped bodies, idle connections, wrong methods and content types, random bytes
and headers (hypothesis), and a probe of every admin ``/v1`` route without a key,
with a wrong key and with a key of the wrong scope. None of it may get a 5xx.

Decided here: the webhook receiver does not check ``Content-Type``. The signature covers
the raw bytes, which are parsed as JSON whatever the header says, so a forged body fails
the signature first and a provider that labels its JSON ``text/plain`` loses nothing.

No broker is needed: the broker URL points at a closed port, the journal holds events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import socket
import string
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.admin.auth import SCOPE_KEY
from listener.config import Config
from listener.service import Service
from listener.sources.signatures import sign
from tests.conftest import UNIT, make_config, running
from tests.process import ListenerProcess
from tests.test_webhooks import gst_source
from tests.webhook_sender import WHSEC, gst_event

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"
PATH = "/webhooks/gst"
MAX_BODY = 4096
KEYS = {
    "read": "read-key-0123456789abcdef",
    "write": "write-key-0123456789abcdef",
    "read+write": "read-write-key-0123456789abcdef",
    "admin": "admin-key-0123456789abcdef",
}
# For each scope a route may need: a key that has it, and one that lacks it.
HAS = {"read": "read", "write": "write", "admin": "admin"}
LACKS = {"read": "write", "write": "read", "admin": "read+write"}


def abuse_config(tmp_path: Path, **http: Any) -> Config:
    return make_config(
        tmp_path,
        broker_url=NO_BROKER,
        sources=[gst_source()],
        http={"max_body": MAX_BODY, **http},
        shutdown_timeout="100ms",  # no broker: nothing would drain
        admin={
            "api_keys": [
                {"key": KEYS["read"], "scopes": ["read"]},
                {"key": KEYS["write"], "scopes": ["write"]},
                {"key": KEYS["read+write"], "scopes": ["read", "write"]},
                {"key": KEYS["admin"], "scopes": ["admin"]},
            ]
        },
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with running(abuse_config(tmp_path)) as svc:
        yield svc


def signed(body: bytes, **overrides: str) -> dict[str, str]:
    headers = sign(
        "standard-webhooks",
        WHSEC,
        body,
        msg_id=f"msg_{uuid.uuid4().hex}",
        timestamp=int(time.time()),
    )
    return {**headers, **overrides}


def request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: bool = True,
) -> bytes:
    """A raw HTTP/1.1 request; ``length=False`` leaves out Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_head(head: bytes) -> Reply:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
    assert match, f"not an HTTP response: {head[:100]!r}"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(match[1]), headers)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> Reply:
    async with asyncio.timeout(timeout * UNIT):
        reply = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        length = int(reply.headers.get("content-length", "0"))
        reply.body = await reader.readexactly(length)
    return reply


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` (reading what comes)."""
    try:
        async with asyncio.timeout(timeout * UNIT):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def drip(writer: asyncio.StreamWriter, *, times: int, every: float) -> None:
    """Send one byte every ``every`` seconds, ``times`` times (a slow client)."""
    with contextlib.suppress(ConnectionError):
        for _ in range(times):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(every)


async def send(port: int, data: bytes, timeout: float = 5.0) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_reply(reader, timeout)
    finally:
        writer.close()


# -- bodies --------------------------------------------------------------------------------


async def test_oversized_content_length_is_refused_before_the_body(service: Service) -> None:
    """A Content-Length over max_body gets 413 at once, before any of the body is sent."""
    assert service.public_port is not None
    started = time.monotonic()
    data = request(
        "POST", PATH, headers={**signed(b""), "Content-Length": "104857600"}, length=False
    )
    reply = await send(service.public_port, data, timeout=2)
    assert reply.status == 413 and reply.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert time.monotonic() - started < 1 * UNIT


@pytest.mark.parametrize("chunk", [512, 4096, 65536])
async def test_chunked_body_over_the_limit_is_413(service: Service, chunk: int) -> None:
    """A chunked body (no Content-Length) over max_body gets 413 while it is still arriving."""
    assert service.public_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    try:
        writer.write(request("POST", PATH, headers={"Transfer-Encoding": "chunked"}, length=False))
        with contextlib.suppress(ConnectionError):
            for _ in range(2 * MAX_BODY // chunk + 2):
                writer.write(b"%x\r\n%s\r\n" % (chunk, b"x" * chunk))
                await writer.drain()
        reply = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 413
    assert service.journal is not None and service.journal.pending_count == 0


async def test_compressed_body_counts_its_inflated_size(service: Service) -> None:
    """A gzip bomb (under max_body compressed, 3 MB inflated) gets 413 as it inflates."""
    assert service.public_port is not None
    bomb = gzip.compress(b"\0" * 3_000_000)
    assert len(bomb) < MAX_BODY
    headers = {**signed(bomb), "Content-Encoding": "gzip"}
    reply = await send(service.public_port, request("POST", PATH, bomb, headers))
    assert reply.status == 413


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_undecodable_body_is_400_not_500(service: Service, encoding: str) -> None:
    """A body that is not what its Content-Encoding says gets 400, not a 500."""
    assert service.public_port is not None
    body = orjson.dumps(gst_event())
    reply = await send(
        service.public_port,
        request("POST", PATH, body, {**signed(body), "Content-Encoding": encoding}),
    )
    assert reply.status == 400 and reply.json()["error"]["code"] == "BAD_REQUEST"


async def test_content_length_shorter_than_the_body(service: Service) -> None:
    """Bytes past Content-Length are read as the next request: 4xx answers, never a 5xx."""
    assert service.public_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    statuses = []
    try:
        writer.write(
            request("POST", PATH, headers={"Content-Length": "10"}, length=False) + b"z" * 5000
        )
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                statuses.append((await read_reply(reader)).status)
    finally:
        writer.close()
    assert statuses and all(400 <= s < 500 for s in statuses), statuses


async def cut_while_answering(svc: Service, start: bytes) -> None:
    """
    Open a connection, send ``start``, then drip a byte every 0.1 s: it is cut within
    http.read_timeout (500 ms here) while a signed webhook on another one is answered.
    """
    assert svc.public_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.public_port)
    writer.write(start)
    started = time.monotonic()
    dripping = asyncio.create_task(drip(writer, times=100, every=0.1))
    try:
        body = orjson.dumps(gst_event())
        reply = await send(svc.public_port, request("POST", PATH, body, signed(body)))
        assert reply.status == 200  # not blocked by the dripping connection
        assert await closed_by_server(reader, timeout=3)
        assert time.monotonic() - started < 0.5 + 1.5 * UNIT
    finally:
        dripping.cancel()
        writer.close()


async def test_slow_drip_body_is_cut_at_the_read_timeout(tmp_path: Path) -> None:
    """A body dripped a byte at a time is cut at http.read_timeout; the service answers meanwhile."""
    async with running(abuse_config(tmp_path, read_timeout="500ms")) as svc:
        await cut_while_answering(
            svc, request("POST", PATH, headers={"Content-Length": "1000"}, length=False)
        )
        text = svc.metrics.render().decode()
        assert 'listener_webhook_rejected_total{reason="read_timeout",source="gst"} 1.0' in text


@pytest.mark.parametrize(
    "start", [b"POST /webhooks/gst HTTP/1.1\r\nX-Slow: ", b"GET / HTTP/1.1\r\nX: "]
)
async def test_slow_drip_head_is_cut_at_the_read_timeout(tmp_path: Path, start: bytes) -> None:
    """
    A request head dripped a byte at a time (a slowloris) is cut at http.read_timeout, on
    the fast path (a webhook POST) and on aiohttp's (anything else); the service answers.
    """
    async with running(abuse_config(tmp_path, read_timeout="500ms")) as svc:
        await cut_while_answering(svc, start)


async def test_hundreds_of_idle_connections(service: Service) -> None:
    """With 300 idle connections open (silent, half a request, kept alive) the service still answers."""
    assert service.public_port is not None and service.admin_port is not None
    port = service.public_port
    idle: list[asyncio.StreamWriter] = []
    try:
        for i in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 3 == 1:
                writer.write(b"POST /webhooks/gst HTTP/1.1\r\nHost: x\r\nContent-Le")
            elif i % 3 == 2:
                writer.write(request("GET", "/nope"))
                assert (await read_reply(reader)).status == 404
            idle.append(writer)
        started = time.monotonic()
        body = orjson.dumps(gst_event())
        reply = await send(port, request("POST", PATH, body, signed(body)))
        assert reply.status == 200 and reply.json()["success"] is True
        health = await send(service.admin_port, request("GET", "/healthz"))
        assert health.status == 200
        assert time.monotonic() - started < 2 * UNIT
    finally:
        for writer in idle:
            writer.close()


# -- methods and content types ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_wrong_method_is_405(service: Service, method: str) -> None:
    """Any method but POST on a webhook path is 405 with Allow: POST (JSON error body)."""
    assert service.public_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    try:
        writer.write(request(method, PATH, b"{}"))
        async with asyncio.timeout(5 * UNIT):
            reply = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
            if method != "HEAD":
                reply.body = await reader.readexactly(int(reply.headers["content-length"]))
    finally:
        writer.close()
    assert reply.status == 405
    assert "POST" in reply.headers.get("allow", "")
    if method != "HEAD":
        assert reply.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_expect_100_continue_then_the_body_on_the_public_port(service: Service) -> None:
    """``Expect: 100-continue`` gets the interim 100 before the body is sent, then the 200."""
    assert service.public_port is not None
    event = gst_event()
    body = orjson.dumps(event)
    head = request("POST", PATH, body, {**signed(body), "Expect": "100-continue"})[: -len(body)]
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    try:
        writer.write(head)
        async with asyncio.timeout(5 * UNIT):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        writer.write(body)
        reply = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 200 and reply.json()["data"]["id"] == event["id"]


@pytest.mark.parametrize(("path", "status"), [(PATH, 417), ("/elsewhere", 404)])
async def test_other_expectations_are_417_with_the_json_body(
    service: Service, path: str, status: int
) -> None:
    """Any expectation but 100-continue is 417 with the contract's error body, nothing
    stored (on a path that is not a route, the 404 comes first)."""
    assert service.public_port is not None and service.journal is not None
    body = orjson.dumps(gst_event())
    reply = await send(
        service.public_port, request("POST", path, body, {**signed(body), "Expect": "teapot"})
    )
    assert reply.status == status and reply.json()["success"] is False
    assert service.journal.state()["pending"] == 0


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [("/elsewhere", 10, 404), (PATH, 10**9, 413)],
    ids=["unknown-path", "too-large"],
)
async def test_no_100_continue_for_a_body_that_will_be_refused(
    service: Service, path: str, length: int, status: int
) -> None:
    """
    A request that will be refused gets its final answer without an interim 100: the
    client is not invited to upload a body that is not read. It used to get the 100
    first, then the 404 or 413.
    """
    assert service.public_port is not None
    head = request(
        "POST",
        path,
        headers={"Expect": "100-continue", "Content-Length": str(length)},
        length=False,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    try:
        writer.write(head)
        async with asyncio.timeout(5 * UNIT):
            first = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert first.startswith(f"HTTP/1.1 {status} ".encode()), first


async def test_unexpected_exception_on_the_public_port_is_a_json_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook handler that raises gives the contract's JSON 500, without its detail."""

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("internal detail: /var/secret")

    monkeypatch.setattr("listener.sources.webhook.Verifier.verify", broken)
    async with running(abuse_config(tmp_path)) as svc:
        assert svc.public_port is not None
        body = orjson.dumps(gst_event())
        reply = await send(svc.public_port, request("POST", PATH, body, signed(body)))
    assert reply.status == 500 and reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "success": False,
        "error": {"code": "INTERNAL", "message": "an unexpected error; it was logged"},
    }


CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/cloudevents+json",
    "not a content type",
]


async def test_requests_waiting_for_the_journal_are_counted_in_flight(service: Service) -> None:
    """
    ``listener_webhook_requests_in_flight`` counts a request from its body to its answer
    (the soak subtracts these tasks from the loop's to tell load from a leak).
    """
    assert service.public_port is not None and service.journal is not None

    def in_flight() -> float:
        service._refresh_metrics()
        text = service.metrics.render().decode()
        (line,) = [x for x in text.splitlines() if x.startswith("listener_webhook_requests_in")]
        return float(line.split()[-1])

    body = orjson.dumps(gst_event())
    async with service.journal._writing:  # commits wait: the requests stay in flight
        replies = [
            asyncio.create_task(
                send(service.public_port, request("POST", PATH, body, signed(body)))
            )
            for _ in range(3)
        ]
        deadline = time.monotonic() + 5 * UNIT
        while in_flight() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert in_flight() == 3
    assert [r.status for r in await asyncio.gather(*replies)] == [200, 200, 200]
    assert in_flight() == 0


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
async def test_content_type_is_not_checked_the_signature_is(
    service: Service, content_type: str | None
) -> None:
    """Whatever the Content-Type, a signed event is accepted and an unsigned one is 401."""
    assert service.public_port is not None
    event = gst_event()
    body = orjson.dumps(event)
    extra = {"Content-Type": content_type} if content_type else {}
    good = await send(service.public_port, request("POST", PATH, body, {**signed(body), **extra}))
    assert good.status == 200 and good.json()["data"] == {"id": event["id"], "duplicate": False}
    forged = await send(
        service.public_port,
        request("POST", PATH, body, {**signed(body + b" "), **extra}),
    )
    assert forged.status == 401 and forged.json()["error"]["code"] == "INVALID_SIGNATURE"


# -- the admin API ------------------------------------------------------------------------------


def v1_routes(svc: Service) -> list[tuple[str, str, str]]:
    """(method, concrete path, scope) of every /v1 route the admin app serves now."""
    assert svc.admin is not None
    found = []
    for route in svc.admin.app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        if not canonical.startswith("/v1"):
            continue
        path = re.sub(r"\{[^}]+\}", "probe", canonical)
        found.append((route.method, path, getattr(route.handler, SCOPE_KEY, "admin")))
    return found


async def test_every_v1_route_needs_a_key_and_its_scope(service: Service) -> None:
    """Every /v1 route (found in the router, so new ones are covered): 401 without or with a
    wrong key, 403 with a key lacking the scope, and neither with the right key."""
    assert service.admin_port is not None
    routes = v1_routes(service)
    assert ("GET", "/v1/sources", "read") in routes
    port = service.admin_port

    async def probe(method: str, path: str, key: str | None) -> Reply:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = request(method, path, b"{}", {**headers, "Content-Type": "application/json"})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            async with asyncio.timeout(5 * UNIT):
                reply = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
                if method != "HEAD":
                    reply.body = await reader.readexactly(
                        int(reply.headers.get("content-length", "0"))
                    )
        finally:
            writer.close()
        return reply

    for method, path, scope in routes:
        where = f"{method} {path} (needs {scope})"
        for key in (None, "", "wrong-key-0123456789abcdef", KEYS["read"] + "x", KEYS["read"][:-1]):
            reply = await probe(method, path, key)
            assert reply.status == 401, (where, key, reply)
            assert reply.headers.get("www-authenticate", "").startswith("Bearer"), where
            if method != "HEAD":
                assert reply.json() == {
                    "success": False,
                    "error": {"code": "UNAUTHORIZED", "message": "a valid Bearer key is required"},
                }, where
        reply = await probe(method, path, KEYS[LACKS[scope]])
        assert reply.status == 403, (where, reply)
        if method != "HEAD":
            assert reply.json()["error"]["code"] == "FORBIDDEN", where
        reply = await probe(method, path, KEYS[HAS[scope]])
        assert reply.status not in (401, 403) and reply.status < 500, (where, reply)


async def test_admin_routes_are_not_on_the_public_port(service: Service) -> None:
    """The public port serves webhooks only: /v1, /metrics and health are 404 there."""
    assert service.public_port is not None
    for path in ("/v1/sources", "/metrics", "/healthz", "/readyz"):
        reply = await send(
            service.public_port,
            request("GET", path, headers={"Authorization": f"Bearer {KEYS['admin']}"}),
        )
        assert reply.status == 404, path


# -- random input through the real endpoint (hypothesis) --------------------------------------


class ThreadedService:
    """The real service on its own loop in a thread, for synchronous (hypothesis) tests."""

    def __init__(self, config: Config) -> None:
        self.service = Service(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="service", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.service.run())
        except BaseException as exc:  # reported by stop()
            self._error = exc
        finally:
            self._loop.close()

    def __enter__(self) -> Service:
        self._thread.start()
        deadline = time.monotonic() + 10 * UNIT
        while not self.service.started.is_set():
            assert self._thread.is_alive(), f"the service did not start: {self._error!r}"
            assert time.monotonic() < deadline, "the service did not start in time"
            time.sleep(0.02)
        return self.service

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self.service.stop)
        self._thread.join(30 * UNIT)
        assert not self._thread.is_alive(), "the service did not stop"
        if self._error is not None:
            raise self._error


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with ThreadedService(abuse_config(tmp_path_factory.mktemp("abuse"))) as svc:
        yield svc


def exchange_sync(port: int, data: bytes) -> int:
    """Send ``data`` on a fresh connection; return the final response's status code."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * UNIT) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        while True:
            # Interim answers (100 Continue) are skipped: the final one decides.
            heads = received.split(b"\r\n\r\n")
            complete = [parse_head(h).status for h in heads[:-1] if h.startswith(b"HTTP/")]
            if any(status >= 200 for status in complete):
                return next(status for status in complete if status >= 200)
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without a final answer: {received!r}"
            received += chunk


TOKEN = string.ascii_letters + string.digits + "-"
header_names = st.one_of(
    st.sampled_from(
        [
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "Content-Type",
            "Content-Encoding",
            "Expect",
            "Authorization",
            "Cookie",
            "X-Forwarded-For",
        ]
    ),
    st.text(TOKEN, min_size=1, max_size=20).filter(
        lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "connection"}
    ),
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
)
bodies = st.one_of(
    st.binary(max_size=2 * MAX_BODY),
    st.builds(orjson.dumps, st.builds(gst_event)),
    st.builds(
        lambda d: orjson.dumps({**gst_event(), "data": d}),
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    ),
    st.text(max_size=300).map(str.encode),
)


@settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.one_of(
        st.just("POST"), st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    ),
    path=st.one_of(st.just(PATH), st.text("abcxyz/-_.%0123", max_size=20).map(lambda p: "/" + p)),
    headers=st.dictionaries(header_names, header_values, max_size=6),
    body=bodies,
    signing=st.sampled_from(["none", "valid", "valid-then-garbage"]),
)
def test_random_requests_never_get_a_5xx(
    threaded: Service,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    signing: str,
) -> None:
    """Random methods, paths, headers and bodies, signed or not: never a 5xx; a valid
    signature on a small enough body to the webhook path is always accepted."""
    assert threaded.public_port is not None
    if signing != "none":
        signature = signed(body)
        # Our signature headers win; a body decoded or announced otherwise is another test.
        drop = {"content-encoding", "expect", *signature}
        headers = {k: v for k, v in headers.items() if k.lower() not in drop}
        headers.update(signature)
        if signing == "valid-then-garbage":
            headers["webhook-signature"] += " v1,Zm9v v2,bar garbage"
    status = exchange_sync(threaded.public_port, request(method, path, body, headers))
    assert status < 500
    if signing != "none" and method == "POST" and path == PATH and len(body) <= MAX_BODY:
        assert status == 200


async def test_admin_port_answers_a_bad_expect_header_without_a_500(service: Service) -> None:
    """An Expect header holding a byte that is not UTF-8 gets a 4xx on the admin port too."""
    assert service.admin_port is not None
    data = request("GET", "/healthz").replace(b"\r\n\r\n", b"\r\nExpect: \x80\r\n\r\n", 1)
    reply = await send(service.admin_port, data)
    assert reply.status < 500


@pytest.mark.parametrize(
    "lines",
    [
        [*(f"X-{i}: a" for i in range(40)), "User-Agent: caf\u00e9"],  # a byte over 0x7e
        [*(f"X-{i}:{' ' * 300}a" for i in range(4)), "X-Last: \x01"],  # a control character
    ],
    ids=["non-ascii-after-40-lines", "spaced-lines-then-a-control-character"],
)
async def test_a_header_block_that_fails_late_is_judged_in_one_pass(
    tmp_path: Path, lines: list[str]
) -> None:
    """
    Header lines the fast path does not take go to aiohttp, whatever line fails. Its
    check matched the spaces after each colon two ways, so a block that failed late
    was tried every way: time doubling with each line (24 lines held the event loop
    7 s; 40, for days). In a process of its own, so a stuck loop fails the test
    instead of hanging it.
    """
    daemon = ListenerProcess(
        tmp_path,
        {
            "broker": {"url": NO_BROKER, "exchange": "abuse"},
            "journal": {"path": str(tmp_path / "journal.db")},
            "sources": [gst_source()],
        },
    )
    try:
        await daemon.start()
        head = "".join(f"{line}\r\n" for line in ["POST /webhooks/gst HTTP/1.1", "Host: x", *lines])
        request = head.encode() + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.public_port)
        try:
            writer.write(request)
            async with asyncio.timeout(5 * UNIT):
                status = await reader.readline()
        finally:
            writer.close()
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", status), status  # (aiohttp: 400 or 401)
    finally:
        await daemon.stop()


@pytest.mark.parametrize(
    "data",
    [
        b"GET /\x01secret-probe HTTP/1.1\r\nHost: x\r\n\r\n",  # a byte no request line has
        b"POST /webhooks/gst HTTP/1.1\r\nHost: x\r\nX-Long: " + b"s" * 9000 + b"\r\n\r\n",
        b"POST /webhooks/gst HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["bad-request-line", "header-over-8190-bytes", "bad-content-length"],
)
async def test_a_request_aiohttp_cannot_parse_gets_the_json_400(
    service: Service, data: bytes
) -> None:
    """
    What aiohttp's parser refuses is answered with the contract's JSON error body, and
    nothing of the request is echoed back (aiohttp's own answer was text, quoting it).
    """
    assert service.public_port is not None
    reply = await send(service.public_port, data)
    assert reply.status == 400
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "success": False,
        "error": {"code": "BAD_REQUEST", "message": "Bad Request"},
    }


async def test_bodies_read_on_aiohttps_path_share_the_ports_budget(service: Service) -> None:
    """
    Chunked bodies (aiohttp's path) were each read up to max_body outside any budget:
    4,096 such connections could hold 4 GiB. They count with the fast path's buffers.
    """
    assert service.public_port is not None
    held = service.routes.held
    held.budget = 2 * MAX_BODY
    connections = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
        body = b"x" * (MAX_BODY - 100)
        writer.write(request("POST", PATH, headers={"Transfer-Encoding": "chunked"}, length=False))
        writer.write(b"%x\r\n%s\r\n" % (len(body), body))  # (and never the last chunk)
        await writer.drain()
        connections.append((reader, writer))
    await asyncio.sleep(0.5 * UNIT)
    assert held.total <= 2 * MAX_BODY
    assert sum([await closed_by_server(r, 0.5) for r, _ in connections]) >= 2
    for _, writer in connections:
        writer.close()
