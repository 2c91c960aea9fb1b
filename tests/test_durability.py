"""Nothing acknowledged is lost: broker outages, SIGKILL, SIGTERM; and no secret in logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from listener.config import JournalConfig
from listener.config_loader import secret_values
from listener.journal import Journal
from listener.logs import configure_logging
from listener.service import REPEAT_IGNORED, Service
from tests.conftest import BROKER_HOST, BROKER_PORT, Tap, make_config, running, tap, wait_for
from tests.faults import TcpProxy, proxy
from tests.process import ListenerProcess
from tests.test_webhooks import gst_source
from tests.webhook_sender import WHSEC, Sender, gst_event

pytestmark = pytest.mark.usefixtures("cleanup_topology")


async def post_many(sender: Sender, ids: list[str], concurrency: int = 16) -> set[str]:
    """Post every id; return the ids answered 2xx (the ledger of acknowledged events)."""
    acknowledged: set[str] = set()
    queue = list(ids)

    async def worker() -> None:
        while queue:
            event_id = queue.pop()
            try:
                status, _, _ = await sender.post(gst_event(event_id))
            except (aiohttp.ClientError, OSError):
                continue
            if 200 <= status < 300:
                acknowledged.add(event_id)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return acknowledged


@dataclass
class Proxied:
    """The daemon with a webhook source, its broker behind a proxy, and a tap on its exchange."""

    proxy: TcpProxy
    tap: Tap
    service: Service
    sender: Sender


@contextlib.asynccontextmanager
async def proxied(
    tmp_path: Path, broker_url: str, exchange_name: str, **broker: str
) -> AsyncIterator[Proxied]:
    """The daemon publishing through a proxy to the broker (``broker``: its settings)."""
    async with proxy(BROKER_HOST, BROKER_PORT) as p, tap(broker_url, exchange_name) as t:
        config = make_config(
            tmp_path,
            broker_url=p.url("amqp", "/", "guest:guest"),
            exchange=exchange_name,
            sources=[gst_source()],
            **({"broker": broker} if broker else {}),
        )
        async with running(config) as service, aiohttp.ClientSession() as session:
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            yield Proxied(p, t, service, sender)


async def test_broker_cut_loses_nothing(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Cutting the broker connection mid-load loses no acknowledged event; they arrive after."""
    async with proxied(tmp_path, broker_url, exchange_name) as run:
        p, t, service, sender = run.proxy, run.tap, run.service, run.sender
        first = await post_many(sender, [f"evt_a{i}" for i in range(150)])
        p.refuse()
        during = await post_many(sender, [f"evt_b{i}" for i in range(150)])
        assert service.publisher is not None
        await wait_for(lambda: not service.publisher.connected, what="disconnect")  # type: ignore[union-attr]
        away = await post_many(sender, [f"evt_d{i}" for i in range(50)])
        # With no publish session on, the journal does not hold them in memory too.
        assert service.journal is not None
        await wait_for(lambda: not service.journal.fresh, what="handoff let go")  # type: ignore[union-attr]
        p.restore()
        after = await post_many(sender, [f"evt_c{i}" for i in range(50)])
        acknowledged = first | during | away | after
        assert len(acknowledged) == 400
        await t.wait_ids(acknowledged, timeout=60)
        assert service.journal is not None
        await wait_for(lambda: service.journal.pending_count == 0, what="journal drained")  # type: ignore[union-attr]


