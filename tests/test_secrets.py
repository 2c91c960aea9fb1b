"""
Secrets stay where they belong: a stream's API key goes to the stream's own origin only
(a redirect elsewhere is refused), and text a provider sends back with a secret in it
(an error message, a quarantined frame) is masked before it is logged, shown on the
admin port, kept in the journal or published.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import WSMsgType, web
from structlog.testing import capture_logs

from listener.journal import Journal
from listener.logs import PARTIAL, Redactor, redact, redact_also, redact_bytes
from tests.conftest import running, tap, wait_for
from tests.test_journal import config
from tests.test_streams import stream_config, stream_source

pytestmark = pytest.mark.usefixtures("cleanup_topology")

KEY = "test-key"  # tests.test_streams.lx_source's api_key
LONG_KEY = "LXKEY-0123456789abcdef0123456789"  # (a real key's length: its head is masked too)


class Server:
    """A websocket endpoint on 127.0.0.1 that records every text frame it gets."""

    def __init__(self, routes: dict[str, str], replies: tuple[object, ...] = ()) -> None:
        self.frames: list[str] = []
        self._replies = replies  # sent after the first frame (the auth frame)
        self.handshakes = 0
        self._routes = routes  # path -> where it redirects ("": a websocket there)
        self.port = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes += 1
        target = self._routes[request.path]
        if target:  # (not HTTPFound: it refuses a Location with a bad port)
            return web.Response(status=302, headers={"Location": target.format(port=self.port)})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                self.frames.append(message.data)
                if len(self.frames) == 1:
                    for reply in self._replies:
                        await ws.send_bytes(orjson.dumps(reply))
        return ws

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Server]:
        app = web.Application()
        for path in self._routes:
            app.router.add_get(path, self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started
        try:
            yield self
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("scheme", ["ws", "https", "ws-bad-port"])
async def test_a_redirect_to_another_origin_never_gets_the_api_key(
    tmp_path: Path, broker_url: str, exchange_name: str, scheme: str
) -> None:
    """
    websockets followed it and the auth frame went there: the key, to another host. One
    to an ``https://`` URL made websockets raise, and the source crashed at each attempt.
    """
    async with Server({"/ws": ""}).serving() as elsewhere:
        port = "99999" if scheme == "ws-bad-port" else elsewhere.port  # (out of range)
        scheme = scheme.removesuffix("-bad-port")
        redirect = {"/ws": f"{scheme}://127.0.0.1:{port}/ws"}
        async with Server(redirect).serving() as provider:
            config = stream_config(
                tmp_path, broker_url, exchange_name, f"ws://127.0.0.1:{provider.port}/ws"
            )
            with capture_logs() as logs:
                async with running(config) as service:
                    source = stream_source(service)
                    await wait_for(lambda: provider.handshakes >= 3, what="three handshakes")
                    assert source.status != "connected"
    assert elsewhere.handshakes == 0 and not elsewhere.frames
    refused = [e for e in logs if e["event"] == "stream_redirect_refused"]
    where = f"{scheme}://127.0.0.1" + ("" if port == "99999" else f":{port}")
    assert refused and refused[0]["location"] == where
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]  # (no crash)


async def test_a_redirect_within_the_origin_is_followed(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A provider moving its endpoint on its own host still works."""
    async with Server({"/old": "/ws", "/ws": ""}).serving() as provider:
        config = stream_config(
            tmp_path, broker_url, exchange_name, f"ws://127.0.0.1:{provider.port}/old"
        )
        async with running(config):
            await wait_for(lambda: bool(provider.frames), what="the auth frame")
    assert KEY in provider.frames[0]


