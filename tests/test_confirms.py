"""
The one confirm window (listener/broker/confirms.py) and the aiormq internals it
writes to. aiormq is pinned in pyproject.toml to the range this is tested with; when
an upgrade changes what ``send_batch`` relies on, the first test here fails naming it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from importlib.metadata import version

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from listener.broker.confirms import ConfirmWindow, Outcome, Outgoing
from listener.exceptions import PublishNacked, PublishReturned

# What send_batch() and unroute() do with an aiormq Channel, besides its public API.
CHANNEL_INTERNALS = (
    "lock",  # an async context manager held while frames are written
    "delivery_tag",  # the last delivery tag, an int we advance
    "confirmations",  # delivery tag → confirm future
    "message_id_delivery_tag",  # message_id → delivery tag, for Basic.Return
    "write_queue",  # the connection's queue of marshalled frames
    "number",  # the channel number
    "create_future",  # a future tied to the channel
    "_split_body",  # body → content frames of the negotiated frame size
)


def _fail(what: str) -> str:
    return (
        f"aiormq {version('aiormq')} changed {what}, which listener/broker/confirms.py relies on"
        " (send_batch writes frames itself): pin aiormq to the tested range in pyproject.toml"
        " or adapt send_batch"
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
    frames = list(channel._split_body(b"x" * 10))
    assert frames and all(hasattr(f, "value") for f in frames), _fail("Channel._split_body")
    assert "frames" in inspect.signature(ChannelFrame.marshall).parameters, _fail(
        "ChannelFrame.marshall"
    )


async def _publish(channel: aiormq.Channel, messages: list[Outgoing]) -> list[tuple[str, Outcome]]:
    outcomes: list[tuple[str, Outcome]] = []

    def settled(message: Outgoing, outcome: Outcome, _: float) -> None:
        outcomes.append((message.message_id, outcome))

    async with ConfirmWindow(channel, size=8, timeout=10, on_settled=settled) as window:
        for message in messages:
            await window.publish(message)
    return outcomes


def _message(message_id: str, exchange: str, key: str) -> Outgoing:
    properties = Basic.Properties(message_id=message_id, delivery_mode=2)
    return Outgoing(b"{}", exchange, key, properties)


async def test_window_settles_each_message_on_its_own(
    channel: aiormq.Channel, broker_url: str, exchange_name: str
) -> None:
    """Acks, and a return in the middle of a batch, each reach their own message; none ends the window."""
    connection = await aio_pika.connect(broker_url)
    try:
        side = await connection.channel()
        exchange = await side.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await side.declare_queue("", exclusive=True)
        await queue.bind(exchange, "routed.#")
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
