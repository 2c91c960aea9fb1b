"""
The GitHub webhook provider: the shared webhook contract, its ids and types, and the
whole path through a running listener with an ``X-Hub-Signature-256`` source.

Adding this provider touched: handlers/github.py, this file, and a source entry in a
configuration (here, the test's); no central list.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest

from handlers import Event, NoSettings, Quarantine
from handlers.github import PROVIDER
from tests.conftest import make_config, running, tap

from .contract import WebhookProviderContract

SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
REPO = {"id": 1296269, "full_name": "octocat/Hello-World", "private": False}

PUSH = {
    "ref": "refs/heads/main",
    "before": "0" * 40,
    "after": SHA,
    "repository": REPO,
    "pusher": {"name": "octocat"},
    "commits": [{"id": SHA, "message": "Fix all the bugs"}],
    "head_commit": {"id": SHA, "timestamp": "2026-11-22T10:00:00Z"},
}
RELEASE = {
    "action": "published",
    "release": {"id": 1, "tag_name": "v1.0.0", "published_at": "2026-11-22T11:00:00Z"},
    "repository": REPO,
}
ISSUES = {
    "action": "opened",
    "issue": {
        "id": 1347,
        "number": 7,
        "title": "Found a bug",
        "updated_at": "2026-11-22T12:00:00Z",
    },
    "repository": REPO,
}
PING = orjson.dumps({"zen": "Keep it logically awesome.", "hook_id": 1})
SAMPLES: dict[bytes, str] = {
    orjson.dumps(PUSH): "push",
    orjson.dumps(RELEASE): "release",
    orjson.dumps(ISSUES): "issues",
    orjson.dumps({**ISSUES, "action": "closed"}): "issues",
}


def parse(payload: dict[str, Any], event: str | None) -> Event | Quarantine:
    headers = {"X-GitHub-Event": event} if event else {}
    return PROVIDER.parse(orjson.dumps(payload), NoSettings(), headers)


class TestGitHubContract(WebhookProviderContract):
    """GitHub keeps the contract every webhook provider keeps."""

    provider = PROVIDER
    headers: ClassVar[Mapping[str, str]] = {"X-GitHub-Event": "push"}
    valid_bodies: ClassVar[list[bytes]] = list(SAMPLES)
    invalid_bodies: ClassVar[list[tuple[bytes, str]]] = [
        (orjson.dumps({**PUSH, "after": "not-a-sha"}), "schema_violation"),
        (orjson.dumps({k: v for k, v in PUSH.items() if k != "repository"}), "schema_violation"),
        (PING, "unknown_type"),
    ]

    def headers_for(self, body: bytes) -> Mapping[str, str]:
        event = "ping" if body == PING else SAMPLES.get(body)
        return {"X-GitHub-Event": event} if event else self.headers


def test_types_and_times() -> None:
    """Each event is typed github.<event> and timed by its own payload."""
    push, release, issues = parse(PUSH, "push"), parse(RELEASE, "release"), parse(ISSUES, "issues")
    assert isinstance(push, Event) and push.type == "github.push"
    assert isinstance(release, Event) and release.type == "github.release"
    assert isinstance(issues, Event) and issues.type == "github.issues"
    assert push.time is not None and push.time.isoformat() == "2026-11-22T10:00:00+00:00"
    assert issues.data == ISSUES


def test_known_answer_id() -> None:
    """The id of a push is pinned: changing it would change every id consumers stored."""
    event = parse(PUSH, "push")
    assert isinstance(event, Event)
    assert event.id == "9f37e488-0d85-5638-8264-544195a2521c"


def ids(*payloads: dict[str, Any], event: str) -> list[str]:
    found = [parse(p, event) for p in payloads]
    return [e.id for e in found if isinstance(e, Event)]


def test_different_events_never_share_an_id() -> None:
    """
    A release edited twice (same release id and action) and a ref moved back to a head
    it had (same ref and after) got one id each time: the later one was dropped as a
    duplicate for the whole dedupe window.
    """
    edited = {**RELEASE, "action": "edited"}
    first = {**edited, "release": {**RELEASE["release"], "name": "v1.0.0"}}
    second = {**edited, "release": {**RELEASE["release"], "name": "v1.0.0 (final)"}}
    assert len(set(ids(first, second, event="release"))) == 2
    other = "a" * 40
    there = {**PUSH, "before": "0" * 40, "after": SHA}
    away = {**PUSH, "before": SHA, "after": other, "head_commit": {"id": other}}
    back = {**PUSH, "before": other, "after": SHA}
    assert len(set(ids(there, away, back, event="push"))) == 3
    labels = [{**ISSUES, "action": "labeled", "label": {"name": n}} for n in ("bug", "p1")]
    assert len(set(ids(*labels, event="issues"))) == 2


def test_a_redelivery_keeps_its_id_whatever_its_layout() -> None:
    """The same payload, keys in another order and with spaces, is the same event."""
    body = b'{ "repository": %s, "ref": "refs/heads/main", "after": "%s", "before": "%s",' % (
        orjson.dumps(REPO),
        SHA.encode(),
        b"0" * 40,
    )
    body += b' "pusher": {"name": "octocat"}, "commits": %s, "head_commit": %s }' % (
        orjson.dumps(PUSH["commits"]),
        orjson.dumps(PUSH["head_commit"]),
    )
    again = PROVIDER.parse(body, NoSettings(), {"X-GitHub-Event": "push", "X-GitHub-Delivery": "x"})
    first = parse(PUSH, "push")
    assert isinstance(again, Event) and isinstance(first, Event) and again.id == first.id


def test_type_from_the_body_without_headers() -> None:
    """Without X-GitHub-Event (a redriven payload) the type is read from the body's shape."""
    for payload, event in ((PUSH, "push"), (RELEASE, "release"), (ISSUES, "issues")):
        with_header, without = parse(payload, event), parse(payload, None)
        assert isinstance(without, Event) and without == with_header


def test_other_events_are_unknown_type() -> None:
    """A GitHub event other than push, release or issues is quarantined as unknown_type."""
    result = parse({"zen": "Design for failure.", "hook_id": 1}, "ping")
    assert isinstance(result, Quarantine) and result.reason == "unknown_type"
    assert "'ping'" in result.detail


@pytest.mark.usefixtures("cleanup_topology")
async def test_signed_deliveries_reach_the_exchange(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A github source verifies X-Hub-Signature-256 and publishes github.<event>; a forgery is 401."""
    secret = "It's a Secret to Everybody"
    source = {
        "name": "gh",
        "kind": "webhook",
        "provider": "github",
        "path": "/webhooks/github",
        "signature": {"scheme": "github", "secrets": [secret]},
    }
    config = make_config(tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[source])
    async with running(config) as service, tap(broker_url, exchange_name) as t:
        url = f"http://127.0.0.1:{service.public_port}/webhooks/github"
        async with aiohttp.ClientSession() as session:
            for body, event in SAMPLES.items():
                digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
                headers = {"X-GitHub-Event": event, "X-Hub-Signature-256": f"sha256={digest}"}
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
            forged = {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + "0" * 64}
            async with session.post(url, data=orjson.dumps(PUSH), headers=forged) as response:
                assert response.status == 401
        await t.wait_count(len(SAMPLES))
        assert sorted(m.routing_key or "" for m in t.messages) == sorted(
            f"github.{e}" for e in SAMPLES.values()
        )
