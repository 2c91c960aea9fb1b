"""Quarantine: redrive after a handler change (webhook and stream), list, purge, CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import TypeAdapter

from handlers import Quarantine, getstoken, layerx402
from handlers.layerx402 import TradeData, event_id
from listener.config import Config
from listener.envelope import quarantine_entry, rfc3339
from listener.journal import Journal
from listener.journal.file import JournalFile
from listener.journal.queries import list_quarantined
from listener.ops.redrive import redrive
from listener.service import Service
from tests import wire
from tests.conftest import running, tap, wait_for
from tests.test_replay import raw_config, run_cli, write_config
from tests.webhook_sender import Sender, gst_event

pytestmark = pytest.mark.usefixtures("cleanup_topology")

MINT = "So11111111111111111111111111111111111111112"


class RelaxedBadge(getstoken.BadgeData):
    """badge.issued as a newer handler sees it: badge_type became optional."""

    badge_type: str | None = None  # type: ignore[assignment]  # the change under test


class RelaxedTrade(TradeData):
    """trades as a newer handler sees it: wallet became optional."""

    wallet: str | None = None  # type: ignore[assignment]  # the change under test


async def post_all(service: Service, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Post signed bodies; the data of each 200 answer."""
    async with aiohttp.ClientSession() as session:
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        answers = [await sender.post(body) for body in bodies]
    assert all(status == 200 for status, _, _ in answers)
    assert service.journal is not None
    journal = service.journal
    await wait_for(lambda: journal.pending_count == 0, what="quarantine published")
    return [body["data"] for _, body, _ in answers]


