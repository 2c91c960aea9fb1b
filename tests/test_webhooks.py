"""Webhook receiver end to end: every row of CONTRACT §5's table, against a real broker."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from listener.config import Config
from listener.service import Service
from tests.conftest import make_config, running, tap, wait_for
from tests.webhook_sender import WHSEC, Sender, gst_event, sign

pytestmark = pytest.mark.usefixtures("cleanup_topology")


def gst_source(**signature: Any) -> dict[str, Any]:
    return {
        "name": "gst",
        "kind": "webhook",
        "provider": "getstoken",
        "path": "/webhooks/gst",
        "signature": {"secrets": [WHSEC], **signature},
    }


@pytest.fixture
def config(tmp_path: Path, broker_url: str, exchange_name: str) -> Config:
    return make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def url(service: Service, path: str = "/webhooks/gst") -> str:
    return f"http://127.0.0.1:{service.public_port}{path}"


async def test_accepted_event_reaches_exchange_as_cloudevent(
    config: Config, session: aiohttp.ClientSession, broker_url: str, exchange_name: str
) -> None:
    """A verified webhook is answered 200 and arrives as a CloudEvent with the contract's properties."""
    async with tap(broker_url, exchange_name) as t, running(config) as service:
        payload = gst_event("evt_abc")
        status, body, _ = await Sender(session, url(service)).post(payload)
        assert status == 200
        assert body == {"success": True, "data": {"id": "evt_abc", "duplicate": False}}
        await t.wait_count(1)
        message = t.messages[0]
        event = orjson.loads(message.body)
        assert event == {
            "specversion": "1.0",
            "id": "evt_abc",
            "source": "gst",
            "type": "getstoken.badge.issued",
            "time": "2026-11-22T10:00:00Z",
            "datacontenttype": "application/json",
            "provider": "getstoken",
            "data": payload["data"],
        }
        assert message.routing_key == "getstoken.badge.issued"
        assert message.content_type == "application/cloudevents+json"
        assert message.message_id == "evt_abc"
        assert message.type == "getstoken.badge.issued"
        assert message.delivery_mode == 2
        assert message.app_id == "listener"
        assert message.timestamp is not None


async def test_duplicate_is_acknowledged_but_not_published_again(
    config: Config, session: aiohttp.ClientSession, broker_url: str, exchange_name: str
) -> None:
    """The same event id again gets 200 duplicate=true and is published once."""
    async with tap(broker_url, exchange_name) as t, running(config) as service:
        sender = Sender(session, url(service))
        payload = gst_event("evt_dup")
        assert (await sender.post(payload))[1]["data"]["duplicate"] is False
        results = await asyncio.gather(*(sender.post(payload) for _ in range(5)))
        assert all(status == 200 and body["data"]["duplicate"] for status, body, _ in results)
        await sender.post(gst_event("evt_after"))
        await t.wait_ids({"evt_dup", "evt_after"})
        assert t.ids.count("evt_dup") == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (orjson.dumps(gst_event("evt_bad", data={"user_id": "u"})), "schema_violation"),
        (orjson.dumps(gst_event("evt_sbx", environment="sandbox")), "environment_mismatch"),
    ],
)
async def test_bad_payload_is_quarantined_with_reason(
    config: Config,
    session: aiohttp.ClientSession,
    broker_url: str,
    exchange_name: str,
    body: bytes,
    reason: str,
) -> None:
    """A signed payload that does not fit gets 200 and lands raw in quarantine with its reason."""
    async with (
        tap(broker_url, f"{exchange_name}.quarantine") as q,
        tap(broker_url, exchange_name) as t,
        running(config) as service,
    ):
        status, answer, _ = await Sender(session, url(service)).post(body)
        assert status == 200 and answer["data"]["quarantined"] is True
        await q.wait_count(1)
        message = q.messages[0]
        assert message.body == body
        assert message.routing_key == "gst"
        assert message.headers["x-quarantine-reason"] == reason
        assert message.headers["x-quarantine-detail"]
        # A good event after it: once it is on the main exchange, anything the bad one
        # had sent there would be too (one publisher, in journal order).
        good = gst_event("evt_after_bad")
        assert (await Sender(session, url(service)).post(good))[0] == 200
        await t.wait_ids({"evt_after_bad"}, timeout=15)
        assert [m.message_id for m in t.messages] == ["evt_after_bad"]


async def test_signature_failures_are_401(config: Config, session: aiohttp.ClientSession) -> None:
    """Missing, wrong, malformed signatures and unknown secrets get 401 INVALID_SIGNATURE."""
    async with running(config) as service:
        sender = Sender(session, url(service))
        payload = orjson.dumps(gst_event())
        other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
        cases: list[dict[str, str]] = [
            {},
            {"webhook-signature": "v1,AAAA"},
            {"webhook-signature": "garbage"},
            {"webhook-signature": "v1,%%%notbase64"},
            {"webhook-timestamp": "not-a-number"},
        ]
        for headers in cases:
            if not headers:
                async with session.post(url(service), data=payload) as response:
                    status, body = response.status, await response.json()
            else:
                status, body, _ = await sender.post(payload, headers=headers)
            assert status == 401, headers
            assert body["error"]["code"] == "INVALID_SIGNATURE"
            assert body["success"] is False
        status, body, _ = await sender.post(payload, secret=other)
        assert (status, body["error"]["code"]) == (401, "INVALID_SIGNATURE")
        assert service.journal is not None  # nothing of a refused request was kept
        assert await service.journal.query("SELECT count(*) FROM events") == [(0,)]


