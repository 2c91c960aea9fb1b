"""
``listener demo`` and ``listener simulate getstoken``, run as the real command line
(``python -m listener ...`` child processes, output not a terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import yaml
from aiohttp import web
from pydantic import SecretStr

from listener.config import SignatureConfig
from listener.dev.simulators.getstoken import EVENT_TYPES
from listener.exceptions import SignatureError
from listener.sources.signatures import Scheme, verify
from tests.conftest import UNIT
from tests.process import free_port
from tests.webhook_sender import WHSEC

SOURCES = r"gst (?P<{p}gst>\d+), lx (?P<{p}lx>\d+), tt (?P<{p}tt>\d+), bonds (?P<{p}bonds>\d+)"
SUMMARY = re.compile(
    r"received (?P<received>\d+) \(" + SOURCES.format(p="received_") + r"\), "
    r"published (?P<published>.+?), quarantined (?P<quarantined>\d+), "
    r"duplicates (?P<duplicates>\d+), lost (?P<lost>\d+)$"
)
PUBLISHED = re.compile(r"(?P<total>\d+) \(" + SOURCES.format(p="") + r"\)")


async def run_cli(
    *args: str, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``python -m listener ARGS``; its exit code, stdout and stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "LISTENER_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "listener",
        *args,
        cwd=cwd,
        env={**environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout * UNIT):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, broker_url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": broker_url}, "sources": []}))
    return path


async def test_demo_publishes_every_provider_and_loses_nothing(
    tmp_path: Path, broker_url: str
) -> None:
    """A 4 s demo publishes the events of all four providers, loses none, deletes its exchange."""
    config = write_config(tmp_path, broker_url)
    code, out, err = await run_cli(
        "demo", "--seconds", "4", "--config", str(config), cwd=tmp_path, timeout=90
    )
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # off a terminal: one summary line
    summary = SUMMARY.search(lines[0])
    assert summary is not None, lines[0]
    assert summary["lost"] == "0"
    published = PUBLISHED.fullmatch(summary["published"])
    assert published is not None, lines[0]
    for source in ("gst", "lx", "tt", "bonds"):  # every provider, each published whole
        assert int(published[source]) > 0, (source, lines[0])
        assert int(published[source]) == int(summary[f"received_{source}"]), (source, lines[0])

    exchange = re.search(r"exchange (demo\.[0-9a-f]+)", lines[0])
    assert exchange is not None, lines[0]
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(exchange[1], passive=True)


async def test_demo_without_broker_runs_journal_only(tmp_path: Path) -> None:
    """With no broker reachable the demo says so, journals everything and loses nothing."""
    config = write_config(tmp_path, f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    code, out, err = await run_cli(
        "demo", "--seconds", "2", "--config", str(config), cwd=tmp_path, timeout=90
    )
    assert code == 0, out + err
    assert "no broker reachable" in err
    summary = SUMMARY.search(out.strip())
    assert summary is not None, out
    assert summary["lost"] == "0"
    kept = re.fullmatch(r"0 \(no broker: (\d+) events kept in the journal\)", summary["published"])
    assert kept is not None, out
    assert int(kept[1]) >= int(summary["received"]) > 0


class WebhookStub:
    """An aiohttp endpoint that checks signatures with ``listener.signatures.verify``."""

    def __init__(self, scheme: Scheme, secret: str) -> None:
        self.config = SignatureConfig(scheme=scheme, secrets=(SecretStr(secret),))
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.config, request.headers, body, now=time.time())
        except SignatureError as exc:
            self.refused.append(str(exc))
            error = {"code": "INVALID_SIGNATURE", "message": "signature verification failed"}
            return web.json_response({"success": False, "error": error}, status=401)
        payload = orjson.loads(body)
        self.accepted.append(payload)
        data = {"id": payload["id"], "duplicate": False}
        return web.json_response({"success": True, "data": data})

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[WebhookStub]:
        app = web.Application()
        app.router.add_post("/webhooks/gst", self.receive)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/webhooks/gst"
        try:
            yield self
        finally:
            await runner.cleanup()


@pytest.mark.parametrize(
    ("scheme", "secret"), [("standard-webhooks", WHSEC), ("stripe", "sk_test_demo_secret")]
)
async def test_simulate_getstoken_signs_every_webhook(
    tmp_path: Path, scheme: Scheme, secret: str
) -> None:
    """Every webhook `simulate getstoken` sends verifies, with the secret from its env var."""
    async with WebhookStub(scheme, secret).serving() as stub:
        code, out, err = await run_cli(
            "simulate",
            "getstoken",
            "--url",
            stub.url,
            "--scheme",
            scheme,
            "--rate",
            "20",
            "--seconds",
            "1",
            cwd=tmp_path,
            timeout=30,
            env={"GST_WEBHOOK_SECRET": secret},
        )
    assert code == 0, out + err
    assert stub.refused == []
    assert len(stub.accepted) >= 5
    assert stub.url in out.splitlines()[0]
    assert {p["type"] for p in stub.accepted} <= set(EVENT_TYPES)
    ids = {p["id"] for p in stub.accepted}
    assert ids == {f"evt_{n}" for n in range(1, len(stub.accepted) + 1)}
    assert f"accepted {len(stub.accepted)}," in out


async def test_demo_replicas_shows_a_failover(tmp_path: Path, broker_url: str) -> None:
    """`demo --replicas 3`: real processes; the killed holder's unit is taken over, held once."""
    config = write_config(tmp_path, broker_url)
    code, out, err = await run_cli(
        "demo",
        "--replicas",
        "3",
        "--seconds",
        "12",
        "--config",
        str(config),
        cwd=tmp_path,
        timeout=90,
    )
    assert code == 0, out + err
    summary = re.search(
        r"failover after SIGKILL (?P<failover>[\d.]+)s; longest double hold (?P<double>[\d.]+)s;"
        r" units not held once at the end: (?P<unheld>\d+)$",
        out.strip(),
    )
    assert summary is not None, out + err
    assert float(summary["failover"]) < 10
    assert summary["unheld"] == "0"