async def test_redrive_publishes_what_passes_after_a_handler_change(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a model accepts a formerly missing field, redrive publishes that event and re-labels the rest."""
    config = Config.model_validate(raw_config(tmp_path, broker_url, exchange_name))
    fixable = gst_event("evt_fixable", data={"badge_id": "b1", "user_id": "u1"})
    still_bad = gst_event("evt_still_bad", data={"badge_id": "b2"})
    async with tap(broker_url, exchange_name) as events, running(config) as service:
        answers = await post_all(
            service, [orjson.dumps(fixable), orjson.dumps(still_bad), b"{not json"]
        )
        q_fixable, q_still_bad, q_json = (a["id"] for a in answers)
        assert all(a["quarantined"] for a in answers)

        monkeypatch.setitem(getstoken.DATA_MODELS, "badge.issued", RelaxedBadge)
        # The new handler's document: what it publishes now is checked against it.
        models = {**getstoken.PROVIDER.data_models, "getstoken.badge.issued": RelaxedBadge}
        monkeypatch.setattr(getstoken.PROVIDER, "data_models", models)
        wire.register(config)
        async with JournalFile(config.journal.path, writable=True) as journal:
            report = await redrive(config, journal)
            again = await redrive(config, journal)
            rows, total = await list_quarantined(journal, limit=10)
            ((status,),) = await journal.query(
                "SELECT status FROM events WHERE event_id = ?", [q_fixable]
            )
            ((kind, published),) = await journal.query(
                "SELECT kind, status FROM events WHERE event_id = 'evt_fixable'"
            )

        assert [(row.id, entry.event_id) for row, entry in report.redriven] == [
            (q_fixable, "evt_fixable")
        ]
        failing = {row.id: verdict for row, verdict in report.failing}
        assert set(failing) == {q_still_bad, q_json}
        assert failing[q_json].reason == "invalid_json"
        assert failing[q_still_bad].reason == "schema_violation"
        assert (
            "user_id" in failing[q_still_bad].detail
            and "badge_type" not in failing[q_still_bad].detail
        )
        await events.wait_ids({"evt_fixable"})
        event = orjson.loads(events.messages[0].body)
        assert event["type"] == "getstoken.badge.issued" and event["time"] == "2026-11-22T10:00:00Z"
        assert event["data"] == fixable["data"]
        assert (status, kind, published) == (2, "event", 1)
        assert total == 2 and {r.id for r in rows} == {q_still_bad, q_json}
        assert {r.id: r.detail for r in rows}[q_still_bad] == failing[q_still_bad].detail
        assert again.redriven == [] and len(again.failing) == 2
        # The daemon carries on: nothing is pending, and new events still flow.
        assert service.journal is not None and service.journal.pending_count == 0
        await post_all(service, [orjson.dumps(gst_event("evt_after"))])
        await events.wait_ids({"evt_after"})
        assert events.ids.count("evt_fixable") == 1


async def test_redrive_stream_frame_with_the_current_frame_parser(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quarantined stream frame is re-parsed by its provider; records and unconfigured sources are skipped."""
    raw = raw_config(
        tmp_path,
        broker_url,
        exchange_name,
        sources=[
            {
                "name": "lx",
                "kind": "websocket",
                "provider": "layerx402",
                "url": "ws://127.0.0.1:9/ws",
                "api_key": "k",
            }
        ],
    )
    config = Config.model_validate(raw)
    data = {
        "signature": "sig1",
        "mint": MINT,
        "side": "buy",
        "amount": "1",
        "price_usd": "2",
        "ts": 1_767_225_600_000,
    }
    frame = orjson.dumps(
        {"type": "event", "subscription": "s1", "channel": "trades", "seq": 7, "data": data}
    )
    now = time.time()
    entries = [
        quarantine_entry(
            source="lx",
            payload=frame,
            verdict=Quarantine("schema_violation", "wallet"),
            received_at=now,
        ),
        quarantine_entry(
            source="lx",
            payload=b'{"error": "frame_too_large"}',
            verdict=Quarantine("frame_too_large", "x"),
            received_at=now,
        ),
        quarantine_entry(
            source="gone",
            payload=frame,
            verdict=Quarantine("schema_violation", "wallet"),
            received_at=now,
        ),
    ]
    async with Journal(config=config.journal) as journal:
        await journal.append(entries)
        pending = await journal.pending(after_seq=0, limit=10)
        await journal.mark_published([p.seq for p in pending], wait=True)

    monkeypatch.setitem(layerx402._ADAPTERS, "trades", TypeAdapter(RelaxedTrade))  # type: ignore[index]  # a Mapping at type level, a dict at run time
    models = {**layerx402.PROVIDER.data_models, "layerx402.trade": RelaxedTrade}
    monkeypatch.setattr(layerx402.PROVIDER, "data_models", models)
    wire.register(config)  # the redriven event is checked against the new handler's document
    async with (
        tap(broker_url, exchange_name) as events,
        JournalFile(config.journal.path, writable=True) as file,
    ):
        report = await redrive(config, file)
        expected = event_id("trades", "sig1", MINT)
        await events.wait_ids({expected})
    assert [entry.event_id for _, entry in report.redriven] == [expected]
    assert events.messages[0].routing_key == "layerx402.trade"
    assert orjson.loads(events.messages[0].body)["time"] == "2026-01-01T00:00:00Z"
    assert sorted(why for _, why in report.skipped) == [
        "frame_too_large records a loss, not a payload",
        "source 'gone' is not configured",
    ]


async def test_quarantine_cli_lists_redrives_and_purges(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """list filters by reason and limit, redrive --id re-labels, an unknown --id exits 2, purge --before deletes."""
    raw = raw_config(tmp_path, broker_url, exchange_name)
    config, path = Config.model_validate(raw), write_config(tmp_path, raw)
    async with running(config) as service:
        answers = await post_all(
            service,
            [b"{not json", b"[also not", orjson.dumps(gst_event("evt_bad", data={"user_id": "u"}))],
        )
        q_ids = [a["id"] for a in answers]
        cfg = ("--config", str(path))
        code, out, err = await run_cli("quarantine", "list", *cfg)
        assert code == 0, err
        lines = [line.split("\t") for line in out.splitlines()]
        assert [line[0] for line in lines] == q_ids
        assert [line[2] for line in lines] == ["invalid_json", "invalid_json", "schema_violation"]
        assert all(line[1] == "gst" and line[3].endswith("Z") for line in lines)
        assert "3 of 3" in err
        code, out, _ = await run_cli(
            "quarantine", "list", *cfg, "--reason", "invalid_json", "--limit", "1"
        )
        assert code == 0 and out.splitlines() == ["\t".join(lines[0])]

        code, out, err = await run_cli("quarantine", "redrive", *cfg, "--id", q_ids[2])
        assert code == 0, err
        # Not a terminal: one summary line (CONTRACT §2), no line per payload.
        assert out.splitlines() == [
            "redriven 0, already journaled 0, still quarantined 1, skipped 0"
        ]
        code, out, _ = await run_cli("quarantine", "list", *cfg, "--reason", "schema_violation")
        assert code == 0 and out.splitlines()[0].startswith(f"{q_ids[2]}\tgst\tschema_violation")
        code, _, err = await run_cli("quarantine", "redrive", *cfg, "--id", "q_nope")
        assert code == 2 and "--id" in err and "q_nope" in err

        code, out, _ = await run_cli("quarantine", "purge", *cfg, "--before", "1d")
        assert code == 0 and out.startswith("purged 0 ")
        later = rfc3339(datetime.fromtimestamp(time.time() + 60, UTC))
        code, out, _ = await run_cli("quarantine", "purge", *cfg, "--before", later)
        assert code == 0 and out.startswith("purged 3 ")
        code, out, err = await run_cli("quarantine", "list", *cfg)
        assert code == 0 and out == "" and "0 of 0" in err
        code, _, err = await run_cli("quarantine", "purge", *cfg, "--before", "soon")
        assert code == 2 and "--before" in err