async def test_timestamp_out_of_tolerance_both_ways(
    config: Config, session: aiohttp.ClientSession
) -> None:
    """
    A timestamp too far in the past or the future gets 401 TIMESTAMP_OUT_OF_RANGE, and the
    daemon says once a minute how far off it was (every sender off alike: our clock).
    """
    async with running(config) as service:
        sender = Sender(session, url(service))
        with capture_logs() as logs:
            for skew in (-3600, 3600):
                status, body, _ = await sender.post(gst_event(), timestamp=int(time.time()) + skew)
                assert (status, body["error"]["code"]) == (401, "TIMESTAMP_OUT_OF_RANGE")
    (said,) = [e for e in logs if e["event"] == "webhook_timestamp_out_of_range"]
    assert said["source"] == "gst" and re.search(r"is \+360[01]s from now", said["detail"])


async def test_secret_rotation_accepts_both(
    tmp_path: Path, broker_url: str, exchange_name: str, session: aiohttp.ClientSession
) -> None:
    """With two secrets configured, a webhook signed with either is accepted."""
    new = "whsec_" + "bmV3LXNlY3JldC1mb3Itcm90YXRpb24tMTIzNDU2Nzg="
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[{**gst_source(), "signature": {"secrets": [WHSEC, new]}}],
    )
    async with running(config) as service:
        for secret in (WHSEC, new):
            status, _, _ = await Sender(session, url(service), secret=secret).post(gst_event())
            assert status == 200


@pytest.mark.parametrize(
    ("scheme", "secret", "header"),
    [
        ("stripe", "sk_test_stripe_like_secret", "Gst-Signature"),
        ("github", "It's a Secret to Everybody", None),
        ("hmac-sha256-hex", "plain-hmac-secret-value", "X-Gst-Signature"),
    ],
)
async def test_other_schemes_end_to_end(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    session: aiohttp.ClientSession,
    scheme: str,
    secret: str,
    header: str | None,
) -> None:
    """Every configured scheme accepts its own signature and refuses a wrong one."""
    signature: dict[str, Any] = {"scheme": scheme, "secrets": [secret]}
    if header:
        signature["header"] = header
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[{**gst_source(), "signature": signature}],
    )
    async with running(config) as service:
        sender = Sender(session, url(service), secret=secret, scheme=scheme, header=header)
        assert (await sender.post(gst_event()))[0] == 200
        assert (await sender.post(gst_event(), secret=secret + "x"))[0] == 401


async def test_body_limit(
    tmp_path: Path, broker_url: str, exchange_name: str, session: aiohttp.ClientSession
) -> None:
    """A body over max_body gets 413, announced by Content-Length or sent chunked."""
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source()],
        http={"max_body": "1KiB"},
    )
    async with running(config) as service:
        big = gst_event(data={"badge_id": "b", "user_id": "u", "badge_type": "x" * 4096})
        status, body, _ = await Sender(session, url(service)).post(big)
        assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"x" * 512

        async with session.post(url(service), data=chunks()) as response:
            assert response.status == 413


async def test_journal_full_is_503_with_retry_after(
    tmp_path: Path, session: aiohttp.ClientSession, exchange_name: str
) -> None:
    """Over the journal limit a webhook gets 503 UNAVAILABLE with Retry-After, nothing lost."""
    config = make_config(
        tmp_path,
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
        journal={"path": str(tmp_path / "j.db"), "max_pending": 2},
    )
    async with running(config) as service:
        sender = Sender(session, url(service))
        assert (await sender.post(gst_event()))[0] == 200
        assert (await sender.post(gst_event()))[0] == 200
        status, body, headers = await sender.post(gst_event())
        assert status == 503 and body["error"]["code"] == "UNAVAILABLE"
        assert int(headers["Retry-After"]) > 0
        assert service.journal is not None and service.journal.pending_count == 2


async def test_unknown_path_and_method(config: Config, session: aiohttp.ClientSession) -> None:
    """An unknown path is 404 and a GET on a webhook path is 405, both with the JSON error body."""
    async with running(config) as service:
        async with session.post(url(service, "/nope"), data=b"{}") as response:
            assert response.status == 404
            assert (await response.json())["success"] is False
        async with session.get(url(service)) as response:
            assert response.status == 405


