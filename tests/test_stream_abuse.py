"""
A hostile stream provider (a Layerx402-compatible server that sends junk) cannot grow
the daemon without limit: junk frames count against ``journal_window`` like events, a
frame limit raised after a 1009 drops back once a frame was taken, and nothing kept in
the journal is over ``max_size``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.sources.appends import Appends
from tests.conftest import running, tap, wait_for
from tests.test_robustness import trade_with
from tests.test_streams import MINT, expected_ids, stream_config, stream_source

pytestmark = pytest.mark.usefixtures("cleanup_topology")

TRADE = {"channel": "trades", "params": {"mint": MINT}}


async def test_a_flood_of_junk_frames_is_held_to_the_journal_window(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Only event frames waited for the window: 36k junk frames a second queued appends
    without end (RSS 66 MiB to 2 GB in 45 s, webhooks waiting behind them).
    """
    most = 0
    quarantine = Appends.quarantine

    def counted(self: Appends, *args: Any, **kwargs: Any) -> None:
        nonlocal most
        quarantine(self, *args, **kwargs)
        most = max(most, len(self))

    monkeypatch.setattr(Appends, "quarantine", counted)
    async with Layerx402Simulator(rate="manual") as sim:
        config = stream_config(
            tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE], journal_window=8
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            for i in range(3000):
                sim.send_raw(f"junk {i} " + "x" * 200)
            labels = {"source": "lx", "reason": "invalid_json"}

            def kept() -> float:
                found = service.metrics.registry.get_sample_value(
                    "listener_events_quarantined_total", labels
                )
                return found or 0.0

            await wait_for(lambda: kept() >= 3000, timeout=60, what="every junk frame kept")
            assert most <= 8, most  # (before: hundreds in flight)
            assert source.connections == 1


async def test_a_raised_frame_limit_takes_one_frame_then_drops_back(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    After a 1009 the next connection took frames up to 4x max_size for as long as it
    lived, and kept each whole: a server sending 60 MiB frames filled the journal past
    its limit in 25 s (webhooks 503).
    """
    junk = "y" * 200_000  # not JSON, over the 64 KiB limit, under 4 x 64 KiB
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
    ):
        config = stream_config(
            tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE], max_size="64KiB"
        )
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            sim.send_raw(junk)  # refused (1009): a record, and a raised limit
            await wait_for(
                lambda: source.connections == 2 and source.status == "connected", what="again"
            )
            sim.send_raw(junk)  # taken on the raised limit, kept cut to max_size
            await q.wait_count(2)
            sim.send_raw(junk)  # the limit is back: refused
            await wait_for(lambda: source.connections == 3, what="third connection")
            await q.wait_count(3)
            kept = [m for m in q.messages if m.body.startswith(b"yyy")]
            assert len(kept) == 1 and len(kept[0].body) == 64 * 1024
            detail = kept[0].headers["x-quarantine-detail"]
            assert isinstance(detail, str) and "the first 65536 of 200000 bytes kept" in detail
            assert all(len(m.body) <= 64 * 1024 for m in q.messages)


def raw_trade(subscription: str, seq: int, n: int) -> bytes:
    return b'{"type":"event","subscription":"%s","channel":"trades","seq":%d,"data":%s}' % (
        subscription.encode(),
        seq,
        trade_with(b"1", n),
    )


async def test_frames_behind_the_cursor_are_journaled_not_dropped(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    One seq far ahead (2^63-1: valid, so the cursor moved there) made every later frame
    a "resend": dropped without a word, for good (the cursor is on disk). Now they are
    journaled (a true resend is dropped by its id); the cursor stays where it is.
    """
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, exchange_name) as t,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE])
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            sim.emit("trades", {"mint": MINT}, 3)
            await t.wait_count(3)
            server_id = next(iter(sim._keys[f"trades?mint={MINT}"].subscribers))
            sim.send_raw(raw_trade(server_id, 2**63 - 1, 99))
            await t.wait_count(4)
            sim.emit("trades", {"mint": MINT}, 3)  # seq 4, 5, 6
            sim.send_raw(raw_trade(server_id, 2**63 - 1, 99))  # a resend: dropped by its id
            ids = {i for ids in expected_ids(sim).values() for i in ids}
            await t.wait_ids(ids)
            await asyncio.sleep(0.3)
            assert len(t.messages) == 7
            (sub,) = source.state()["subscriptions"]
            assert sub["last_seq"] == 2**63 - 1


async def test_a_subscribe_acked_again_under_a_new_id_forgets_the_old_one(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Each new id was added beside the old: a flood of acks grew memory, and every id took events."""
    async with (
        Layerx402Simulator(rate="manual") as sim,
        tap(broker_url, exchange_name) as t,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
    ):
        config = stream_config(tmp_path, broker_url, exchange_name, sim.url, subscriptions=[TRADE])
        async with running(config) as service:
            source = stream_source(service)
            await wait_for(lambda: source.status == "connected", what="connected")
            server_id = next(iter(sim._keys[f"trades?mint={MINT}"].subscribers))
            (request_id,) = [s.request_id for s in source._subs]
            for i in range(200):
                sim.send_raw(
                    b'{"type":"subscribed","id":"%s","channel":"trades","subscription":"other-%d"}'
                    % (request_id.encode(), i)
                )
            sim.send_raw(raw_trade("other-199", 1, 1))  # the last ack's id holds
            await t.wait_count(1)
            sim.send_raw(raw_trade(server_id, 2, 2))  # the first one no longer does
            sim.send_raw(raw_trade("other-7", 3, 3))
            await q.wait_count(2)
            assert {m.headers["x-quarantine-reason"] for m in q.messages} == {
                "unknown_subscription"
            }
            assert len(t.messages) == 1