def test_the_head_of_a_secret_cut_short_is_masked_too() -> None:
    """A message cut to length inside a secret kept its first characters."""
    masking = Redactor([LONG_KEY, "short"])
    assert masking.text(f"key={LONG_KEY}!") == "key=***!"
    cut = f"{'z' * 10} key={LONG_KEY}"[:30]
    assert LONG_KEY[:PARTIAL] in cut and masking.text(cut) == "z" * 10 + " key=***"
    assert masking.text(repr(cut)) == "'" + "z" * 10 + " key=***'"
    assert (
        masking.text(f"{LONG_KEY[: PARTIAL - 1]} and short") == f"{LONG_KEY[: PARTIAL - 1]} and ***"
    )
    redact_also([LONG_KEY, "guest"], sources=[LONG_KEY, "short"])
    assert redact(f"a {LONG_KEY[:20]}") == "a ***"
    assert redact_bytes(b'{"api_key": "%s"}' % LONG_KEY.encode()) == b'{"api_key": "***"}'
    # Only the sources' secrets, and not short ones: the broker's `guest` in a payload
    # kept in quarantine is the payload's ("user_id": "guest_42" became "***_42").
    assert (
        redact_bytes(b'{"user_id": "guest_42", "n": "short"}')
        == b'{"user_id": "guest_42", "n": "short"}'
    )
    # A URL's head is no secret: a logged masked broker URL stays readable.
    url = "amqp://guest:guest@localhost:5672/"
    assert (
        Redactor([url, "guest"]).text("broker amqp://guest:***@localhost:5672/")
        == "broker amqp://***:***@localhost:5672/"
    )
    slashed = "lx/live+8fK2Z/0123456789"
    redact_also([], sources=[slashed])
    for echoed in (
        b'{"k": "lx\\/live+8fK2Z\\/0123456789"}',
        b"k=lx%2Flive%2B8fK2Z%2F0123456789&x=1",
    ):
        assert b"8fK2Z" not in redact_bytes(echoed), echoed


async def test_a_key_a_stream_provider_echoes_back_is_shown_nowhere(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    An error frame quoting the key reached /v1/sources (last_error) whole, and its log
    line with the key cut at 200 characters, past the log's redaction; a frame echoing
    the auth frame was quarantined, kept and published with the key in it.
    """
    message = "z" * 186 + f" key={LONG_KEY} is over its budget"
    echo = {"type": "whoami", "you_sent": {"type": "auth", "api_key": LONG_KEY}}
    replies = (
        {"type": "auth_ok"},
        echo,
        {"type": "error", "code": "SERVER_BUSY", "message": message},
    )
    async with (
        Server({"/ws": ""}, replies).serving() as provider,
        tap(broker_url, f"{exchange_name}.quarantine") as quarantined,
    ):
        config = stream_config(
            tmp_path,
            broker_url,
            exchange_name,
            f"ws://127.0.0.1:{provider.port}/ws",
            api_key=LONG_KEY,
        )
        with capture_logs() as logs:
            async with running(config) as service:
                source = stream_source(service)
                await wait_for(lambda: "last_error" in source.state(), what="the error")
                await wait_for(lambda: bool(quarantined.messages), what="the echo quarantined")
                shown = orjson.dumps(source.state()).decode()
    head = LONG_KEY[:6]
    assert LONG_KEY in provider.frames[0]  # (the key was sent, to its own origin)
    assert "***" in shown and head not in shown
    errors = [e for e in logs if e["event"] == "stream_error"]
    assert errors and all(head not in e["message"] for e in errors)
    (published,) = quarantined.messages
    assert head.encode() not in published.body
    assert all(head not in str(v) for v in (published.headers or {}).values())
    with sqlite3.connect(tmp_path / "journal.db") as db:
        rows = db.execute("SELECT body, detail FROM events WHERE kind = 'quarantine'").fetchall()
    db.close()
    assert rows and all(
        head.encode() not in bytes(body) and head not in detail for body, detail in rows
    )


async def test_a_new_journal_is_its_owners_alone(tmp_path: Path) -> None:
    """Its files followed the umask (0644, the directory 0755): any local user read every event."""
    where = tmp_path / "data" / "journal"
    cfg = config(tmp_path).model_copy(update={"path": str(where / "j.db")})
    async with Journal(config=cfg, lock=True) as journal:
        await journal.append([])
        modes = {f.name: f.stat().st_mode & 0o777 for f in where.iterdir()}
    assert modes == {"j.db": 0o600, "j.db-wal": 0o600, "j.db-shm": 0o600, "j.db.lock": 0o600}
    assert where.stat().st_mode & 0o777 == 0o700
