"""
Regression tests of issue 12 (items 2, 5, 7, 9 to 16) and property tests of both
intakes: each asserts behaviour through a public interface (HTTP, AMQP, the CLI, a
module's public function) and failed before the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import structlog.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from handlers import Event
from handlers.layerx402 import PROVIDER as LAYERX402
from handlers.layerx402 import EventFrame, Unparseable, parse_frame
from listener.admin import api as admin_api
from listener.broker.publisher import SETTLE_MAX
from listener.broker.settling import DEFERRED_LOG_EVERY
from listener.config import Config
from listener.dev.devenv import write_dev_env
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.envelope import Entry, event_entry, rfc3339
from listener.journal import Journal
from listener.metrics import Metrics
from listener.ops.replay import Replay
from listener.ops.replay_request import replay_request
from listener.service import Service
from listener.sources.intake import Intake
from listener.sources.signatures import sign
from listener.sources.websocket_policy import QUICK_RECONNECT, Delays, Outcome, close_policy
from tests.conftest import config_data, make_config, running, tap, wait_for
from tests.faults import proxy
from tests.test_adminapi import Api, wait_replay
from tests.test_http_abuse import ThreadedService, exchange_sync, request, send, signed
from tests.test_replay import (
    READ_KEY,
    WRITE_KEY,
    event_at,
    ingest,
    raw_config,
    run_cli,
    target_queue,
    write_config,
)
from tests.test_streams import lx_source
from tests.test_webhooks import gst_source
from tests.webhook_sender import WHSEC, Sender, gst_event

pytestmark = pytest.mark.usefixtures("cleanup_topology")

WEBHOOK = "/webhooks/gst"


def webhook_url(service: Service) -> str:
    return f"http://127.0.0.1:{service.public_port}{WEBHOOK}"


def admin_url(service: Service, path: str) -> str:
    return f"http://127.0.0.1:{service.admin_port}{path}"


async def get_json(
    session: aiohttp.ClientSession, url: str, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(url, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


@contextlib.asynccontextmanager
async def amqp_channel(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


# -- 2: one unroutable event ----------------------------------------------------------------


async def test_unroutable_event_is_deferred_while_the_rest_flow_once(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An unroutable event is deferred (degraded, listed) while 300 others arrive once; a binding releases it."""
    raw = raw_config(tmp_path, broker_url, exchange_name, broker={"archive": {"enabled": False}})
    config = Config.model_validate(raw)
    async with (
        tap(broker_url, exchange_name, routing_key="getstoken.badge.issued") as t,
        running(config) as service,
        aiohttp.ClientSession() as session,
    ):
        journal = service.journal
        assert journal is not None
        sender = Sender(session, webhook_url(service))
        lonely = gst_event("evt_unroutable", type_="user.created", data={"user_id": "u"})
        assert (await sender.post(lonely))[0] == 200
        ids = [f"evt_routable_{i:03d}" for i in range(300)]
        results = await asyncio.gather(*(sender.post(gst_event(i)) for i in ids))
        assert [status for status, _, _ in results] == [200] * 300
        await t.wait_ids(set(ids), timeout=30)
        duplicates = {i: n for i, n in Counter(t.ids).items() if n > 1}
        assert duplicates == {}, f"{len(duplicates)} published more than once"
        await wait_for(lambda: journal.pending_count == 0, timeout=15, what="pending 0")
        assert journal.deferred_count == 1
        assert sorted(t.ids) == ids
        status, ready = await get_json(session, admin_url(service, "/readyz"))
        assert status == 200, ready
        assert ready["status"] == "degraded" and ready["broker"]["status"] == "degraded", ready
        status, listed = await Api(session, service).call(
            "GET", "/v1/events?type=getstoken.user.created"
        )
        assert status == 200
        assert [(e["id"], e["status"]) for e in listed["data"]] == [("evt_unroutable", "deferred")]
        async with tap(broker_url, exchange_name, routing_key="getstoken.user.created") as late:
            await late.wait_ids({"evt_unroutable"}, timeout=70)  # backoff caps at 60 s
            await wait_for(lambda: journal.deferred_count == 0, timeout=10, what="deferred 0")
        assert sorted(t.ids) == ids


