"""
The AsyncAPI 3.0 document (CONTRACT §11): valid against the official schema (vendored
under ``tests/vendor/asyncapi``), generated for exactly what a configuration publishes,
the same from the CLI and the admin port, and matching the wire (:mod:`tests.wire`:
every tapped message of the integration tests is checked against it too).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
import yaml

from handlers import getstoken, layerx402, terrapin, tokenterminal
from listener.broker.asyncapi import build_document, channel_for
from listener.config import Config
from listener.config_loader import load_config
from listener.service import Service
from tests import wire
from tests.conftest import config_data, make_config, running, tap
from tests.test_poll import bonds_source, tt_source
from tests.test_replay import ADMIN_KEY, READ_KEY, WRITE_KEY
from tests.test_streams import lx_source
from tests.test_webhooks import gst_source
from tests.webhook_sender import WHSEC, Sender, gst_event

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests/vendor/asyncapi/asyncapi-3.0.0.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)
PASSWORD = "pa55w0rd-not-for-docs"
GITHUB_SECRET = "gh-secret-0123456789abcdef"


def github_source() -> dict[str, Any]:
    return {
        "name": "gh",
        "kind": "webhook",
        "provider": "github",
        "path": "/webhooks/github",
        "signature": {"scheme": "github", "secrets": [GITHUB_SECRET]},
    }


def every_provider(tmp_path: Path, **overrides: Any) -> Config:
    """A configuration with a source of every provider (never started)."""
    return make_config(
        tmp_path,
        broker_url=f"amqps://app:{PASSWORD}@rabbit.internal:5671/prod",
        exchange="market",
        sources=[
            gst_source(),
            github_source(),
            lx_source("ws://127.0.0.1:1/ws"),
            tt_source("http://127.0.0.1:1"),
            bonds_source("http://127.0.0.1:1", ["US912810TM09"]),
        ],
        **overrides,
    )


def problems(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}"
        for e in VALIDATOR.iter_errors(document)
    ]


def test_documents_are_valid_asyncapi_3(tmp_path: Path) -> None:
    """Every provider, archive on and off, unknown types published or not: valid AsyncAPI 3.0."""
    configs = [
        every_provider(tmp_path),
        every_provider(tmp_path, broker={"archive": {"enabled": False}}),
        make_config(tmp_path, sources=[{**gst_source(), "unknown_types": "quarantine"}]),
        make_config(tmp_path),  # no source: the quarantine channel alone
    ]
    for config in configs:
        document = build_document(config)
        assert document["asyncapi"] == "3.0.0"
        assert problems(document) == []
        # Plain JSON data: what the CLI and the admin port serialise.
        assert json.loads(json.dumps(document)) == document


def test_the_validator_refuses_broken_documents(tmp_path: Path) -> None:
    """The schema check is not vacuous: each kind of damage is an error."""
    document = build_document(every_provider(tmp_path))
    damages = [
        lambda d: d["operations"]["send.layerx402.trade"].update(action="publish"),
        lambda d: d["channels"]["layerx402.trade"]["bindings"]["amqp"]["exchange"].update(
            type="bogus"
        ),
        lambda d: d["components"]["messages"]["layerx402.trade"]["bindings"]["amqp"].update(
            deliveryMode=2
        ),
        lambda d: d["components"]["schemas"]["TradeData"].update(type="objekt"),
        lambda d: d.pop("info"),
    ]
    for damage in damages:
        broken = copy.deepcopy(document)
        damage(broken)
        assert problems(broken), damage


def test_channels_are_exactly_what_the_config_publishes(tmp_path: Path) -> None:
    """One channel per routing key of the configured providers, the quarantine and the archive."""
    document = build_document(every_provider(tmp_path))
    types = {
        *getstoken.PROVIDER.data_models,
        "getstoken.{type}",  # unknown_types: publish (the default)
        "github.push",
        "github.release",
        "github.issues",
        *layerx402.PROVIDER.data_models,
        *tokenterminal.PROVIDER.data_models,
        *terrapin.PROVIDER.data_models,
    }
    channels = document["channels"]
    event_channels = {
        c["address"] for k, c in channels.items() if k not in ("quarantine", "archive")
    }
    assert event_channels == types
    for channel_id, channel in channels.items():
        if channel_id == "archive":
            amqp = channel["bindings"]["amqp"]
            assert amqp["is"] == "queue" and amqp["queue"]["name"] == "market.archive"
            assert len(channel["messages"]) == len(types)
            continue
        exchange = channel["bindings"]["amqp"]["exchange"]
        expected = "market.quarantine" if channel_id == "quarantine" else "market"
        assert exchange == {
            "name": expected,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "prod",
        }
        operation = document["operations"][f"send.{channel_id}"]
        assert operation["action"] == "send"
        assert operation["channel"] == {"$ref": f"#/channels/{channel_id}"}
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
        assert operation["bindings"]["amqp"]["mandatory"] is True
    quarantine = channels["quarantine"]
    assert quarantine["parameters"]["source"]["enum"] == ["gst", "gh", "lx", "tt", "bonds"]
    headers = quarantine["messages"]["quarantined"]["headers"]
    assert {"x-quarantine-reason", "x-quarantine-detail", "x-source"} <= set(headers["required"])
    unknown = {**gst_source(), "unknown_types": "quarantine"}
    without = build_document(
        make_config(tmp_path, sources=[unknown], broker={"archive": {"enabled": False}})
    )
    assert "getstoken.other" not in without["channels"] and "archive" not in without["channels"]


def test_payloads_are_the_envelope_around_the_handlers_models(tmp_path: Path) -> None:
    """A message's payload is the CloudEvent envelope; its data is the handler model's schema."""
    document = build_document(every_provider(tmp_path))
    messages, schemas = document["components"]["messages"], document["components"]["schemas"]
    message = messages["getstoken.badge.issued"]
    assert message["contentType"] == "application/cloudevents+json"
    assert message["headers"]["properties"]["x-replayed"]["type"] == "boolean"
    assert message["bindings"]["amqp"]["messageType"] == "getstoken.badge.issued"
    envelope = schemas["CloudEvent.getstoken.badge.issued"]
    assert set(envelope["required"]) == {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "provider",
        "data",
    }
    assert envelope["properties"]["type"]["const"] == "getstoken.badge.issued"
    assert envelope["properties"]["provider"]["const"] == "getstoken"
    assert envelope["properties"]["source"]["enum"] == ["gst"]
    data = schemas["BadgeData"]
    assert envelope["properties"]["data"] == {"$ref": "#/components/schemas/BadgeData"}
    expected = getstoken.BadgeData.model_json_schema()
    assert data["required"] == expected["required"] == ["badge_id", "user_id", "badge_type"]
    assert data["properties"] == expected["properties"]
    # A strict stream model keeps its decimal-string pattern.
    trade = schemas["TradeData"]["properties"]
    assert (
        trade["price_usd"]["pattern"]
        == layerx402.TradeData.model_json_schema()["properties"]["price_usd"]["pattern"]
    )
    assert trade["side"]["enum"] == ["buy", "sell"]


def test_server_has_no_password(tmp_path: Path) -> None:
    """The server is named with its password masked, and the password is nowhere."""
    document = build_document(every_provider(tmp_path))
    assert PASSWORD not in json.dumps(document)
    server = document["servers"]["broker"]
    assert server["host"] == "rabbit.internal:5671"
    assert server["protocol"] == "amqps" and server["protocolVersion"] == "0.9.1"
    assert "amqps://app:***@rabbit.internal:5671/prod" in server["description"]


def test_an_ipv6_server_keeps_its_brackets(tmp_path: Path) -> None:
    """`::1:5671` read as host and port either way; `[::1]:5671` does not."""
    config = make_config(tmp_path, broker_url=f"amqps://app:{PASSWORD}@[::1]/", sources=[])
    assert build_document(config)["servers"]["broker"]["host"] == "[::1]:5671"


def test_the_archive_says_it_holds_replay_markers(tmp_path: Path) -> None:
    """A consumer of the archive met empty-bodied markers the document did not mention."""
    archive = build_document(every_provider(tmp_path))["channels"]["archive"]
    assert "x-listener-marker" in archive["description"]


def test_cli_prints_json_and_yaml(tmp_path: Path) -> None:
    """`listener asyncapi` prints the document (JSON by default, --format yaml); a bad config exits 2."""
    raw = config_data(
        tmp_path, broker_url=f"amqp://app:{PASSWORD}@127.0.0.1:5672/", sources=[gst_source()]
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    expected = build_document(load_config(path))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "listener", "asyncapi", "--config", str(path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )

    as_json, as_yaml = cli(), cli("--format", "yaml")
    assert as_json.returncode == 0 and as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
    assert json.loads(as_json.stdout) == expected == yaml.safe_load(as_yaml.stdout)
    assert PASSWORD not in as_json.stdout + as_yaml.stdout + as_json.stderr
    raw["sources"][0]["signature"]["secrets"] = []
    path.write_text(yaml.safe_dump(raw))
    bad = cli()
    assert bad.returncode == 2 and "sources[0].signature.secrets" in bad.stderr


@pytest.fixture
async def service(
    tmp_path: Path, broker_url: str, exchange_name: str, cleanup_topology: None
) -> AsyncIterator[Service]:
    keys = [
        {"key": READ_KEY, "scopes": ["read"]},
        {"key": WRITE_KEY, "scopes": ["write"]},
        {"key": ADMIN_KEY, "scopes": ["admin"]},
    ]
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source()],
        admin={"api_keys": keys},
    )
    async with running(config) as running_service:
        yield running_service


async def test_admin_port_serves_the_same_document(service: Service) -> None:
    """GET /v1/asyncapi.json (scope read) is the CLI's document; no key is a 401."""
    url = f"http://127.0.0.1:{service.admin_port}/v1/asyncapi.json"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {READ_KEY}"}) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            served = orjson.loads(await response.read())
    assert served == build_document(service.config)
    assert problems(served) == []