async def test_blackholed_broker_fails_publishes_within_deadline(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A broker that stops answering fails publishes within the deadline; all arrive after."""
    async with proxied(tmp_path, broker_url, exchange_name, publish_timeout="1s", heartbeat="1s") as run:
        p, t, service, sender = run.proxy, run.tap, run.service, run.sender
        assert service.publisher is not None
        await wait_for(lambda: service.publisher.connected, what="connected")  # type: ignore[union-attr]
        p.blackhole()
        acknowledged = await post_many(sender, [f"evt_h{i}" for i in range(40)])
        assert len(acknowledged) == 40
        failures = service.metrics.publish_failures
        await wait_for(
            lambda: (
                sum(
                    s.value
                    for m in failures.collect()
                    for s in m.samples
                    if s.name.endswith("_total")
                )
                > 0
            ),
            timeout=10,
            what="a publish failure",
        )
        p.cut()
        p.restore()
        await t.wait_ids(acknowledged, timeout=60)


async def test_publishes_given_up_on_leave_their_channel_behind(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Confirms slower than publish_timeout: the session gives up on what is in flight and
    publishes it again. It did so on the same channel, whose table kept every publish
    given up on (a late ack finds it; with 200,000 pending, one window more each round)
    and which saw the same message_ids again (NOTES). A new channel is used now.
    """
    async with proxied(tmp_path, broker_url, exchange_name, publish_timeout="500ms", heartbeat="10s", connect_timeout="10s") as run:
        p, t, service, sender = run.proxy, run.tap, run.service, run.sender
        publisher = service.publisher
        assert publisher is not None
        first = await post_many(sender, [f"evt_g{i}" for i in range(5)])
        await t.wait_ids(first, timeout=20)
        channel, connection = publisher._channel, publisher._connection
        assert channel is not None
        p.delay = 0.4  # (each way: a confirm comes 0.8 s after its publish)
        slow = await post_many(sender, [f"evt_s{i}" for i in range(5)])
        await wait_for(lambda: channel.is_closed, timeout=20, what="the channel closed")
        p.delay = 0.0
        await t.wait_ids(first | slow, timeout=30)
        journal = service.journal
        assert journal is not None
        await wait_for(lambda: journal.pending_count == 0, timeout=30, what="all confirmed")
        assert publisher._channel is not channel and publisher._connection is connection


async def test_a_reconnect_whose_channel_never_opens_is_given_up_for_the_next(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    After a cut, a connection that completes its handshake but never opens a channel is
    abandoned within the connect deadline and the next one is used (the heartbeat, 30 s
    here, would take over a minute to notice it).
    """
    async with proxied(tmp_path, broker_url, exchange_name, heartbeat="30s", connect_timeout="1s", retry_max="1s") as run:
        p, t, service, sender = run.proxy, run.tap, run.service, run.sender
        assert service.publisher is not None
        await wait_for(lambda: service.publisher.connected, what="connected")  # type: ignore[union-attr]
        before = await post_many(sender, [f"evt_s{i}" for i in range(20)])
        await t.wait_ids(before, timeout=30)
        first = p.connections
        p.stall_after_frames = 3  # Connection.Start, Tune and OpenOk; no Channel.OpenOk
        p.cut()
        during = await post_many(sender, [f"evt_t{i}" for i in range(20)])
        await wait_for(lambda: p.connections >= first + 2, timeout=15, what="stalled attempts")
        p.stall_after_frames = None
        assert len(before | during) == 40
        await t.wait_ids(before | during, timeout=20)


async def test_sigkill_with_backlog_then_restart_delivers_everything(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """SIGKILL of a real listener holding a backlog loses nothing it answered 2xx."""
    async with proxy(BROKER_HOST, BROKER_PORT) as p, tap(broker_url, exchange_name) as t:
        p.refuse()
        raw: dict[str, Any] = {
            "broker": {
                "url": p.url("amqp", "/", "guest:guest"),
                "exchange": exchange_name,
                "retry_initial": "100ms",
                "retry_max": "500ms",
            },
            "journal": {"path": str(tmp_path / "journal.db")},
            "sources": [gst_source()],
        }
        listener = ListenerProcess(tmp_path, raw)
        try:
            await listener.start()
            async with aiohttp.ClientSession() as session:
                sender = Sender(session, f"{listener.webhook_url}/webhooks/gst")
                acknowledged = await post_many(sender, [f"evt_k{i}" for i in range(200)])
                # Kill while more requests are in flight: only 2xx'd ids are owed.
                racing = asyncio.create_task(post_many(sender, [f"evt_r{i}" for i in range(200)]))
                await asyncio.sleep(0.05)
                listener.kill()
                acknowledged |= await racing
                await listener.wait()
            assert len(acknowledged) >= 200
            p.restore()
            await listener.start()
            await t.wait_ids(acknowledged, timeout=60)
            assert await listener.terminate() == 0
        finally:
            await listener.stop()


async def test_sigterm_drains_and_exits_zero(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    SIGTERM publishes what the journal holds and exits 0. The events are still pending
    when it comes (the broker was away while they arrived, and is back just then): the
    drain publishes them, not the publisher's ordinary work before.
    """
    async with proxy(BROKER_HOST, BROKER_PORT) as p, tap(broker_url, exchange_name) as t:
        p.refuse()
        raw: dict[str, Any] = {
            "broker": {
                "url": p.url("amqp", "/", "guest:guest"),
                "exchange": exchange_name,
                "retry_initial": "5s",
                "retry_max": "5s",
            },
            "journal": {"path": str(tmp_path / "journal.db")},
            "sources": [gst_source()],
            "shutdown_timeout": "10s",
        }
        listener = ListenerProcess(tmp_path, raw)
        try:
            await listener.start()
            async with aiohttp.ClientSession() as session:
                sender = Sender(session, f"{listener.webhook_url}/webhooks/gst")
                acknowledged = await post_many(sender, [f"evt_t{i}" for i in range(100)])
            assert len(acknowledged) == 100
            p.restore()  # (the publisher waits out its 5 s backoff: the drain hurries it)
            assert await listener.terminate() == 0
            await t.wait_ids(acknowledged, timeout=15)
            lines = [
                json.loads(line) for line in listener.logs().splitlines() if line.startswith("{")
            ]
            started = [line for line in lines if line["event"] == "shutdown_started"]
            assert started and started[0]["pending"] == 100  # (the drain had work to do)
            assert any(line["event"] == "shutdown_drained" for line in lines)
            assert any(
                line["event"] == "shutdown_complete" and line["pending"] == 0 for line in lines
            )
            # Once started, the daemon froze what start-up built (listener.memory.settle_heap).
            assert any(line["event"] == "heap_settled" and line["frozen"] > 1000 for line in lines)
        finally:
            await listener.stop()


async def test_no_secret_in_logs(tmp_path: Path, exchange_name: str) -> None:
    """Secrets never reach log output, even when an error message carries them."""
    password = "hunter2-very-secret-password"
    config = make_config(
        tmp_path,
        broker_url=f"amqp://guest:{password}@127.0.0.1:1/",
        exchange=exchange_name,
        sources=[gst_source()],
    )
    out = io.StringIO()
    configure_logging(level="debug", fmt="json", secrets=secret_values(config), stream=out)
    try:
        async with running(config) as service, aiohttp.ClientSession() as session:
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            await sender.post(gst_event())
            await sender.post(b"garbage")
            import structlog

            url = config.broker.url.get_secret_value()
            structlog.get_logger("test").error("oops", url=url, key=WHSEC)
            # Inside structures and exceptions too (as a library's error would carry it).
            structlog.get_logger("test").error(
                "nested",
                found={"broker": {"urls": [url]}, "keys": (WHSEC,)},
                error=ConnectionError(f"connect to {url} failed"),
            )
            try:
                raise RuntimeError(f"signature {WHSEC} refused")
            except RuntimeError:
                structlog.get_logger("test").exception("raised")
            await wait_for(
                lambda: "broker_connect_failed" in out.getvalue(), what="a connect failure log"
            )
    finally:
        configure_logging(level="warning", fmt="json")
    text = out.getvalue()
    assert password not in text and WHSEC not in text
    assert '"oops"' in text and "***" in text
    assert '"nested"' in text and '"raised"' in text  # (they were logged, masked)


async def test_one_signal_delivered_twice_at_once_does_not_skip_the_drain(
    tmp_path: Path,
) -> None:
    """
    A SIGTERM sent to a process group (``timeout``, a service manager) reaches the
    daemon twice within milliseconds under ``make run`` (make passes its own on): that
    skipped the drain. A second one later still ends it.
    """
    service = Service(make_config(tmp_path))
    service.stop()
    service.stop()
    assert not service._skip_drain.is_set()
    await asyncio.sleep(REPEAT_IGNORED)
    service.stop()
    assert service._skip_drain.is_set()


async def test_a_second_sigterm_ends_the_drain_now(tmp_path: Path) -> None:
    """
    With the broker gone, SIGTERM waits shutdown_timeout for a drain that cannot end; a
    second SIGTERM (or Ctrl-C twice) did not hurry it. Now it exits 0 at once, and the
    events stay in the journal for the next start.
    """
    raw: dict[str, Any] = {
        "broker": {"url": "amqp://guest:guest@127.0.0.1:1/", "exchange": "second-sigterm"},
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": [gst_source()],
        "shutdown_timeout": "60s",
    }
    listener = ListenerProcess(tmp_path, raw)
    try:
        await listener.start()
        async with aiohttp.ClientSession() as session:
            sender = Sender(session, f"{listener.webhook_url}/webhooks/gst")
            acknowledged = await post_many(sender, [f"evt_s{i}" for i in range(5)])
        assert listener.proc is not None
        listener.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "shutdown_started" in listener.logs(), what="the drain")
        await asyncio.sleep(REPEAT_IGNORED)  # (sooner, it is taken for the same signal)
        began = time.monotonic()
        assert await listener.terminate(timeout=20) == 0
        assert time.monotonic() - began < 10  # (not the 60 s shutdown_timeout)
        assert '"shutdown_drain_incomplete"' in listener.logs()
    finally:
        await listener.stop()
    async with Journal(config=JournalConfig(path=tmp_path / "journal.db")) as journal:
        assert journal.pending_count == len(acknowledged) == 5


async def test_a_second_stop_with_appends_still_committing_does_not_say_drained(
    tmp_path: Path,
) -> None:
    """
    A second stop while accepted events were still on their way into the journal logged
    ``shutdown_drained``: nothing was pending *yet*. They commit a moment later, as
    pending, and go out at the next start, which the log now says.
    """
    config = make_config(
        tmp_path, broker_url="amqp://guest:guest@127.0.0.1:1/", sources=[gst_source()]
    )
    with structlog.testing.capture_logs() as logs:
        async with running(config) as service, aiohttp.ClientSession() as session:
            journal = service.journal
            assert journal is not None
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            async with journal._writing:  # the append waits for the commit before it
                posted = asyncio.create_task(sender.post(gst_event()))
                await wait_for(lambda: journal.appending == 1, what="the append queued")
                service.stop()
                await asyncio.sleep(REPEAT_IGNORED)  # (sooner, the same signal twice)
                service.stop()
                await wait_for(
                    lambda: any(e["event"].startswith("shutdown_drain") for e in logs),
                    what="the drain's end",
                )
                assert journal.pending_count == 0  # (not committed yet)
            assert (await posted)[0] == 200
    events = [e["event"] for e in logs]
    assert "shutdown_drain_incomplete" in events and "shutdown_drained" not in events
    (incomplete,) = [e for e in logs if e["event"] == "shutdown_drain_incomplete"]
    assert incomplete["pending"] == 1  # (the one still committing)
    (complete,) = [e for e in logs if e["event"] == "shutdown_complete"]
    assert complete["pending"] == 1 and journal.appending == 0
