"""The /v1 admin API: scopes on every endpoint, events and quarantine pages, replays, OpenAPI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from listener.admin.api import MAX_RUNNING
from listener.admin.openapi import MAX_LIMIT
from listener.config import Config
from listener.service import Service
from tests.conftest import running, wait_for
from tests.test_quarantine import post_all
from tests.test_replay import (
    ADMIN_KEY,
    READ_KEY,
    WRITE_KEY,
    drain,
    event_at,
    ingest,
    iso,
    raw_config,
    target_queue,
)

pytestmark = pytest.mark.usefixtures("cleanup_topology")


class Api:
    """A client of one service's admin port."""

    def __init__(self, session: aiohttp.ClientSession, service: Service) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{service.admin_port}"

    async def call(
        self, method: str, path: str, key: str | None = READ_KEY, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None
        async with self.session.request(
            method, self.base + path, headers=headers, data=data
        ) as response:
            return response.status, orjson.loads(await response.read())


@pytest.fixture
async def api_service(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> AsyncIterator[tuple[Api, Service]]:
    config = Config.model_validate(raw_config(tmp_path, broker_url, exchange_name))
    async with running(config) as service, aiohttp.ClientSession() as session:
        yield Api(session, service), service


async def wait_replay(api: Api, replay_id: str) -> dict[str, Any]:
    """Poll GET /v1/replays/{id} until it is no longer running."""
    found: dict[str, Any] = {}

    async def done() -> bool:
        status, body = await api.call("GET", f"/v1/replays/{replay_id}")
        assert status == 200
        found.update(body["data"])
        return bool(body["data"]["state"] != "running")

    await wait_for(done, what=f"replay {replay_id}")
    return found


async def test_every_endpoint_checks_scopes(
    api_service: tuple[Api, Service], broker_url: str, exchange_name: str
) -> None:
    """Each /v1 endpoint answers 401 with no or a wrong key, 403 without its scope, and serves the right one."""
    api, _ = api_service
    queue = f"{exchange_name}.replay"
    async with target_queue(broker_url, queue):
        replay = {"since": "1h", "to_queue": queue}
        status, body = await api.call("POST", "/v1/replays", WRITE_KEY, replay)
        assert status == 201, body
        replay_path = f"/v1/replays/{body['data']['id']}"
        endpoints = [
            ("GET", "/v1/sources", "read", None),
            ("GET", "/v1/events", "read", None),
            ("GET", "/v1/quarantine", "read", None),
            ("GET", replay_path, "read", None),
            ("GET", "/v1/openapi.json", "read", None),
            ("GET", "/v1/asyncapi.json", "read", None),
            ("POST", "/v1/replays", "write", replay),
        ]
        for method, path, scope, payload in endpoints:
            for key in (None, "not-a-key-0123456789"):
                status, body = await api.call(method, path, key, payload)
                assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", (path, key)
            wrong = WRITE_KEY if scope == "read" else READ_KEY
            status, body = await api.call(method, path, wrong, payload)
            assert status == 403 and body == {
                "success": False,
                "error": {"code": "FORBIDDEN", "message": f"this key lacks the {scope!r} scope"},
            }, path
            right = READ_KEY if scope == "read" else WRITE_KEY
            for key in (right, ADMIN_KEY):
                status, body = await api.call(method, path, key, payload)
                assert status in {200, 201}, (path, key, body)
                assert path.endswith(".json") or body["success"] is True
        assert (await api.call("GET", "/v1/replays/rpl_nope"))[0] == 404
        assert (await api.call("DELETE", "/v1/events"))[0] == 405


async def test_events_pagination_edges_and_filters(api_service: tuple[Api, Service]) -> None:
    """/v1/events pages with total and has_more: offset past the end, limit 0 and over the maximum; filters apply."""
    api, service = api_service
    await ingest(service, [event_at(i) for i in range(25)])

    async def page(query: str) -> tuple[list[str], dict[str, Any]]:
        status, body = await api.call("GET", f"/v1/events?{query}")
        assert status == 200, body
        pagination = dict(body["pagination"])
        pagination.pop("next_after")
        return [e["id"] for e in body["data"]], pagination

    every = [f"evt_{i:04d}" for i in range(25)]
    # Keyset paging: after=<next_after> walks everything, page by page, in order.
    walked: list[str] = []
    after: int | None = None
    while True:
        status, body = await api.call(
            "GET", "/v1/events?limit=7" + (f"&after={after}" if after is not None else "")
        )
        assert status == 200, body
        walked += [e["id"] for e in body["data"]]
        after = body["pagination"]["next_after"]
        if after is None:
            break
        assert body["pagination"]["has_more"] is True
    assert walked == every
    status, body = await api.call("GET", "/v1/events?offset=10001")
    assert status == 400 and "after=" in body["error"]["message"]
    assert await page("limit=10") == (
        every[:10],
        {"total": 25, "limit": 10, "offset": 0, "has_more": True},
    )
    assert await page("limit=10&offset=20") == (
        every[20:],
        {"total": 25, "limit": 10, "offset": 20, "has_more": False},
    )
    assert await page("offset=25") == (
        [],
        {"total": 25, "limit": 100, "offset": 25, "has_more": False},
    )
    assert await page("offset=1000") == (
        [],
        {"total": 25, "limit": 100, "offset": 1000, "has_more": False},
    )
    assert await page("limit=0") == ([], {"total": 25, "limit": 0, "offset": 0, "has_more": True})
    assert await page(f"limit={MAX_LIMIT * 5}") == (
        every,
        {"total": 25, "limit": MAX_LIMIT, "offset": 0, "has_more": False},
    )
    assert (await page("type=getstoken.badge.*"))[0] == [
        e for i, e in enumerate(every) if i % 4 in {0, 1}
    ]
    assert (await page(f"since={iso(3)}&until={iso(6)}"))[0] == every[3:6]
    assert await page("source=nope") == (
        [],
        {"total": 0, "limit": 100, "offset": 0, "has_more": False},
    )
    status, body = await api.call("GET", "/v1/events?limit=1&offset=2")
    item = body["data"][0]
    assert (
        item["id"] == "evt_0002"
        and item["type"] == "getstoken.user.created"
        and item["status"] == "published"
    )
    assert item["event"]["id"] == "evt_0002" and item["event"]["data"] == {"user_id": "u"}
    assert item["time"] == iso(2)
    for query, name in (
        ("limit=-1", "limit"),
        ("offset=x", "offset"),
        ("after=99999999999999999999", "after"),  # past SQLite's integers: was a 500
        ("since=tuesday", "since"),
        ("type=a..b", "type"),
    ):
        status, body = await api.call("GET", f"/v1/events?{query}")
        assert (
            status == 400
            and body["error"]["code"] == "BAD_REQUEST"
            and body["error"]["message"].startswith(f"{name}:")
        )


async def test_quarantine_endpoint_pages_with_reasons(api_service: tuple[Api, Service]) -> None:
    """/v1/quarantine lists what is quarantined with reason and payload, paginated."""
    api, service = api_service
    answers = await post_all(service, [b"{bad %d" % i for i in range(3)])
    status, body = await api.call("GET", "/v1/quarantine?limit=2")
    assert status == 200
    assert body["pagination"] == {"total": 3, "limit": 2, "offset": 0, "has_more": True}
    first = body["data"][0]
    assert (
        first["id"] == answers[0]["id"]
        and first["source"] == "gst"
        and first["reason"] == "invalid_json"
    )
    assert first["payload"] == "{bad 0" and first["status"] == "quarantined" and first["detail"]
    status, body = await api.call("GET", "/v1/quarantine?offset=3&reason=invalid_json")
    assert body["data"] == [] and body["pagination"]["has_more"] is False
    status, body = await api.call("GET", "/v1/quarantine?reason=schema_violation&limit=0")
    assert body["pagination"]["total"] == 0
    assert (await api.call("GET", "/v1/quarantine?limit=ten"))[0] == 400


async def test_post_replay_runs_in_the_daemon(
    api_service: tuple[Api, Service], broker_url: str, exchange_name: str
) -> None:
    """POST /v1/replays answers 201 with an id, runs in the daemon, and GET shows its counts; bad input is 400."""
    api, service = api_service
    queue = f"{exchange_name}.replay"
    await ingest(service, [event_at(i) for i in range(20)])
    async with target_queue(broker_url, queue):
        request = {"since": iso(5), "until": iso(15), "type": "getstoken.#", "to_queue": queue}
        status, body = await api.call("POST", "/v1/replays", WRITE_KEY, request)
        assert status == 201 and body["data"]["state"] == "running"
        result = await wait_replay(api, body["data"]["id"])
        assert result["state"] == "completed" and result["error"] is None
        assert (result["total"], result["published"], result["progress"]) == (10, 10, 1.0)
        assert sorted(m.message_id for m in await drain(broker_url, queue, exchange_name)) == [
            f"evt_{i:04d}" for i in range(5, 15)
        ]

        status, body = await api.call(
            "POST", "/v1/replays", WRITE_KEY, {"since": "2h", "from": "archive", "dry_run": True}
        )
        assert status == 201
        result = await wait_replay(api, body["data"]["id"])
        assert (
            result["matched"] == 20
            and result["published"] == 0
            and sum(result["by_type"].values()) == 20
        )

        bad = [
            ({"until": "1h", "to_queue": queue}, "since:"),
            ({"since": "tomorrow-ish", "to_queue": queue}, "since:"),
            ({"since": "1h", "until": "2h", "to_queue": queue}, "until:"),
            ({"since": "1h", "to_queue": f"{exchange_name}.missing"}, "to_queue:"),
            ({"since": "1h", "to_queue": queue, "to_exchange": "x"}, "to_queue:"),
            ({"since": "1h", "to_queue": queue, "from": "kafka"}, "from:"),
            ({"since": "1h", "to_queue": queue, "rate": 0}, "rate:"),
            ({"since": "1h", "to_queue": queue, "speed": 3}, "speed:"),
            (b"{not json", "(body):"),
        ]
        for payload, prefix in bad:
            status, body = await api.call("POST", "/v1/replays", WRITE_KEY, payload)
            assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (payload, body)
            assert body["error"]["message"].startswith(prefix), (payload, body)

        # Slow replays: two at once at most, also asked for at once (the count used to
        # leave out those still connecting: all got a 201). Shutdown stops them (teardown).
        slow = {"since": "2h", "to_queue": queue, "rate": 1}
        asked = await asyncio.gather(
            *(api.call("POST", "/v1/replays", WRITE_KEY, slow) for _ in range(MAX_RUNNING + 2))
        )
        assert sorted(status for status, _ in asked) == [201] * MAX_RUNNING + [409] * 2
        status, body = await api.call("POST", "/v1/replays", WRITE_KEY, slow)
        assert status == 409 and body["error"]["code"] == "TOO_MANY_REPLAYS"


async def test_openapi_document_describes_every_endpoint(api_service: tuple[Api, Service]) -> None:
    """/v1/openapi.json is an OpenAPI 3.1 document naming every /v1 path and the replay body."""
    api, _ = api_service
    status, doc = await api.call("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert {
        "/v1/sources",
        "/v1/events",
        "/v1/quarantine",
        "/v1/replays",
        "/v1/replays/{id}",
        "/v1/openapi.json",
        "/v1/asyncapi.json",
    } <= set(doc["paths"])
    body = doc["components"]["schemas"]["ReplayRequest"]
    assert {
        "since",
        "until",
        "source",
        "type",
        "from",
        "to_queue",
        "to_exchange",
        "dry_run",
        "rate",
    } == set(body["properties"])
    assert body["required"] == ["since"]