async def test_published_messages_fit_the_document(
    service: Service, broker_url: str, exchange_name: str
) -> None:
    """A known type, an unknown type and a quarantined body each match their channel on the wire."""
    before = dict(wire.STATS)
    known = gst_event(
        "evt_known",
        type_="badge.issued",
        data={"badge_id": "b", "user_id": "u", "badge_type": "gold"},
    )
    unknown = gst_event("evt_unknown", type_="loyalty.points.granted", data={"points": 5})
    async with (
        tap(broker_url, exchange_name) as events,
        tap(broker_url, f"{exchange_name}.quarantine") as quarantined,
        aiohttp.ClientSession() as session,
    ):
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        for body in (orjson.dumps(known), orjson.dumps(unknown), b'{"not": "an event"}'):
            status, _, _ = await sender.post(body)
            assert status == 200
        await events.wait_ids({"evt_known", "evt_unknown"})
        await quarantined.wait_count(1)
    # The taps checked each message (a problem would have failed their blocks).
    assert wire.STATS["checked"] - before["checked"] == 3
    assert wire.STATS["events"] - before["events"] == 2
    document = build_document(service.config)
    assert (
        channel_for(document, exchange_name, "getstoken.loyalty.points.granted")
        == "getstoken.other"
    )
    assert (
        channel_for(document, exchange_name, "getstoken.badge.issued") == "getstoken.badge.issued"
    )


