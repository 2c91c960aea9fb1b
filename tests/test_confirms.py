"""
The one confirm window (listener/broker/confirms.py) and the aiormq internals it
writes to. aiormq is pinned in pyproject.toml to the range this is tested with; when
an upgrade changes what the window relies on, the first test here fails naming it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import inspect
import os
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pydantic import SecretStr

from listener.broker import confirms
from listener.broker.confirms import ConfirmWindow, Outcome, Outgoing, Sent
from listener.broker.inflight import Kept
from listener.broker.publisher import Publisher
from listener.config import BrokerConfig
from listener.exceptions import JournalError, PublishNacked, PublishReturned
from listener.metrics import Metrics

# What ConfirmWindow does with an aiormq Channel, besides its public API.
CHANNEL_INTERNALS = (
    "lock",  # an async context manager held while frames are written
    "delivery_tag",  # the last delivery tag, an int we advance
    "confirmations",  # delivery tag → confirm future
    "message_id_delivery_tag",  # message_id → delivery tag, for Basic.Return
    "write_queue",  # the connection's queue of marshalled frames
    "number",  # the channel number
    "max_content_size",  # the largest body frame's payload (frame_max - 8)
    "closing",  # an observer future of the channel's closing
)


def _fail(what: str) -> str:
    return (
        f"aiormq {version('aiormq')} changed {what}, which listener/broker/confirms.py relies on"
        " (ConfirmWindow writes frames itself): pin aiormq to the tested range in pyproject.toml"
        " or adapt it"
    )


@pytest.fixture
async def channel(broker_url: str) -> AsyncIterator[aiormq.Channel]:
    connection = await aio_pika.connect(broker_url)
    try:
        robust = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await robust.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        yield underlay
    finally:
        await connection.close()


async def test_aiormq_internals_are_there(channel: aiormq.Channel) -> None:
    """Every private attribute the lean publish path writes to exists, with the shape it expects."""
    for name in CHANNEL_INTERNALS:
        assert hasattr(channel, name), _fail(f"Channel.{name}")
    assert hasattr(channel.lock, "__aenter__"), _fail("Channel.lock (an async context manager)")
    assert isinstance(channel.delivery_tag, int), _fail("Channel.delivery_tag")
    assert isinstance(channel.confirmations, dict), _fail("Channel.confirmations")
    assert isinstance(channel.message_id_delivery_tag, dict), _fail(
        "Channel.message_id_delivery_tag"
    )
    assert isinstance(channel.write_queue, asyncio.Queue), _fail("Channel.write_queue")
    assert isinstance(channel.max_content_size, int), _fail("Channel.max_content_size")
    assert isinstance(channel.closing, asyncio.Future), _fail("Channel.closing")
    fields = [f.name for f in dataclasses.fields(ChannelFrame)]
    assert fields[:2] == ["payload", "should_close"], _fail("ChannelFrame")
    # What aiormq calls on what waits in confirmations (confirms.Sent answers them).
    source = inspect.getsource(aiormq.Channel._confirm_delivery) + inspect.getsource(
        aiormq.Channel._on_return_frame
    )
    for call in ("confirmation.done()", "confirmation.set_result(", "confirmation.set_exception("):
        assert call in source, _fail(f"what Channel does with confirmations ({call})")
    # confirms._on_confirm_frame stands in for the channel's own, settling through its
    # _confirm_delivery; the frame reader must look it up on the instance.
    reader = inspect.getsource(aiormq.Channel._reader)
    assert "await self._on_confirm_frame(frame)" in reader, _fail(
        "how its reader hands a confirm on"
    )
    assert inspect.iscoroutinefunction(aiormq.Channel._on_confirm_frame), _fail(
        "Channel._on_confirm_frame"
    )
    assert list(inspect.signature(aiormq.Channel._confirm_delivery).parameters) == [
        "self",
        "delivery_tag",
        "frame",
    ], _fail("Channel._confirm_delivery")
    assert hasattr(channel, "__dict__"), _fail("Channel's instance attributes")


async def _publish(channel: aiormq.Channel, messages: list[Outgoing]) -> list[tuple[str, Outcome]]:
    outcomes: list[tuple[str, Outcome]] = []

    def settled(message: Sent, outcome: Outcome, _: float) -> None:
        outcomes.append((message.message_id, outcome))

    async with ConfirmWindow(channel, size=8, timeout=10, on_settled=settled) as window:
        for message in messages:
            await window.publish(message)
    return outcomes


async def _routed(connection: aio_pika.abc.AbstractConnection, exchange: str, key: str) -> None:
    """Declare ``exchange`` (auto-deleted) with a queue of this connection's bound to ``key``."""
    side = await connection.channel()
    declared = await side.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    queue = await side.declare_queue("", exclusive=True, durable=False)
    await queue.bind(declared, key)


