"""
Reading the archive stream ``<exchange>.archive`` back (CONTRACT §4), for replay.

The archive is a RabbitMQ stream bound ``#`` to the events exchange, so it holds every
published event for ``broker.archive.max_age``, in publish order. Reading it over
AMQP 0-9-1 takes a prefetch, manual acks (credit, not removal) and an
``x-stream-offset`` (https://www.rabbitmq.com/docs/streams#consuming).

* Start: the offset is a timestamp, a minute before ``since`` (a provider clock
  ahead of ours stamps events later than they were published). Timestamp offsets are
  chunk-granular, so earlier messages come too; every message is checked against the
  window on its CloudEvent ``time`` anyway, because publish order is not event order.
* End: the first message received after ``stop_after`` (the replay's start: the rest
  is live traffic; the AMQP ``timestamp`` is the receipt time), or no delivery for
  ``idle`` seconds (the end of the stream: a stream queue reports no message count).
* A message published more than once (at-least-once) is yielded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiormq
import orjson
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from listener.selection import EventFilter

__all__ = ["ARCHIVE_IDLE", "ArchiveStats", "ArchivedEvent", "read_archive"]

ARCHIVE_SKEW = 60.0
ARCHIVE_IDLE = 1.0
PREFETCH = 2000
BATCH = 1000
# A header the broker adds to every message delivered from a stream.
_OFFSET_HEADER = "x-stream-offset"


@dataclass(frozen=True, slots=True)
class ArchivedEvent:
    """An archived event: body and routing key as published, properties as stored."""

    body: bytes
    routing_key: str
    properties: Basic.Properties


@dataclass(slots=True)
class ArchiveStats:
    """What a read went through: messages seen and those that were not CloudEvents."""

    scanned: int = 0
    skipped: int = 0


async def read_archive(
    connection: AbstractConnection,
    queue: str,
    selection: EventFilter,
    *,
    stop_after: float,
    idle: float = ARCHIVE_IDLE,
    stats: ArchiveStats | None = None,
) -> AsyncGenerator[list[ArchivedEvent], None]:
    """
    Yield batches of the archived events ``selection`` accepts, in stream order.

    The properties are copies, without the broker's ``x-stream-offset`` header.
    """
    stats = stats if stats is not None else ArchiveStats()
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def on_message(message: DeliveredMessage) -> None:
        inbox.put_nowait(message)

    await underlay.basic_qos(prefetch_count=PREFETCH)
    since = selection.since or 0.0
    consume = await underlay.basic_consume(
        queue,
        on_message,
        arguments={_OFFSET_HEADER: datetime.fromtimestamp(max(since - ARCHIVE_SKEW, 0.0), UTC)},
    )
    seen: set[tuple[str, str]] = set()
    try:
        while True:
            try:
                async with asyncio.timeout(idle):
                    first = await inbox.get()
            except TimeoutError:
                return  # the end of the stream
            messages = [first]
            while len(messages) < BATCH and not inbox.empty():
                messages.append(inbox.get_nowait())
            batch: list[ArchivedEvent] = []
            ended = False
            for message in messages:
                stamp = message.header.properties.timestamp
                if stamp is not None and stamp.timestamp() > stop_after:
                    ended = True
                    break
                stats.scanned += 1
                event = _accept(message, selection, seen, stats)
                if event is not None:
                    batch.append(event)
            if batch:
                yield batch
            tag = messages[-1].delivery_tag
            if tag is not None:
                await underlay.basic_ack(tag, multiple=True)
            if ended:
                return
    finally:
        # On a broken connection the channel is gone already: nothing left to cancel.
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
            if not underlay.is_closed and consume.consumer_tag is not None:
                await underlay.basic_cancel(consume.consumer_tag)
            await channel.close()


def _accept(
    message: DeliveredMessage,
    selection: EventFilter,
    seen: set[tuple[str, str]],
    stats: ArchiveStats,
) -> ArchivedEvent | None:
    try:
        event = orjson.loads(message.body)
        moment = datetime.fromisoformat(event["time"]).timestamp()
        source, type_, event_id = str(event["source"]), str(event["type"]), str(event["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        stats.skipped += 1  # not one of our CloudEvents: nothing to replay
        return None
    if not selection.accepts(source=source, type_=type_, moment=moment):
        return None
    if (source, event_id) in seen:
        return None
    seen.add((source, event_id))
    properties = copy.copy(message.header.properties)
    headers = properties.headers or {}
    if _OFFSET_HEADER in headers:
        properties.headers = {k: v for k, v in headers.items() if k != _OFFSET_HEADER} or None
    return ArchivedEvent(message.body, message.routing_key or type_, properties)