async def test_the_wire_check_finds_what_does_not_fit(
    service: Service, broker_url: str, exchange_name: str
) -> None:
    """A changed body, type, content type or an undocumented routing key is reported."""
    async with tap(broker_url, exchange_name) as events, aiohttp.ClientSession() as session:
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        body = gst_event(
            "evt_one",
            type_="badge.issued",
            data={"badge_id": "b", "user_id": "u", "badge_type": "g"},
        )
        assert (await sender.post(orjson.dumps(body)))[0] == 200
        await events.wait_count(1)
    message = events.messages[0]
    args: dict[str, Any] = {
        "content_type": message.content_type,
        "delivery_mode": 2,
        "message_type": message.type,
        "message_id": message.message_id,
        "headers": {},
    }
    assert wire.check_body(exchange_name, "getstoken.badge.issued", message.body, **args) == []
    event = orjson.loads(message.body)
    del event["data"]["badge_type"]
    found = wire.check_body(exchange_name, "getstoken.badge.issued", orjson.dumps(event), **args)
    assert found and "badge_type" in found[0]
    assert wire.check_body(
        exchange_name, "getstoken.badge.issued", message.body, **{**args, "message_id": "other"}
    )
    assert wire.check_body(
        exchange_name,
        "getstoken.badge.issued",
        message.body,
        **{**args, "content_type": "application/json"},
    )
    assert wire.check_body(
        exchange_name,
        "getstoken.badge.issued",
        message.body,
        **{**args, "headers": {"x-replayed": "yes"}},
    )
    assert wire.check_body(
        exchange_name,
        "getstoken.badge.revoked",
        message.body,
        **{**args, "message_type": "getstoken.badge.revoked"},
    )
    assert wire.check_body(
        f"{exchange_name}.quarantine",
        "nobody",
        b"x",
        **{**args, "content_type": "application/octet-stream", "message_type": "quarantine"},
    )
    assert wire.check_body("unregistered.exchange", "x", b"", **args) is None
    assert WHSEC not in json.dumps(build_document(service.config))