async def test_a_drain_the_broker_returns_is_recorded_as_it_goes_and_logged_once(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    6,000 journaled events for a routing key nothing is bound to, drained through the
    default window (2,048): the broker returns each as fast as it goes, so the loop
    never runs short of room. Their deferrals are recorded in batches as they come back
    (they used to wait until the whole drain had gone, every returned message in
    memory: +64 MiB for 26,000 after a broker outage), and one ``publish_deferred``
    line at most per interval says so (it was one per flush: one per event for an
    unbound key at a steady rate).
    """
    raw = raw_config(tmp_path, broker_url, exchange_name, broker={"archive": {"enabled": False}})
    config = Config.model_validate(raw)
    now, total = time.time(), 6000
    badge = {"badge_id": "b_1", "user_id": "u_1", "badge_type": "gold"}
    entries = [
        event_entry(
            source="gst",
            provider="getstoken",
            event=Event(
                id=f"evt_ret_{i:05d}", type="getstoken.badge.issued", time=None, data=badge
            ),
            received_at=now,
        )
        for i in range(total)
    ]
    async with Journal(config=config.journal) as journal:
        await journal.append(entries)
    sizes: list[int] = []
    defer = Journal.defer

    async def counted(self: Journal, seqs: list[int], **kwargs: Any) -> None:
        sizes.append(len(seqs))
        await defer(self, seqs, **kwargs)

    monkeypatch.setattr(Journal, "defer", counted)
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        async with running(config) as service:
            live = service.journal
            assert live is not None
            await wait_for(lambda: live.deferred_count == total, timeout=30, what="all deferred")
            elapsed = time.monotonic() - started
    assert sum(sizes) >= total
    # Recorded once SETTLE_MAX wait, checked after each write: what was in flight then
    # and what that write sent (a window each at most) may come back in between.
    assert max(sizes) <= SETTLE_MAX + 2 * config.broker.confirm_window, sizes
    lines = [line for line in logs if line["event"] == "publish_deferred"]
    assert 1 <= len(lines) <= 1 + elapsed // DEFERRED_LOG_EVERY, (len(lines), elapsed)
    assert lines[0]["count"] == sizes[0]


async def test_two_rows_sharing_a_message_id_keep_their_own_fates(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Two sources may send one event id (a quarantined payload's id is its digest): one
    unroutable, one routable, journaled side by side. They never share a batch (aiormq
    finds a Basic.Return's publish by message_id), so the returned one is deferred and
    the other is published: never the other way round (a row marked published that the
    broker dropped).
    """
    raw = raw_config(tmp_path, broker_url, exchange_name, broker={"archive": {"enabled": False}})
    config = Config.model_validate(raw)
    now = time.time()

    def row(source: str, type_: str, data: dict[str, Any]) -> Entry:
        event = Event(id="evt_shared", type=f"getstoken.{type_}", time=None, data=data)
        return event_entry(source=source, provider="getstoken", event=event, received_at=now)

    badge = {"badge_id": "b_1", "user_id": "u_1", "badge_type": "gold"}
    async with Journal(config=config.journal) as journal:
        await journal.append(
            [row("other", "user.created", {"user_id": "u_1"}), row("gst", "badge.issued", badge)]
        )
    async with (
        tap(broker_url, exchange_name, routing_key="getstoken.badge.issued") as t,
        running(config) as service,
    ):
        live = service.journal
        assert live is not None
        await t.wait_ids({"evt_shared"}, timeout=15)
        await wait_for(lambda: live.deferred_count == 1, timeout=15, what="one deferred")
        # The tap can see the message before its confirm reaches the publisher and the
        # mark commits: wait for the routable row to leave pending before reading both.
        await wait_for(lambda: live.pending_count == 0, timeout=15, what="none pending")
        rows = await live.query("SELECT source, status FROM events ORDER BY source")
    assert [tuple(r) for r in rows] == [("gst", 1), ("other", 3)]
    assert t.ids == ["evt_shared"]


# -- 5: a topology that exists with other settings -------------------------------------------


async def test_archive_with_another_retention_is_a_mismatch_not_an_outage(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An archive declared with another x-max-age: events still flow, /readyz says mismatch, the state says why."""
    archive = f"{exchange_name}.archive"
    async with amqp_channel(broker_url) as channel:
        await channel.declare_queue(
            archive, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "1D"}
        )
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    async with (
        tap(broker_url, exchange_name) as t,
        running(config) as service,
        aiohttp.ClientSession() as session,
    ):
        assert (await Sender(session, webhook_url(service)).post(gst_event("evt_mm")))[0] == 200
        await t.wait_ids({"evt_mm"}, timeout=15)
        async with session.get(admin_url(service, "/readyz")) as response:
            status, text = response.status, await response.text()
        ready = orjson.loads(text)
        assert status == 200, ready
        assert ready["broker"]["status"] == "degraded"
        assert ready["broker"]["topology"]["status"] == "mismatch"
        assert "x-max-age" not in text and archive not in text  # the words stay off /readyz
        assert service.publisher is not None
        state = service.publisher.state()
        words = " ".join(state["topology"]["mismatches"])
        assert archive in words and "max_age" in words, state


async def test_exchange_of_another_type_is_a_conflict_not_an_outage(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An events exchange pre-declared direct: nothing is published, /readyz 503 'conflict' naming it, not 'unavailable'."""
    async with amqp_channel(broker_url) as channel:
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        spy = await channel.declare_queue("", exclusive=True)
        await spy.bind(exchange, "getstoken.badge.issued")
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[gst_source()],
            shutdown_timeout="500ms",
        )
        async with running(config) as service, aiohttp.ClientSession() as session:
            publisher, journal = service.publisher, service.journal
            assert publisher is not None and journal is not None
            await wait_for(
                lambda: publisher.state()["status"] == "conflict", timeout=15, what="conflict"
            )
            assert (await Sender(session, webhook_url(service)).post(gst_event("evt_c")))[0] == 200
            status, ready = await get_json(session, admin_url(service, "/readyz"))
            assert status == 503, ready
            assert ready["broker"]["status"] == "conflict", ready
            assert ready["broker"]["topology"]["status"] == "conflict"
            state = publisher.state()
            assert f"exchange {exchange_name!r}" in " ".join(state["topology"]["conflicts"]), state
            assert journal.pending_count == 1
            assert await spy.get(fail=False) is None


# -- 7: admin reads beside the publisher; keyset pages ----------------------------------------


def fill_journal(path: Path, rows: int) -> None:
    """Add ``rows`` published events to the journal file (another connection, WAL)."""
    now = time.time()
    types = ["getstoken.badge.issued", "getstoken.user.created", "getstoken.token.minted"]
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn, conn:
        conn.executemany(
            "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at,"
            " status, published_at) VALUES ('gst', ?, 'event', ?, ?, ?, ?, 1, ?)",
            (
                (f"evt_fill_{i:06d}", types[i % 3], b'{"n":%d}' % i, now - 3600 + i / 100, now, now)
                for i in range(rows)
            ),
        )


async def test_admin_queries_never_hold_up_pending_and_keyset_pages_match(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 100k rows, unfiltered /v1/events queries never delay journal.pending(); `after` pages equal offset pages."""
    config = Config.model_validate(raw_config(tmp_path, broker_url, exchange_name))
    async with running(config) as service, aiohttp.ClientSession() as session:
        journal = service.journal
        assert journal is not None
        await asyncio.to_thread(fill_journal, Path(config.journal.path), 100_000)
        api = Api(session, service)

        # Keyset paging returns what offset paging returns.
        status, by_offset = await api.call("GET", "/v1/events?limit=100&offset=5000")
        assert status == 200
        _, previous = await api.call("GET", "/v1/events?limit=1&offset=4999")
        _, by_key = await api.call(
            "GET", f"/v1/events?limit=100&after={previous['data'][0]['seq']}"
        )
        assert [e["id"] for e in by_key["data"]] == [e["id"] for e in by_offset["data"]]
        assert len(by_key["data"]) == 100

        # Several unfiltered reads keep the admin side busy; pending() must not queue behind them.
        spans: list[list[float]] = []
        busy = asyncio.Event()
        original = journal.query
        readers = 6

        async def timed(sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
            span = [time.monotonic(), 0.0]
            if "GROUP BY" in sql:
                spans.append(span)
                if len(spans) == readers:
                    busy.set()
            try:
                return await original(sql, args)
            finally:
                span[1] = time.monotonic()

        monkeypatch.setattr(journal, "query", timed)
        reads = [asyncio.create_task(api.call("GET", "/v1/events")) for _ in range(readers)]
        async with asyncio.timeout(30):
            await busy.wait()
        queued = list(spans)
        await journal.pending(after_seq=0, limit=10)
        pending_done = time.monotonic()
        answers = await asyncio.gather(*reads)
        assert all(
            status == 200 and body["pagination"]["total"] == 100_000 for status, body in answers
        )
        admin_done = max(end for _, end in queued)
        # Before: the publisher's reader thread served these admin queries too, so
        # pending() returned only after every one queued ahead of it.
        assert pending_done < admin_done, (
            f"pending() returned {pending_done - admin_done:.3f}s after the admin queries"
            f" queued before it; they took {[round(e - s, 3) for s, e in queued]}"
        )


# -- 9: metric cardinality --------------------------------------------------------------------


async def test_unknown_event_types_share_one_metric_label(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """300 unknown event types add at most one series (type 'other') to listener_events_received_total."""
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        sender = Sender(session, webhook_url(service))
        known = [gst_event(f"evt_known_{i}") for i in range(3)]
        unknown = [
            gst_event(f"evt_odd_{i}", type_=f"odd.kind{i}", data={"n": i}) for i in range(300)
        ]
        results = await asyncio.gather(*(sender.post(p) for p in known + unknown))
        assert all(
            status == 200 and not body["data"].get("quarantined") for status, body, _ in results
        )
        async with session.get(admin_url(service, "/metrics")) as response:
            text = await response.text()
    series = [
        line
        for line in text.splitlines()
        if line.startswith("listener_events_received_total{") and 'source="gst"' in line
    ]
    assert len(series) <= 9, f"{len(series)} series: {series[:5]}"  # 8 known types + other
    values = {
        line.split('type="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in series
    }
    assert values.get("other") == 300.0, values
    assert values.get("getstoken.badge.issued") == 3.0, values


# -- 10: replay targets, rate floor, cancel ---------------------------------------------------


async def test_replay_refuses_own_and_broker_targets_and_can_be_cancelled(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Reserved, amq.* and over-long targets and a near-zero rate are 400 (CLI: exit 2); DELETE cancels a replay."""
    raw = raw_config(tmp_path, broker_url, exchange_name)
    config, config_file = Config.model_validate(raw), write_config(tmp_path, raw)
    queue = f"{exchange_name}.replay"
    bad_queues = [f"{exchange_name}.archive", f"{exchange_name}.quarantine", "amq.foo", "q" * 300]
    bad_exchanges = [f"{exchange_name}.quarantine", "amq.topic"]
    async with (
        running(config) as service,
        aiohttp.ClientSession() as session,
        target_queue(broker_url, queue),
    ):
        api = Api(session, service)
        await ingest(service, [event_at(i, minute=i / 10, prefix="rpl") for i in range(200)])
        for field, names in (("to_queue", bad_queues), ("to_exchange", bad_exchanges)):
            for name in names:
                status, body = await api.call(
                    "POST", "/v1/replays", WRITE_KEY, {"since": "2h", field: name}
                )
                assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (
                    field,
                    name,
                    status,
                    body,
                )
        status, body = await api.call(
            "POST", "/v1/replays", WRITE_KEY, {"since": "2h", "to_queue": queue, "rate": 1e-9}
        )
        assert status == 400, body

        cli = [("--to-queue", name) for name in bad_queues] + [
            ("--to-exchange", n) for n in bad_exchanges
        ]
        outcomes = await asyncio.gather(
            *(
                run_cli("replay", "--config", str(config_file), "--since", "2h", option, name)
                for option, name in cli
            )
        )
        for (option, name), (code, out, err) in zip(cli, outcomes, strict=True):
            assert code == 2 and "Traceback" not in err, (option, name[:40], code, out, err)

        status, body = await api.call(
            "POST", "/v1/replays", WRITE_KEY, {"since": "2h", "to_queue": queue, "rate": 1}
        )
        assert status == 201, body
        replay_id = body["data"]["id"]
        status, body = await api.call("DELETE", f"/v1/replays/{replay_id}", READ_KEY)
        assert status == 403, body
        status, body = await api.call("DELETE", f"/v1/replays/{replay_id}", WRITE_KEY)
        assert status == 200, body
        final = await wait_replay(api, replay_id)
        assert final["state"] == "cancelled" and final["published"] < 200, final


# -- 11: a broker password with URL delimiters ------------------------------------------------


async def test_check_config_refuses_an_unencoded_password_without_echoing_it(
    tmp_path: Path,
) -> None:
    """A broker password with an unencoded '#', '/' or '?': exit 2 naming broker.url, says percent-encode, never prints it."""
    files = []
    for n, char in enumerate("#/?"):
        raw = config_data(tmp_path, broker_url=f"amqp://guest:Zq9{char}Wx7Lp@127.0.0.1:5672/")
        (tmp_path / f"c{n}").mkdir()
        files.append(write_config(tmp_path / f"c{n}", raw))
    outcomes = await asyncio.gather(*(run_cli("check-config", "--config", str(f)) for f in files))
    for char, (code, out, err) in zip("#/?", outcomes, strict=True):
        text = out + err
        assert code == 2, (char, text)
        assert "broker.url" in text and "percent-encode" in text, (char, text)
        assert "Zq9" not in text and "Wx7Lp" not in text, (char, text)
        assert "Traceback" not in text


# -- 12: a header that is not UTF-8 -----------------------------------------------------------


async def test_non_utf8_authorization_header_is_401(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An Authorization header holding bytes that are not UTF-8 gets 401 with the error body, never a 500."""
    config = Config.model_validate(raw_config(tmp_path, broker_url, exchange_name))
    async with running(config) as service:
        assert service.admin_port is not None
        for value in (b"Bearer \xff\xfe" + READ_KEY.encode(), b"\xc3\x28 \x80"):
            data = request("GET", "/v1/sources").replace(
                b"\r\n\r\n", b"\r\nAuthorization: " + value + b"\r\n\r\n", 1
            )
            reply = await send(service.admin_port, data)
            assert reply.status == 401, (value, reply)
            assert reply.json()["error"]["code"] == "UNAUTHORIZED"


# -- 13: archive replay: a pause is not the end; bounded dedupe ------------------------------


async def fill_archive(url: str, queue: str, event_ids: list[str]) -> None:
    """Declare ``queue`` as a stream and append a CloudEvent per id (confirmed)."""
    moment = rfc3339(datetime.now(UTC) - timedelta(minutes=5))
    async with amqp_channel(url) as channel:
        await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "1h"}
        )
        stamp = datetime.now(UTC) - timedelta(seconds=2)
        for start in range(0, len(event_ids), 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(
                                {
                                    "specversion": "1.0",
                                    "id": event_id,
                                    "source": "gst",
                                    "type": "getstoken.badge.issued",
                                    "time": moment,
                                    "datacontenttype": "application/json",
                                    "provider": "getstoken",
                                    "data": {"n": event_id},
                                }
                            ),
                            message_id=event_id,
                            timestamp=stamp,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue,
                    )
                    for event_id in event_ids[start : start + 500]
                )
            )


def archive_dry_run(exchange: str) -> Any:
    return replay_request(since="1h", origin="archive", dry_run=True, exchange=exchange)


async def test_archive_replay_is_not_ended_by_a_pause_in_deliveries(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """An archive read paused 1.5 s mid-stream still reads to the end: state completed, every event counted."""
    ids = [f"evt_arc_{i:05d}" for i in range(3000)]  # more than the reader's prefetch (2000)
    await fill_archive(broker_url, f"{exchange_name}.archive", ids)
    async with proxy("127.0.0.1", 5672) as p:
        config = make_config(
            tmp_path,
            broker_url=p.url("amqp", "/", "guest:guest"),
            exchange=exchange_name,
            broker={"heartbeat": "30s", "publish_timeout": "20s"},
        )
        paused: list[float] = []

        def pause_once(status: Any) -> None:
            if not paused and status.matched > 0:
                paused.append(time.monotonic())
                p.blackhole()  # the acks and the deliveries behind them wait
                asyncio.get_running_loop().call_later(1.5, p.restore)

        async with Replay(
            archive_dry_run(exchange_name),
            broker=config.broker,
            journal=None,
            on_progress=pause_once,
        ) as run:
            status = await run.run()
    assert paused
    assert status.state == "completed" and status.matched == 3000, status.as_dict()


async def test_archive_replay_remembers_a_bounded_number_of_ids(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archive dedupe remembers the last SEEN_MAX ids: a near repeat is dropped, one older than that is not held."""
    import listener.broker.archive as archive

    monkeypatch.setattr(archive, "SEEN_MAX", 10)
    ids = [f"evt_seen_{i:02d}" for i in range(30)]
    await fill_archive(broker_url, f"{exchange_name}.archive", [*ids, ids[-1], ids[0]])
    config = make_config(tmp_path, broker_url=broker_url, exchange=exchange_name)
    async with Replay(archive_dry_run(exchange_name), broker=config.broker, journal=None) as run:
        status = await run.run()
    assert status.state == "completed"
    # ids[-1] again (just seen) is dropped; ids[0] again (30 ids back) is no longer remembered.
    assert status.matched == 31, status.as_dict()


# -- 14: a corrupt journal file ---------------------------------------------------------------


async def test_corrupt_journal_exits_2_with_one_line_naming_the_file(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """`listener run` on a journal that is not a database exits 2, one line naming the file and 'move it aside'."""
    journal = tmp_path / "journal.db"
    journal.write_bytes(b"this is not a database, just bytes\n" * 512)
    config_file = write_config(
        tmp_path, config_data(tmp_path, broker_url=broker_url, exchange=exchange_name)
    )
    code, out, err = await run_cli("run", "--config", str(config_file), timeout=30)
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "move it aside" in line]
    assert len(lines) == 1 and str(journal) in lines[0], text


# -- 15: tombstones outlive retention ---------------------------------------------------------


async def test_github_webhook_replayed_after_retention_is_still_a_duplicate(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A captured github-scheme request sent again after its row was pruned is a duplicate, not published again."""
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[gst_source(scheme="github")],
        journal={"path": str(tmp_path / "journal.db"), "retention": "1s", "dedupe_window": "1h"},
    )
    body = orjson.dumps(gst_event("evt_captured"))
    headers = sign("github", WHSEC, body, msg_id="m", timestamp=int(time.time()))
    async with (
        tap(broker_url, exchange_name) as t,
        running(config) as service,
        aiohttp.ClientSession() as session,
    ):
        journal = service.journal
        assert journal is not None

        async def post() -> tuple[int, Any]:
            async with session.post(webhook_url(service), data=body, headers=headers) as response:
                return response.status, orjson.loads(await response.read())

        status, answer = await post()
        assert status == 200 and answer["data"]["duplicate"] is False, answer
        await t.wait_ids({"evt_captured"})
        await wait_for(lambda: journal.pending_count == 0, what="published")
        assert await journal.prune(now=time.time() + 10) >= 1
        status, answer = await post()
        assert status == 200 and answer["data"]["duplicate"] is True, answer
        sender = Sender(session, webhook_url(service), scheme="github")
        assert (await sender.post(gst_event("evt_after")))[0] == 200
        await t.wait_ids({"evt_after"})
        assert t.ids.count("evt_captured") == 1


# -- 16: hardening ----------------------------------------------------------------------------


def test_dev_env_is_created_private_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.env` is created with mode 0600 by the open itself: never world-readable, even before a chmod."""
    first = tmp_path / "a" / ".env"
    first.parent.mkdir()
    assert write_dev_env(first)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    # With a permissive umask and chmod doing nothing, what remains is the mode the file
    # was created with: the mode it had from its first instant.
    for name in ("chmod", "fchmod", "lchmod"):
        monkeypatch.setattr(os, name, lambda *_, **__: None, raising=False)
    second = tmp_path / "b" / ".env"
    second.parent.mkdir()
    umask = os.umask(0)
    try:
        assert write_dev_env(second)
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(second.stat().st_mode)
    assert mode == 0o600, f"created as {oct(mode)}, made private only afterwards"


def test_dev_env_keeps_what_an_existing_file_says(tmp_path: Path) -> None:
    """
    An ``export NAME=`` line counts (a second value was appended and won when sourced);
    a last line without its newline stays its own (the first new secret was glued onto
    it); a file made 0644 by hand becomes 0600.
    """
    env = tmp_path / ".env"
    env.write_text("export GST_WEBHOOK_SECRET=whsec_mine\nRABBITMQ_URL=amqp://h/")
    env.chmod(0o644)
    added = write_dev_env(env)
    assert "GST_WEBHOOK_SECRET" not in added and "LAYERX402_API_KEY" in added
    lines = env.read_text().splitlines()
    assert lines[:2] == ["export GST_WEBHOOK_SECRET=whsec_mine", "RABBITMQ_URL=amqp://h/"]
    assert all(line.count("=") >= 1 and "/GST" not in line for line in lines)
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert write_dev_env(env) == []


def test_a_read_only_dev_env_is_read_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `.env` its owner made read-only (0400) still starts `make run` when it is complete."""
    env = tmp_path / ".env"
    write_dev_env(env)
    complete = env.read_text()
    real_open = os.open

    def no_writing(path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_writing)
    assert write_dev_env(env) == []
    env.write_text("\n".join(complete.splitlines()[:-1]) + "\n")  # (one secret short)
    with pytest.raises(PermissionError, match="is read-only"):
        write_dev_env(env)


def test_dev_env_written_twice_at_once_has_one_value_each(tmp_path: Path) -> None:
    """`make run` beside `make simulate` on a fresh clone: both end with the same secrets."""
    env = tmp_path / ".env"
    for _ in range(20):
        env.unlink(missing_ok=True)
        start = threading.Barrier(6)

        def write(start: threading.Barrier = start) -> None:
            start.wait()
            write_dev_env(env)

        threads = [threading.Thread(target=write) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        names = [line.split("=")[0] for line in env.read_text().splitlines() if "=" in line]
        assert sorted(names) == sorted(set(names)), env.read_text()


def test_huge_retry_after_is_capped() -> None:
    """A RATE_LIMITED frame with retry_after 1e9 and close 4029 parks the source 900 s at most."""
    frame = parse_frame(
        b'{"type":"error","code":"RATE_LIMITED","message":"slow","retry_after":1e9}'
    )
    retry_after = getattr(frame, "retry_after", None)
    assert retry_after == 1e9
    outcome = Outcome(code=4029, retry_after=retry_after, lasted=1.0)
    status, delay = close_policy(
        outcome, Delays(1.0, 60.0), healthy_after=30.0, kind=LAYERX402.close_kind(4029)
    )
    assert status == "reconnecting"
    assert 0 < delay <= 900, delay


def test_a_healthy_connection_dropped_is_retried_at_once_then_backed_off() -> None:
    """
    The first reconnect after a healthy connection drops comes within a quarter second,
    jittered; a connection that fails again backs off as usual; auth failures and an
    unhealthy connection never take the quick path.
    """
    delays = Delays(1.0, 60.0)
    quick = [
        close_policy(Outcome(code=1006, lasted=31.0), delays, healthy_after=30.0)[1]
        for _ in range(50)
    ]
    assert all(0 < d <= QUICK_RECONNECT for d in quick)
    assert len({round(d, 4) for d in quick}) > 1, "jittered"
    again = close_policy(Outcome(code=1006, lasted=0.2), delays, healthy_after=30.0)[1]
    assert 0.5 <= again <= 1.0, "then the usual backoff, from reconnect.initial"
    status, delay = close_policy(
        Outcome(code=4001, lasted=31.0, unauthorized=True), Delays(1.0, 60.0), healthy_after=30.0
    )
    assert status == "unauthorized" and delay >= 0.5
    fresh = Delays(1.0, 60.0)
    assert close_policy(Outcome(code=1006, lasted=2.0), fresh, healthy_after=30.0)[1] >= 0.5


async def test_provider_error_text_stays_off_readyz(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A provider's UNAUTHORIZED message shows on /v1/sources (with a key), never on the open /readyz."""
    message = "invalid or missing api_key"
    async with Layerx402Simulator(api_keys={"another-key"}) as sim:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[lx_source(sim.url)],
            admin={"api_keys": [{"key": READ_KEY, "scopes": ["read"]}]},
        )
        async with running(config) as service, aiohttp.ClientSession() as session:
            await wait_for(lambda: sim.auth_failed >= 1, what="a refused attempt")
            sources_text = ""

            async def shows_message() -> bool:
                nonlocal sources_text
                headers = {"Authorization": f"Bearer {READ_KEY}"}
                async with session.get(admin_url(service, "/v1/sources"), headers=headers) as r:
                    sources_text = await r.text()
                return message in sources_text

            await wait_for(shows_message, what="the provider's message on /v1/sources")
            async with session.get(admin_url(service, "/readyz")) as response:
                status, text = response.status, await response.text()
            assert status == 503
            assert orjson.loads(text)["sources"]["lx"]["status"] == "unauthorized"
            assert message not in text and "UNAUTHORIZED" not in text, text


async def test_unexpected_exception_in_a_handler_is_a_json_500(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in a route handler gives 500 with the contract's JSON error body, no detail."""

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("internal detail: /var/secret")

    monkeypatch.setattr(admin_api, "select_events", broken)
    config = Config.model_validate(raw_config(tmp_path, broker_url, exchange_name))
    async with running(config) as service, aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {READ_KEY}"}
        async with session.get(admin_url(service, "/v1/events"), headers=headers) as response:
            status, kind, content = response.status, response.content_type, await response.read()
    assert status == 500 and kind == "application/json", (status, kind, content)
    body = orjson.loads(content)
    assert set(body) == {"success", "error"} and body["success"] is False
    assert set(body["error"]) == {"code", "message"}
    assert all(isinstance(v, str) and v for v in body["error"].values())
    assert b"internal detail" not in content


# -- property tests: hostile payloads into both intakes ---------------------------------------

DEEP = st.builds(
    lambda depth, obj: '{"a":' * depth + "0" + "}" * depth if obj else "[" * depth + "]" * depth,
    st.one_of(st.sampled_from([64, 255, 256, 300, 400]), st.integers(1, 400)),
    st.booleans(),
)
HUGE = st.builds(
    lambda size, unit: '"' + unit * (size // len(unit)) + '"',
    st.one_of(st.sampled_from([65_536, 150_000, 200_000]), st.integers(0, 200_000)),
    st.sampled_from(["x", "é", "\\u00e9", "\\ud800", "\\\\", "\\u0000"]),
)
NUMBERS = st.sampled_from(
    [
        "1e308",
        "-1e308",
        "1.7976931348623157e308",
        "1e309",
        "-1e309",
        str(2**64),
        str(2**63),
        str(-(2**63) - 1),
        str(10**30),
        "1e-400",
        "-0.0",
        "1" + "0" * 400,
        "4.9e-324",
        "123456789.123456789e-300",
    ]
)
DATES = st.builds(
    lambda year, month, day, hour, minute, offset: (
        f'"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:59.999999{offset}"'
    ),
    st.one_of(st.sampled_from([1, 9999]), st.integers(1, 9999)),
    st.sampled_from([1, 12]) | st.integers(1, 12),
    st.sampled_from([1, 31]) | st.integers(1, 28),
    st.sampled_from([0, 23]),
    st.sampled_from([0, 59]),
    st.sampled_from(["Z", "+23:59", "-23:59", "+00:00"]),
)
HOSTILE = st.one_of(DEEP, HUGE, NUMBERS, DATES, NUMBERS.map(lambda n: f'"{n}"'))


def obj(fields: dict[str, str]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


def webhook_body(slot: str, value: str, created_at: str = '"2026-11-22T10:00:00Z"') -> bytes:
    """A Get Smart Token payload with ``value`` (raw JSON) at ``slot``."""
    top = {
        "id": f'"evt_{uuid.uuid4().hex}"',
        "type": '"badge.issued"',
        "created_at": created_at,
        "environment": '"production"',
    }
    data = {"badge_id": '"b"', "user_id": '"u"', "badge_type": '"gold"', "extra": '"kept"'}
    if slot == "progress":
        top["type"], data = '"achievement.progressed"', {"achievement_id": '"a"', "user_id": '"u"'}
    if slot == "amount":
        top["type"], data = '"token.minted"', {"tx_id": '"t"', "user_id": '"u"'}
    if slot in top:
        top[slot] = value
    else:
        data[slot] = value
    return obj({**top, "data": value if slot == "data" else obj(data)}).encode()


webhook_bodies = st.builds(
    webhook_body,
    st.sampled_from(["extra", "user_id", "data", "created_at", "progress", "amount", "id"]),
    HOSTILE,
    DATES,
)


MS = st.sampled_from(
    [
        "-62135596800000",
        str(-62135596800000 - 86_340_000),
        "253402300799999",
        str(253402300799999 + 86_340_000),
        str(2**63),
        str(-(2**63)),
        str(2**64),
        str(10**30),
        "1e308",
        "1e-400",
        "-1",
    ]
)


def stream_frame(slot: str, value: str, ts: str = "1764000000000") -> bytes:
    """A Layerx402 trade event frame with ``value`` (raw JSON) at ``slot``."""
    data = {
        "signature": f'"sig_{uuid.uuid4().hex}"',
        "mint": '"M1"',
        "side": '"buy"',
        "amount": '"1.5"',
        "price_usd": '"2.25"',
        "wallet": '"w1"',
        "ts": ts,
        "extra": '"kept"',
    }
    frame = {"type": '"event"', "subscription": '"sub1"', "channel": '"trades"', "seq": "7"}
    if slot == "seq":
        frame["seq"] = value
    elif slot != "data":
        data[slot] = value
    return obj({**frame, "data": value if slot == "data" else obj(data)}).encode()


stream_frames = st.builds(
    stream_frame,
    st.sampled_from(["seq", "ts", "amount", "price_usd", "extra", "data", "signature"]),
    st.one_of(HOSTILE, MS),
    MS,
)


METRICS = Metrics()
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def test_hostile_signed_webhooks_never_get_a_5xx(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Signed webhooks nested 400 deep, 200 KB strings, years 1/9999 ±23:59, extreme numbers: 200 or 4xx, never 5xx."""
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    with ThreadedService(config) as service:
        port = service.public_port
        assert port is not None

        @PROPERTY
        @given(body=webhook_bodies)
        @example(body=webhook_body("created_at", '"9999-12-31T23:59:59-23:59"'))
        @example(body=webhook_body("created_at", '"0001-01-01T00:00:00+23:59"'))
        @example(body=webhook_body("extra", "[" * 400 + "]" * 400))
        @example(body=webhook_body("data", '{"a":' * 300 + "0" + "}" * 300))
        @example(body=webhook_body("amount", "1e308"))
        @example(body=webhook_body("progress", "1e-400"))
        @example(body=webhook_body("extra", str(10**30)))
        @example(body=webhook_body("extra", '"' + "x" * 200_000 + '"'))
        def check(body: bytes) -> None:
            status = exchange_sync(port, request("POST", WEBHOOK, body, signed(body)))
            assert status == 200 or 400 <= status < 500, (status, body[:300])

        check()


@PROPERTY
@given(raw=stream_frames)
@example(raw=stream_frame("extra", "[" * 300 + "]" * 300))
@example(raw=stream_frame("extra", "[" * 400 + "]" * 400))
@example(raw=stream_frame("ts", "253402300799999"))
@example(raw=stream_frame("ts", str(-62135596800000 - 86_340_000)))
@example(raw=stream_frame("extra", str(2**64)))
@example(raw=stream_frame("seq", str(2**63)))
@example(raw=stream_frame("extra", '"' + "x" * 200_000 + '"'))
def test_hostile_stream_frames_always_become_an_entry(raw: bytes) -> None:
    """parse_frame + Intake.build never raise on hostile frames and always give a journal Entry."""
    intake = Intake(
        source="lx", provider="layerx402", metrics=METRICS, known_types=tuple(LAYERX402.data_models)
    )
    frame = parse_frame(raw)
    assert isinstance(frame, EventFrame | Unparseable), frame
    result = frame.result if isinstance(frame, EventFrame) else frame.verdict
    entry = intake.build(result, raw=raw, received_at=time.time())
    assert isinstance(entry, Entry)
    if entry.kind == "event":
        assert isinstance(result, Event)
        assert orjson.loads(entry.body)["id"] == entry.event_id
