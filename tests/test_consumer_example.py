"""
The consumer example (``examples/consumer.py``) end to end against the real service:
binding by pattern, manual acks, a transient failure retried, a poison message
dead-lettered, and a replay's copies recognised as duplicates.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from examples.consumer import Consumer, Permanent, RecentIds
from tests.conftest import make_config, running, wait_for
from tests.test_replay import replay
from tests.test_webhooks import gst_source
from tests.webhook_sender import Sender, gst_event

BADGE = {"badge_id": "b", "user_id": "u", "badge_type": "gold"}


def test_recent_ids_are_bounded() -> None:
    """The id store keeps the newest ids only, so memory stays bounded."""
    ids = RecentIds(size=3)
    for n in range(5):
        ids.add(f"e{n}")
    assert len(ids) == 3
    assert "e0" not in ids and "e1" not in ids and "e4" in ids
    ids.add("e2")  # seen again: the newest now
    ids.add("e5")
    assert "e2" in ids and "e3" not in ids


async def _delete(url: str, queues: list[str], exchanges: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


@pytest.mark.usefixtures("cleanup_topology")
async def test_consumer_example_end_to_end(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Each bound event is handled once; the poison one is dead-lettered; a replay only adds duplicates."""
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    calls: Counter[str] = Counter()
    handled: list[tuple[str, bool]] = []

    async def handle(event: dict[str, Any], replayed: bool) -> None:
        calls[event["id"]] += 1
        if event["id"] == "evt_poison":
            raise Permanent("this one can never be processed")
        if event["id"] == "evt_flaky" and calls["evt_flaky"] <= 2:
            raise RuntimeError("a transient failure (the database is restarting)")
        handled.append((event["id"], replayed))

    queue = f"{exchange_name}.consumer"
    consumer = Consumer(
        url=broker_url,
        exchange=exchange_name,
        queue=queue,
        bindings=["getstoken.badge.*"],
        handler=handle,
        prefetch=8,
    )
    try:
        async with running(config) as service, aiohttp.ClientSession() as session:
            await consumer.start()
            sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
            events = [
                gst_event("evt_1", type_="badge.issued", data=BADGE),
                gst_event("evt_2", type_="badge.revoked", data=BADGE),
                gst_event("evt_user", type_="user.created", data={"user_id": "u"}),
                gst_event("evt_poison", type_="badge.issued", data=BADGE),
                gst_event("evt_flaky", type_="badge.issued", data=BADGE),
            ]
            for event in events:
                assert (await sender.post(event))[0] == 200
            stats = consumer.stats
            await wait_for(lambda: stats.handled == 3 and stats.dead_lettered == 1, what="handled")
            assert sorted(handled) == [("evt_1", False), ("evt_2", False), ("evt_flaky", False)]
            assert stats.retried == 2 and calls["evt_flaky"] == 3
            assert "evt_user" not in calls  # not bound

            # An incident replay sends every event again: the handled ones are duplicates.
            status = await replay(config, service, since="30d", to_exchange=exchange_name)
            assert status.published == 5
            await wait_for(
                lambda: stats.duplicates == 3 and stats.dead_lettered == 2, what="replayed"
            )
            assert len(handled) == 3 and calls["evt_1"] == 1 and calls["evt_2"] == 1

        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.get_queue(f"{queue}.dead")
            letters = []
            while (message := await dead.get(fail=False, no_ack=True)) is not None:
                letters.append(message)
            assert [m.message_id for m in letters] == ["evt_poison", "evt_poison"]
            assert letters[1].headers.get("x-replayed") is True
            assert letters[0].headers["x-death"][0]["reason"] == "rejected"
            main = await channel.declare_queue(queue, passive=True)
            assert main.declaration_result.message_count == 0  # everything acknowledged
    finally:
        await consumer.close()
        await _delete(broker_url, [queue, f"{queue}.dead"], [f"{queue}.dlx"])