def _message(message_id: str, exchange: str, key: str) -> Outgoing:
    properties = Basic.Properties(message_id=message_id, delivery_mode=2)
    return Outgoing(b"{}", exchange, key, properties)


async def test_window_settles_each_message_on_its_own(
    channel: aiormq.Channel, broker_url: str, exchange_name: str
) -> None:
    """Acks, and a return in the middle of a batch, each reach their own message; none ends the window."""
    connection = await aio_pika.connect(broker_url)
    try:
        await _routed(connection, exchange_name, "routed.#")
        messages = [
            _message(f"m{i}", exchange_name, "nowhere" if i == 5 else f"routed.{i}")
            for i in range(20)
        ]
        outcomes = dict(await _publish(channel, messages))
        assert set(outcomes) == {f"m{i}" for i in range(20)}
        assert isinstance(outcomes.pop("m5"), PublishReturned)
        assert all(o is None for o in outcomes.values())
        assert channel.message_id_delivery_tag == {}, "returned ids are forgotten"
    finally:
        await connection.close()


async def test_a_multiple_ack_settles_its_publishes_at_once(
    channel: aiormq.Channel, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The broker acks many publishes in one frame: they settle then and there, not through
    a loop callback per delivery tag (aiormq's way); returns among them settle as
    returns, and nothing is left in the channel's confirmations.
    """
    connection = await aio_pika.connect(broker_url)
    try:
        await _routed(connection, exchange_name, "routed.#")
        scheduled: list[object] = []
        loop = asyncio.get_running_loop()
        call_soon = loop.call_soon

        def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
            if getattr(callback, "__self__", None) is channel:  # (its _confirm_delivery)
                scheduled.append(args[0])
            return call_soon(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon", counting)
        messages = [
            _message(f"m{i}", exchange_name, "nowhere" if i % 97 == 5 else f"routed.{i}")
            for i in range(2000)
        ]
        covered: list[int] = []  # tags settled by an ack frame of a later tag
        confirm_delivery = aiormq.Channel._confirm_delivery

        def watched(self: aiormq.Channel, delivery_tag: int, frame: Any) -> None:
            if delivery_tag != frame.delivery_tag:
                covered.append(delivery_tag)
            confirm_delivery(self, delivery_tag, frame)

        monkeypatch.setattr(aiormq.Channel, "_confirm_delivery", watched)
        outcomes: dict[str, Outcome] = {}

        def settled(message: Sent, outcome: Outcome, _: float) -> None:
            outcomes[message.message_id] = outcome

        async with ConfirmWindow(channel, size=512, timeout=10, on_settled=settled) as window:
            for message in messages:
                await window.publish(message)
        assert len(outcomes) == 2000
        returned = {m for m, o in outcomes.items() if isinstance(o, PublishReturned)}
        assert returned == {f"m{i}" for i in range(2000) if i % 97 == 5}
        assert all(o is None for m, o in outcomes.items() if m not in returned)
        assert covered, "the broker sent no multiple ack: nothing was shown"
        assert scheduled == [], "settled through a loop callback per delivery tag"
        assert channel.confirmations == {}
        assert channel.message_id_delivery_tag == {}
    finally:
        await connection.close()


def _reachable(root: object, *, stop: tuple[type, ...]) -> set[int]:
    """The ids of what ``root`` holds, directly or not, without going through ``stop``'s types."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        for item in gc.get_referents(todo.pop()):
            if id(item) not in seen and not isinstance(item, stop) and not inspect.isclass(item):
                seen.add(id(item))
                todo.append(item)
    return seen


async def test_a_publish_in_flight_holds_neither_body_nor_properties(
    channel: aiormq.Channel, broker_url: str, exchange_name: str
) -> None:
    """
    Once written, a publish awaiting its confirm keeps its message_id, routing key and
    token, not its body or properties: thousands are in flight while a backlog drains.
    """
    connection = await aio_pika.connect(broker_url)
    try:
        await _routed(connection, exchange_name, "#")
        messages = [
            Outgoing(
                os.urandom(600),
                exchange_name,
                f"k.{i}",
                Basic.Properties(message_id=f"h{i}", delivery_mode=2),
                ("token", i),
            )
            for i in range(50)
        ]
        held = {id(m.body) for m in messages} | {id(m.properties) for m in messages}
        tokens: dict[str, Any] = {}

        def settled(sent: Sent, outcome: Outcome, _: float) -> None:
            assert outcome is None
            tokens[sent.message_id] = sent.token

        window = ConfirmWindow(channel, size=64, timeout=10, on_settled=settled)
        await window.send(messages)
        in_flight = [c for c in channel.confirmations.values() if isinstance(c, Sent)]
        assert in_flight, "every confirm came back before the test could look"
        for sent in in_flight:
            i = int(sent.message_id[1:])
            assert (sent.routing_key, sent.token) == (f"k.{i}", ("token", i))
            reached = _reachable(sent, stop=(ConfirmWindow, aiormq.Channel))
            assert not reached & held, f"{sent.message_id} keeps its body or properties"
        await window.drain()
        assert window.failure is None
        assert tokens == {f"h{i}": ("token", i) for i in range(50)}
    finally:
        await connection.close()


def test_what_the_publisher_keeps_in_flight_is_not_the_entry() -> None:
    """The daemon's token for a publish holds what recording its confirm needs, not the entry."""
    from listener.broker.inflight import Kept, outgoing
    from listener.broker.topology import Topology
    from listener.journal import Status, row_to_entry

    body = os.urandom(600)
    row = (7, "gst", "e7", "event", "gst.user.created", body, 1.5, 2.5, None, None)
    stored = row_to_entry(row, Status.DEFERRED)
    message = outgoing(stored, Topology("lx.kept"))
    assert (message.body, message.exchange, message.routing_key) == (
        body,
        "lx.kept",
        "gst.user.created",
    )
    assert message.token == Kept(7, True, True, "gst", "gst.user.created", "e7", 2.5)
    assert not _reachable(message.token, stop=()) & {id(stored), id(stored.entry), id(body)}
    quarantined = outgoing(
        row_to_entry((8, *row[1:3], "quarantine", *row[4:])), Topology("lx.kept")
    )
    assert quarantined.exchange == "lx.kept.quarantine"
    assert not quarantined.token.retried and not quarantined.token.event


async def test_a_nack_is_the_messages_own(
    channel: aiormq.Channel, broker_url: str, exchange_name: str
) -> None:
    """A queue that refuses (reject-publish, full) nacks: that message's outcome, the window goes on."""
    connection = await aio_pika.connect(broker_url)
    queue_name = f"{exchange_name}.full"
    try:
        side = await connection.channel()
        exchange = await side.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await side.declare_queue(
            queue_name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(exchange, "#")
        outcomes = await _publish(
            channel, [_message(f"n{i}", exchange_name, "k") for i in range(3)]
        )
        kinds = [type(o).__name__ for _, o in outcomes]
        assert kinds.count("NoneType") == 1 and kinds.count(PublishNacked.__name__) == 2, kinds
    finally:
        await side.queue_delete(queue_name)
        await connection.close()


async def test_a_closing_channel_fails_the_window_at_once(
    channel: aiormq.Channel, exchange_name: str
) -> None:
    """
    Publishing to an exchange that does not exist makes the broker close the channel:
    the window fails then, not at its 30 s deadline, and forgets what was in flight.
    """
    started = asyncio.get_running_loop().time()
    window = ConfirmWindow(channel, size=8, timeout=30)
    await window.send([_message(f"c{i}", f"{exchange_name}.absent", "k") for i in range(3)])
    while window.failure is None and asyncio.get_running_loop().time() - started < 10:
        await window.wait(0.5)
    assert window.failure is not None
    assert "channel closed" in str(window.failure)
    assert asyncio.get_running_loop().time() - started < 5
    window.cancel_outstanding()
    assert window.outstanding == 0
    # What stays in aiormq's table is settled: a late ack would be dropped quietly.
    assert all(c.done() for c in channel.confirmations.values() if isinstance(c, confirms.Sent))
    assert channel.message_id_delivery_tag == {}


def test_frames_are_pamqps_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass frame builder writes what pamqp would, and takes its fast path for events."""
    import random
    from datetime import UTC, datetime

    from listener.broker import frames

    rng = random.Random(7)
    slow = frames._pamqp_frames
    fallbacks: list[int] = []

    def counted(*args: object) -> bytes:
        fallbacks.append(1)
        return slow(*args)  # type: ignore[arg-type]  # the same arguments, passed on

    monkeypatch.setattr(frames, "_pamqp_frames", counted)
    for _ in range(600):
        headers = rng.choice([None, None, None, {"x-quarantine-reason": "schema_violation"}])
        props = Basic.Properties(
            content_type=rng.choice([None, "", "application/cloudevents+json"]),
            delivery_mode=rng.choice([None, 1, 2]),
            message_id=rng.choice([None, "", "evt_" + "x" * rng.randint(0, 60), "é" * 20]),
            message_type=rng.choice([None, "token.updated"]),
            timestamp=rng.choice([None, datetime.fromtimestamp(rng.randint(0, 2**33), UTC)]),
            app_id=rng.choice([None, "", "listener"]),
            headers=headers,
        )
        body = rng.randbytes(rng.choice([0, 1, 99, 100, 101, 350, 4000]))
        exchange = rng.choice(["", "lx", "é" * 100, "x" * 300])
        routing_key = rng.choice(["", "token.updated", "q" * 256])
        max_content = rng.choice([100, 131064])
        args = (1 + rng.randint(0, 3), max_content, exchange, routing_key, props, body)
        fast = functools.partial(
            frames.publish_frames,
            args[0],
            max_content,
            exchange=exchange,
            routing_key=routing_key,
            properties=props,
            body=body,
        )
        try:
            expected = slow(*args)
        except (ValueError, TypeError) as exc:  # a value AMQP cannot carry: pamqp says so
            with pytest.raises(type(exc)):
                fast()
            continue
        assert fast() == expected, (props, len(body), max_content)
    # An event's publish (short strings, no headers) takes the fast path once pamqp has
    # checked its exchange name.
    event = Basic.Properties(
        content_type="application/cloudevents+json",
        delivery_mode=2,
        message_id="evt_1",
        message_type="token.updated",
        timestamp=datetime.now(UTC),
        app_id="listener",
    )
    fallbacks.clear()
    for _ in range(3):
        frames.publish_frames(
            1, 131064, exchange="lx.fast", routing_key="t", properties=event, body=b"{}"
        )
    assert len(fallbacks) == 1


def test_prebuilt_event_properties_are_pamqps_bytes() -> None:
    """
    An event's properties go out in wire form built once (no pamqp object per event):
    the same bytes as marshalling ``properties_for`` with pamqp, for ids and types of
    every length and any character, and the pamqp path where one is too long.
    """
    import random

    from listener.broker import frames
    from listener.broker.topology import properties_for, publish_properties
    from listener.envelope import Entry
    from listener.journal import StoredEntry

    rng = random.Random(11)
    prebuilt = 0
    for i in range(400):
        event_id = "".join(rng.choice("aZ9_-é😀") for _ in range(rng.choice([1, 30, 200, 300])))
        key = "".join(rng.choice("ab.c") for _ in range(rng.choice([1, 20, 255])))
        stored = StoredEntry(
            i,
            Entry(
                source="s",
                event_id=event_id,
                kind=rng.choice(["event", "event", "quarantine"]),
                routing_key=key,
                body=b"{}" * rng.randint(0, 100),
                time=0.0,
                received_at=rng.uniform(0, 4e9),
                reason="bad",
            ),
        )
        wire = publish_properties(stored)
        prebuilt += isinstance(wire, frames.Prebuilt)
        frames._CHECKED.add("lx.pre")
        fast = functools.partial(
            frames.publish_frames, 1, 131064, exchange="lx.pre", routing_key=key, body=b"x"
        )
        try:
            expected = frames._pamqp_frames(1, 131064, "lx.pre", key, properties_for(stored), b"x")
        except (ValueError, TypeError) as exc:  # an id over 255 bytes: AMQP cannot carry it
            with pytest.raises(type(exc)):
                fast(properties=wire)
            continue
        assert fast(properties=wire) == expected, (event_id, key)
        assert wire.message_id == stored.entry.event_id
        if isinstance(wire, frames.Prebuilt):  # pamqp's path reads the same properties back
            assert wire.properties() == properties_for(stored)
            slow = frames._pamqp_frames(1, 131064, "lx.pre", key, wire.properties(), b"x")
            assert slow == expected, (event_id, key)
    assert 100 < prebuilt < 300  # both paths were taken


async def test_returned_messages_the_journal_cannot_set_aside_are_kept_for_the_next_flush(
    tmp_path: Any,
) -> None:
    """
    A defer that failed (the disk) dropped the returned messages: they stayed pending,
    behind the session's backlog, so they went out again only at the next session, and
    the shutdown drain waited for them in vain. Kept, they are set aside at the next flush.
    """

    class Failing:
        deferred_count = pending_count = 0

        def __init__(self) -> None:
            self.deferred: list[list[int]] = []

        def add_commit_listener(self, _: Any) -> None:
            pass

        async def defer(self, seqs: list[int], **_: Any) -> None:
            if not self.deferred:
                self.deferred.append([])
                raise JournalError("disk I/O error")
            self.deferred.append(list(seqs))

    journal = Failing()
    config = BrokerConfig(url=SecretStr("amqp://guest:guest@127.0.0.1:1/"))
    publisher = Publisher(config=config, journal=journal, metrics=Metrics())  # type: ignore[arg-type] # the part it uses
    kept = [Kept(seq, False, True, "s", "p.t", f"e{seq}", 0.0) for seq in (1, 2)]
    publisher._returned = [(k, "returned: NO_ROUTE") for k in kept]
    await publisher._flush_returned()
    assert [k.seq for k, _ in publisher._returned] == [1, 2]
    publisher._returned.append((kept[0], "returned: NO_ROUTE"))  # (sent again meanwhile)
    await publisher._flush_returned()  # (not within the second: the disk is not hammered)
    assert journal.deferred == [[]]
    publisher._defer_again_at = 0.0
    await publisher._flush_returned()
    assert journal.deferred == [[], [1, 2]] and publisher._returned == []