async def test_shutting_down_is_503(config: Config, session: aiohttp.ClientSession) -> None:
    """Once shutdown has begun, webhooks get 503 with Retry-After."""
    async with running(config) as service:
        webhooks = service.transport("webhook")
        assert webhooks is not None
        webhooks.stop_intake()
        status, body, headers = await Sender(session, url(service)).post(gst_event())
        assert status == 503 and "Retry-After" in headers
        assert body["error"]["code"] == "UNAVAILABLE"


async def test_a_body_still_arriving_when_intake_stops_is_503_and_not_journaled(
    config: Config, session: aiohttp.ClientSession
) -> None:
    """
    A request already past the first check whose body is still on its way when shutdown
    begins gets 503 and is not journaled: the shutdown drain waits only for appends
    queued before intake stopped, so a later one would have been left pending.
    """
    async with running(config) as service:
        webhooks = service.transport("webhook")
        assert webhooks is not None and service.journal is not None
        body = orjson.dumps(gst_event())
        signed = sign(
            "standard-webhooks", WHSEC, body, msg_id="msg_late", timestamp=int(time.time())
        )
        half = asyncio.Event()

        async def dripped() -> AsyncIterator[bytes]:
            yield body[:100]
            half.set()
            await asyncio.sleep(0.2)  # (intake stops meanwhile)
            yield body[100:]

        async def stop_when_half_sent() -> None:
            await half.wait()
            await asyncio.sleep(0.05)
            webhooks.stop_intake()

        stopping = asyncio.create_task(stop_when_half_sent())
        async with session.post(url(service), data=dripped(), headers=signed) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "UNAVAILABLE"
        await stopping
        await service.journal.settled()
        assert service.journal.pending_count == 0
        assert await service.journal.query("SELECT count(*) FROM events") == [(0,)]


async def test_readyz_and_metrics(
    config: Config, session: aiohttp.ClientSession, tmp_path: Path, exchange_name: str
) -> None:
    """
    readyz is 200 with the broker up, 503 without (``?for=intake``: 200, webhooks are
    still journaled; 503 once intake stops); metrics carry the contract's names.
    """
    async with running(config) as service:
        admin = f"http://127.0.0.1:{service.admin_port}"
        assert service.publisher is not None
        await wait_for(lambda: service.publisher.connected, what="broker connection")  # type: ignore[union-attr]
        async with session.get(f"{admin}/readyz") as response:
            body = await response.json()
            assert response.status == 200, body
            assert (
                body["broker"]["status"] == "ok" and body["sources"]["gst"]["status"] == "listening"
            )
        await Sender(session, url(service)).post(gst_event())
        await Sender(session, url(service)).post(b"nope")
        async with session.get(f"{admin}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{admin}/metrics") as response:
            text = await response.text()
        for name in (
            'listener_events_received_total{source="gst",type="getstoken.badge.issued"} 1.0',
            'listener_events_quarantined_total{reason="invalid_json",source="gst"} 1.0',
            "listener_journal_pending",
            "listener_publish_seconds_bucket",
            "listener_event_lag_seconds_bucket",
            'listener_source_connected{source="gst"} 1.0',
            'listener_ready{check="all"} 1.0',
            'listener_ready{check="intake"} 1.0',
            'listener_event_lag_seconds_bucket{le="3600.0"}',  # (an outage's lag, not 60 s)
        ):
            assert name in text, name

    down = make_config(
        tmp_path / "down",
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
    )
    async with running(down) as service:
        ready_url = f"http://127.0.0.1:{service.admin_port}/readyz"
        async with session.get(ready_url) as response:
            assert response.status == 503
            assert (await response.json())["broker"]["status"] == "unavailable"
        # A load balancer's question: webhooks are still taken (they wait in the journal).
        async with session.get(f"{ready_url}?for=intake") as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["status"] == "degraded" and body["broker"]["status"] == "unavailable"
        assert (await Sender(session, url(service)).post(gst_event()))[0] == 200
        metrics_url = f"http://127.0.0.1:{service.admin_port}/metrics"
        async with session.get(metrics_url) as response:
            text = await response.text()
        assert 'listener_ready{check="all"} 0.0' in text  # (what the alerts read)
        assert 'listener_ready{check="intake"} 1.0' in text
        async with session.get(f"{ready_url}?for=everything") as response:
            assert response.status == 400
        for transport in service.transports:
            transport.stop_intake()  # (shutdown step 1: webhooks answer 503 from here on)
        async with session.get(f"{ready_url}?for=intake") as response:
            assert response.status == 503


async def test_slow_drip_body_is_cut_off(
    tmp_path: Path, broker_url: str, exchange_name: str, session: aiohttp.ClientSession
) -> None:
    """A body that does not arrive within read_timeout frees the connection; nothing is accepted."""
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source()],
        http={"read_timeout": "300ms"},
    )

    async def drip() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" "
            await asyncio.sleep(0.2)

    async with running(config) as service:
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url(service), data=drip()) as response:
                await response.read()
        assert time.monotonic() - started < 3
        assert service.journal is not None and service.journal.pending_count == 0
        # the service still answers
        assert (await Sender(session, url(service)).post(gst_event()))[0] == 200
