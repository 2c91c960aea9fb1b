"""Admin API keys: 401 without a valid key, 403 without the scope, rate-limit headers, 429."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import make_config, running
from tests.test_webhooks import gst_source

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"


async def test_v1_requires_key_and_scope(tmp_path: Path, exchange_name: str) -> None:
    """/v1/sources answers 401 with no or a wrong key, 200 with a read key, and counts the rate."""
    config = make_config(
        tmp_path,
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
        admin={
            "api_keys": [
                {"key": READ_KEY, "scopes": ["read"]},
                {"key": WRITE_KEY, "scopes": ["write"]},
            ],
            "rate_limit": 5,
        },
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{service.admin_port}/v1/sources"

        async def get(
            key: str | None, path: str = url
        ) -> tuple[int, dict[str, object], dict[str, str]]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.get(path, headers=headers) as response:
                return response.status, await response.json(), dict(response.headers)

        status, body, headers = await get(None)
        assert status == 401 and body == {
            "success": False,
            "error": {"code": "UNAUTHORIZED", "message": "a valid Bearer key is required"},
        }
        assert headers["X-RateLimit-Limit"] == "5"
        assert (await get(READ_KEY + "x"))[0] == 401
        status, body, headers = await get(READ_KEY)
        assert status == 200 and body["success"] is True
        assert body["data"] == [
            {
                "name": "gst",
                "state": "listening",
                "kind": "webhook",
                "status": "listening",
                "path": "/webhooks/gst",
                "events_received": 0,
                "last_event_at": None,
            }
        ]
        assert int(headers["X-RateLimit-Remaining"]) == 4
        status, body, _ = await get(WRITE_KEY)
        assert status == 403 and body["error"]["code"] == "FORBIDDEN"  # type: ignore[index]
        assert (await get(READ_KEY, url.replace("sources", "nope")))[0] == 404
        for _ in range(3):
            await get(READ_KEY)
        status, body, headers = await get(READ_KEY)
        assert (
            status == 429 and headers["X-RateLimit-Remaining"] == "0" and "Retry-After" in headers
        )
        # health endpoints need no key and are not rate limited
        for _ in range(10):
            async with session.get(f"http://127.0.0.1:{service.admin_port}/healthz") as response:
                assert response.status == 200


async def test_errors_a_handler_raises_carry_the_rate_headers_too(
    tmp_path: Path, exchange_name: str
) -> None:
    """
    A 413 (a body over the limit, raised while the handler reads it) and a 405 carry
    X-RateLimit-* as every /v1 answer does (CONTRACT §7), the 405 with its Allow header.
    Both used to leave without them.
    """
    config = make_config(
        tmp_path,
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
        admin={"api_keys": [{"key": WRITE_KEY, "scopes": ["write"]}]},
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{service.admin_port}"
        auth = {"Authorization": f"Bearer {WRITE_KEY}"}
        async with session.post(
            f"{base}/v1/replays", data=b"x" * (2 * 2**20), headers=auth
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
            assert "X-RateLimit-Remaining" in response.headers
        async with session.delete(f"{base}/v1/sources", headers=auth) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET,HEAD"
            assert "X-RateLimit-Remaining" in response.headers


async def test_a_clock_stepped_back_does_not_hold_a_rate_window_open(
    tmp_path: Path, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The window ran on the wall clock: stepped back two hours, a key over its limit
    got 429 for two hours (Retry-After 7,200 s), the dashboard and automation locked out.
    """
    wall, elapsed = [0.0], [0.0]
    clock = type("Clock", (), {})
    clock.time = staticmethod(lambda: time.time() + wall[0])  # type: ignore[attr-defined]
    clock.monotonic = staticmethod(lambda: time.monotonic() + elapsed[0])  # type: ignore[attr-defined]
    monkeypatch.setattr("listener.admin.auth.time", clock)
    config = make_config(
        tmp_path,
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
        admin={"api_keys": [{"key": READ_KEY, "scopes": ["read"]}], "rate_limit": 2},
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{service.admin_port}/v1/sources"
        headers = {"Authorization": f"Bearer {READ_KEY}"}

        async def get() -> tuple[int, dict[str, str]]:
            async with session.get(url, headers=headers) as response:
                return response.status, dict(response.headers)

        statuses = [(await get())[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        wall[0], elapsed[0] = -7200.0, 61.0  # the clock steps back; a minute goes by
        status, answered = await get()
        assert status == 200
        reset = int(answered["X-RateLimit-Reset"])  # (a Unix time, on the clock as it is)
        assert 0 < reset - clock.time() <= 61  # type: ignore[attr-defined]
