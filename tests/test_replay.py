"""Replay from the journal and the archive stream: windows, type filters, dry run, rate, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml

from listener.config import Config
from listener.envelope import rfc3339
from listener.exceptions import ReplayError
from listener.journal.schema import migrate
from listener.ops.replay import Replay, ReplayStatus
from listener.ops.replay_request import replay_request
from listener.selection import TopicPattern, parse_time
from listener.service import Service
from tests import wire
from tests.conftest import BROKER_HOST, BROKER_PORT, UNIT, config_data, running, tap, wait_for
from tests.faults import proxy
from tests.test_webhooks import gst_source
from tests.webhook_sender import Sender, gst_event

pytestmark = pytest.mark.usefixtures("cleanup_topology")

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
# Event times of the test events: whole minutes from an hour ago.
BASE = float(int(time.time()) // 60 * 60 - 3600)
TYPES = ["badge.issued", "badge.revoked", "user.created", "token.minted"]
DATA = {
    "badge.issued": {"badge_id": "b", "user_id": "u", "badge_type": "gold"},
    "badge.revoked": {"badge_id": "b", "user_id": "u", "badge_type": "gold"},
    "user.created": {"user_id": "u"},
    "token.minted": {"tx_id": "t", "user_id": "u", "amount": "1.5"},
}


# -- helpers shared with test_quarantine and test_adminapi ------------------------------


def raw_config(tmp_path: Path, broker_url: str, exchange: str, **overrides: Any) -> dict[str, Any]:
    """A config file's content: ephemeral ports, a journal under tmp_path, three admin keys."""
    base: dict[str, Any] = {
        "log": {"level": "warning", "format": "json"},
        "admin": {
            "rate_limit": 100_000,
            "api_keys": [
                {"key": READ_KEY, "scopes": ["read"]},
                {"key": WRITE_KEY, "scopes": ["write"]},
                {"key": ADMIN_KEY, "scopes": ["admin"]},
            ],
        },
    }
    for key, value in overrides.items():
        base[key] = (
            {**base[key], **value}
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    sources = base.pop("sources", [gst_source()])
    return config_data(tmp_path, broker_url=broker_url, exchange=exchange, sources=sources, **base)


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``python -m listener ARGS``, output not a terminal: exit code, stdout, stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "LISTENER_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "listener",
        *args,
        env=environ,
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


def event_at(
    i: int, *, minute: float | None = None, type_: str | None = None, prefix: str = "evt"
) -> dict[str, Any]:
    """Event ``i``: its time BASE + ``minute`` (default i) minutes, its type cycling TYPES."""
    kind = type_ or TYPES[i % len(TYPES)]
    moment = datetime.fromtimestamp(BASE + 60 * (i if minute is None else minute), UTC)
    payload = gst_event(f"{prefix}_{i:04d}", type_=kind, data=DATA[kind])
    payload["created_at"] = rfc3339(moment)
    return payload


def iso(minute: float) -> str:
    return rfc3339(datetime.fromtimestamp(BASE + 60 * minute, UTC))


async def ingest(service: Service, payloads: list[dict[str, Any]]) -> None:
    """Post every payload signed, then wait until the journal has published them all."""
    async with aiohttp.ClientSession() as session:
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        results = await asyncio.gather(*(sender.post(p) for p in payloads))
    assert all(status == 200 for status, _, _ in results)
    assert service.journal is not None
    journal = service.journal
    await wait_for(lambda: journal.pending_count == 0, what="journal drained to the broker")


@contextlib.asynccontextmanager
async def target_queue(url: str, name: str) -> AsyncIterator[None]:
    """A plain queue that exists for the block (replays go into it)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=False, auto_delete=False)
        yield
        await channel.queue_delete(name)
    finally:
        await connection.close()


async def drain(url: str, name: str, exchange: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """
    Everything in queue ``name`` now (a finished replay's messages are all confirmed),
    each checked against the AsyncAPI document of the service on ``exchange``.
    """
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(name)
        messages = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
    finally:
        await connection.close()
    for message in messages:
        assert message.headers.get("x-replayed") is True
        assert wire.check(message, exchange=exchange) == [], message.message_id
    return messages


async def replay(config: Config, service: Service | None, **args: Any) -> ReplayStatus:
    """Run the replay engine in this process (as POST /v1/replays does)."""
    request = replay_request(archive_enabled=config.broker.archive.enabled, **args)
    journal = service.journal if service is not None and request.origin == "journal" else None
    async with Replay(request, broker=config.broker, journal=journal) as run:
        return await run.run()


def ids(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[str]:
    return [m.message_id or "" for m in messages]


@pytest.fixture
def setup(tmp_path: Path, broker_url: str, exchange_name: str) -> tuple[Config, Path]:
    raw = raw_config(tmp_path, broker_url, exchange_name)
    return Config.model_validate(raw), write_config(tmp_path, raw)


# -- offline ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("getstoken.badge.*", "getstoken.badge.issued", True),
        ("getstoken.badge.*", "getstoken.badge", False),
        ("getstoken.badge.*", "getstoken.badge.issued.x", False),
        ("layerx402.#", "layerx402", True),
        ("layerx402.#", "layerx402.trade", True),
        ("#", "a.b.c", True),
        ("#.trade", "layerx402.trade", True),
        ("*.badge.#", "getstoken.badge.issued", True),
        ("*.x.#", "a.b.x.c", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.b.c", True),
        ("a.#.c", "a.b.d", False),
        ("getstoken.user.created", "getstoken.user.created", True),
    ],
)
def test_topic_pattern_matches_like_a_topic_exchange(pattern: str, key: str, matches: bool) -> None:
    """Type patterns follow AMQP topic semantics: * is one word, # zero or more."""
    assert TopicPattern(pattern).matches(key) is matches


def test_times_parse_iso_and_relative() -> None:
    """Times are ISO-8601 (naive means UTC) or 15m/2h/1d before now; anything else is refused."""
    now = 1_800_000_000.0
    assert parse_time("15m", now=now) == now - 900
    assert parse_time("2h", now=now) == now - 7200
    assert parse_time("1d", now=now) == now - 86400
    assert parse_time("2026-11-22T10:00:00Z", now=now) == parse_time("2026-11-22T10:00:00", now=now)
    assert (
        parse_time("2026-11-22T11:00:00+01:00", now=now)
        == datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()
    )
    for bad in ("yesterday", "15", "-5m", "2026-13-01"):
        with pytest.raises(ValueError, match="neither ISO-8601"):
            parse_time(bad, now=now)


# -- against the broker ---------------------------------------------------------------------


async def test_journal_replay_by_cli_delivers_the_window_exactly(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """The CLI, beside a running daemon, replays exactly the window into the queue, identical but for x-replayed."""
    config, path = setup
    queue = f"{exchange_name}.replay"
    async with (
        tap(broker_url, exchange_name) as live,
        running(config) as service,
        target_queue(broker_url, queue),
    ):
        await ingest(service, [event_at(i) for i in range(30)])
        await live.wait_count(30)
        code, out, err = await run_cli(
            "replay",
            "--config",
            str(path),
            "--since",
            iso(10),
            "--until",
            iso(20),
            "--to-queue",
            queue,
        )
        assert code == 0, err
        assert (
            out.startswith("replayed 10 of 10 events from journal to queue")
            and len(out.splitlines()) == 1
        )
        got = await drain(broker_url, queue, exchange_name)
    assert sorted(ids(got)) == [f"evt_{i:04d}" for i in range(10, 20)]
    originals = {m.message_id: m for m in live.messages}
    for message in got:
        original = originals[message.message_id]
        assert message.body == original.body
        assert message.headers == {"x-replayed": True}
        for attr in ("content_type", "type", "timestamp", "delivery_mode", "app_id"):
            assert getattr(message, attr) == getattr(original, attr), attr
        assert message.routing_key == queue  # the default exchange routes by queue name


async def test_archive_replay_delivers_the_window_exactly(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """From the archive stream, only events whose time is in the window arrive, each once."""
    config, _ = setup
    queue = f"{exchange_name}.replay"
    async with running(config) as service, target_queue(broker_url, queue):
        await ingest(service, [event_at(i) for i in range(30)])
        status = await replay(
            config, None, since=iso(5), until=iso(12.5), origin="archive", to_queue=queue
        )
        got = await drain(broker_url, queue, exchange_name)
    assert status.state == "completed" and status.published == 8
    assert sorted(ids(got)) == [f"evt_{i:04d}" for i in range(5, 13)]
    assert all(m.headers == {"x-replayed": True} and m.type for m in got)


PATTERNS = [
    ("getstoken.badge.*", {"badge.issued", "badge.revoked"}),
    ("getstoken.#", set(TYPES)),
    ("*.user.created", {"user.created"}),
    ("getstoken.token.minted", {"token.minted"}),
    ("layerx402.#", set()),
]


async def test_type_filter_selects_by_pattern(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """--type takes AMQP patterns and --source narrows further; journal and archive agree."""
    config, _ = setup
    queue = f"{exchange_name}.replay"
    async with running(config) as service, target_queue(broker_url, queue):
        await ingest(service, [event_at(i) for i in range(12)])
        for pattern, expected in PATTERNS:
            journal = await replay(
                config, service, since="2h", type_=pattern, source="gst", to_queue=queue
            )
            from_journal = await drain(broker_url, queue, exchange_name)
            archive = await replay(
                config, None, since="2h", type_=pattern, origin="archive", to_queue=queue
            )
            from_archive = await drain(broker_url, queue, exchange_name)
            want = sorted(f"evt_{i:04d}" for i in range(12) if TYPES[i % 4] in expected)
            assert sorted(ids(from_journal)) == want == sorted(ids(from_archive)), pattern
            assert journal.published == archive.published == len(want), pattern
            assert {m.type for m in from_journal} == {f"getstoken.{t}" for t in expected}, pattern
        other = await replay(config, service, since="2h", source="other", to_queue=queue)
        assert other.matched == 0 and await drain(broker_url, queue, exchange_name) == []


async def test_dry_run_counts_by_type_and_publishes_nothing(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """--dry-run prints the count and a breakdown by type, and the queue stays empty."""
    config, path = setup
    queue = f"{exchange_name}.replay"
    async with running(config) as service, target_queue(broker_url, queue):
        await ingest(service, [event_at(i) for i in range(10)])
        code, out, err = await run_cli(
            "replay", "--config", str(path), "--since", "2h", "--dry-run", "--to-queue", queue
        )
        archive = await replay(config, None, since="2h", origin="archive", dry_run=True)
        assert await drain(broker_url, queue, exchange_name) == []
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "dry run: 10 events would be replayed from journal"
    assert lines[1:] == [
        "  getstoken.badge.issued\t3",
        "  getstoken.badge.revoked\t3",
        "  getstoken.token.minted\t2",
        "  getstoken.user.created\t2",
    ]
    assert archive.matched == 10 and archive.published == 0
    assert dict(archive.by_type) == {
        "getstoken.badge.issued": 3,
        "getstoken.badge.revoked": 3,
        "getstoken.token.minted": 2,
        "getstoken.user.created": 2,
    }


async def test_rate_cap_is_roughly_honoured(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """--rate 40 spaces 21 events over at least half a second (a generous lower bound)."""
    config, _ = setup
    queue = f"{exchange_name}.replay"
    async with running(config) as service, target_queue(broker_url, queue):
        await ingest(service, [event_at(i) for i in range(21)])
        started = time.monotonic()
        status = await replay(config, service, since="2h", rate=40, to_queue=queue)
        elapsed = time.monotonic() - started
        assert len(await drain(broker_url, queue, exchange_name)) == 21
    assert status.published == 21
    assert elapsed >= 0.45


async def test_replay_concurrent_with_live_ingestion(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """A CLI replay while webhooks keep arriving replays what was there, once each, and live traffic is unharmed."""
    config, path = setup
    queue = f"{exchange_name}.replay"
    async with (
        tap(broker_url, exchange_name) as live,
        running(config) as service,
        target_queue(broker_url, queue),
    ):
        await ingest(service, [event_at(i) for i in range(200)])
        stop = asyncio.Event()
        sent: list[str] = []

        async def keep_sending() -> None:
            async with aiohttp.ClientSession() as session:
                sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
                n = 0
                while not stop.is_set():
                    batch = [event_at(n + k, minute=30, prefix="live") for k in range(10)]
                    results = await asyncio.gather(*(sender.post(p) for p in batch))
                    assert all(r[0] == 200 for r in results)
                    sent.extend(p["id"] for p in batch)
                    n += 10

        sender_task = asyncio.create_task(keep_sending())
        await wait_for(lambda: len(sent) >= 50, what="live traffic flowing")
        code, out, err = await run_cli(
            "replay", "--config", str(path), "--since", "2h", "--to-queue", queue
        )
        stop.set()
        await sender_task
        await live.wait_ids(set(sent) | {f"evt_{i:04d}" for i in range(200)})
        got = ids(await drain(broker_url, queue, exchange_name))
    assert code == 0, err
    assert len(got) == len(set(got)), "a replay publishes each event once"
    old = {f"evt_{i:04d}" for i in range(200)}
    assert old <= set(got) <= old | set(sent)
    assert out.startswith(f"replayed {len(got)} of {len(got)} events")


async def test_cli_bad_arguments_exit_2_naming_the_argument(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Unparseable times, --until before --since, a missing queue and other bad arguments exit 2 naming the option."""
    raw = raw_config(tmp_path, broker_url, exchange_name)
    path = write_config(tmp_path, raw)
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        migrate(conn)
    base = ("replay", "--config", str(path))
    cases = {
        "--since": [*base, "--since", "last tuesday", "--to-queue", "q"],
        "--until": [*base, "--since", "1h", "--until", "2h", "--to-queue", "q"],
        "--to-queue": [*base, "--since", "1h", "--to-queue", f"{exchange_name}.missing"],
        "--type": [*base, "--since", "1h", "--type", "getstoken..badge", "--to-queue", "q"],
        "--rate": [*base, "--since", "1h", "--rate", "0.5", "--to-queue", "q"],
        "--from": [*base, "--since", "1h", "--from", "kafka", "--to-queue", "q"],
        "--to-exchange": [*base, "--since", "1h", "--to-exchange", f"{exchange_name}.missing"],
    }
    results = await asyncio.gather(*(run_cli(*args) for args in cases.values()))
    for option, (code, _, err) in zip(cases, results, strict=True):
        assert code == 2, (option, err)
        assert option in err and "Traceback" not in err, (option, err)
    both = await run_cli(*base, "--since", "1h", "--to-queue", "q", "--to-exchange", "x")
    neither = await run_cli(*base, "--since", "1h")
    assert both[0] == neither[0] == 2 and "--to-queue" in both[2] and "--to-queue" in neither[2]


async def test_replay_into_an_exclusive_queue_of_another_connection(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """
    A consumer's exclusive queue is locked to its connection for declares, not for
    publishes: the replay goes in. Its check used to fail with RESOURCE_LOCKED (a
    traceback, exit 1; a 500 on the admin API).
    """
    config, path = setup
    async with running(config) as service:
        await ingest(service, [event_at(i) for i in range(5)])
        consumer = await aio_pika.connect(broker_url)
        try:
            channel = await consumer.channel()
            queue = await channel.declare_queue(f"{exchange_name}.exclusive", exclusive=True)
            code, out, err = await run_cli(
                "replay", "--config", str(path), "--since", "2h", "--to-queue", queue.name
            )
            assert code == 0, err
            assert out.startswith("replayed 5 of 5 events"), out
            declared = await channel.declare_queue(queue.name, passive=True)
            assert declared.declaration_result.message_count == 5
        finally:
            await consumer.close()


async def test_a_replay_cut_off_says_how_far_it_got(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    """
    The broker connection drops mid-replay: exit 1, and the line says how many events
    were published (a long window need not be replayed from its start again).
    """
    config, _ = setup
    queue = f"{exchange_name}.replay"
    async with (
        proxy(BROKER_HOST, BROKER_PORT) as p,
        running(config) as service,
        target_queue(broker_url, queue),
    ):
        await ingest(service, [event_at(i) for i in range(30)])
        raw = raw_config(tmp_path, p.url("amqp", "/", "guest:guest"), exchange_name)
        path = tmp_path / "through-proxy.yaml"
        path.write_text(yaml.safe_dump(raw))
        cli = asyncio.create_task(
            run_cli(
                "replay",
                "--config",
                str(path),
                "--since",
                "2h",
                "--to-queue",
                queue,
                "--rate",
                "10",
            )
        )
        await asyncio.sleep(1.5)
        p.cut()
        code, _, err = await cli
    assert code == 1, err
    line = next(x for x in err.splitlines() if x.startswith("replay failed"))
    published = int(line.split(" after ")[1].split(" of ")[0])
    assert 1 <= published < 30 and " of 30 events published: " in line, line


async def test_a_replay_into_a_queue_deleted_meanwhile_fails(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """
    The broker returned every message after the queue was deleted, and the replay went
    on publishing into nothing, then said it completed (exit 0, API `completed`).
    """
    config, _ = setup
    queue = f"{exchange_name}.gone"
    async with running(config) as service:
        await ingest(service, [event_at(i, minute=i / 10) for i in range(60)])
        async with target_queue(broker_url, queue):
            request = replay_request(archive_enabled=True, since="2h", to_queue=queue, rate=20)
            run = Replay(request, broker=config.broker, journal=service.journal)
            async with run:
                task = asyncio.create_task(run.run())
                await wait_for(lambda: run.status.published >= 5, what="a few published")
                connection = await aio_pika.connect(broker_url)
                async with connection:
                    await (await connection.channel()).queue_delete(queue)
                with pytest.raises(ReplayError, match="no longer exists"):
                    await asyncio.wait_for(task, timeout=20)
            assert run.status.published < 60


async def test_an_archive_replay_whose_end_marker_is_never_confirmed_fails(
    setup: tuple[Config, Path], tmp_path: Path, exchange_name: str
) -> None:
    """
    The end marker's publish had no deadline: a broker that never confirmed it (a
    memory or disk alarm blocks publishing; here the connection goes silent) held the
    replay ``running`` for good, and with it one of the two places for running replays.
    """
    config, _ = setup
    async with proxy(BROKER_HOST, BROKER_PORT) as p, running(config) as service:
        await ingest(service, [event_at(i) for i in range(3)])
        raw = raw_config(tmp_path, p.url("amqp", "/", "guest:guest"), exchange_name)
        broker = Config.model_validate(raw).broker
        request = replay_request(archive_enabled=True, since="2h", origin="archive", dry_run=True)
        async with Replay(request, broker=broker, journal=None, stall=1.0) as run:
            p.blackhole()  # (opened and checked; from here on nothing comes back)
            began = time.monotonic()
            with pytest.raises(ReplayError, match="end marker"):
                await asyncio.wait_for(run.run(), timeout=20 * UNIT)
            p.restore()
        assert time.monotonic() - began < 10 * UNIT  # (the heartbeat's 60 s: not waited for)
    assert run.status.state == "failed" and "end marker" in (run.status.error or "")


async def test_an_archive_replay_of_a_window_yet_to_come_is_empty_at_once(
    setup: tuple[Config, Path], broker_url: str, exchange_name: str
) -> None:
    """The stream was read from a minute before `since`, past the end marker: 30 s, then a failure."""
    config, _ = setup
    async with running(config) as service:
        await ingest(service, [event_at(i) for i in range(3)])
        future = rfc3339(datetime.fromtimestamp(time.time() + 3600, UTC))
        async with asyncio.timeout(10):
            status = await replay(config, None, since=future, origin="archive", dry_run=True)
    assert status.state == "completed" and status.matched == 0
