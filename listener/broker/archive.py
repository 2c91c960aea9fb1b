"""
Reading the archive stream ``<exchange>.archive`` back (CONTRACT §4), for replay.

The archive is a RabbitMQ stream bound ``#`` to the events exchange, so it holds every
published event for ``broker.archive.max_age``, in publish order. Reading it over
AMQP 0-9-1 takes a prefetch, manual acks (credit, not removal) and an
``x-stream-offset`` (https://www.rabbitmq.com/docs/streams#consuming).

* Start: the offset is a timestamp, a minute before ``since`` (a provider clock
  ahead of ours stamps events later than they were published), and at most ten
  minutes before now (the end marker must come back). Timestamp offsets are
  chunk-granular, so earlier messages come too; every message is checked against the
  window on its CloudEvent ``time`` anyway, because publish order is not event order.
* End: the stream's end as it was when the read started. A stream queue reports no
  message count over AMQP 0-9-1, so before consuming, the reader appends an *end
  marker* to the stream (a message with the header ``x-listener-marker`` and no
  CloudEvent body, through the default exchange, confirmed) and stops when it reads
  that marker back. A pause in deliveries does not end the read; no delivery at all
  for ``stall`` seconds fails it (it never reports a partial read as complete).
  Readers skip what is not a CloudEvent, so markers are invisible to other replays.
* A message published more than once (at-least-once) is yielded once: the ids of
  the last :data:`SEEN_MAX` events are remembered (duplicates sit close together in
  the stream: a republish follows its original within one publish window), so memory
  stays bounded however long the archive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiormq
import orjson
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from listener.broker.deadline import within
from listener.exceptions import ReplayError
from listener.selection import EventFilter

__all__ = ["ARCHIVE_STALL", "MARKER_HEADER", "ArchiveStats", "ArchivedEvent", "read_archive"]

ARCHIVE_SKEW = 60.0
ARCHIVE_STALL = 30.0
PREFETCH = 2000
BATCH = 1000
SEEN_MAX = 100_000
MARKER_HEADER = "x-listener-marker"
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


async def _append_marker(connection: AbstractConnection, queue: str) -> str:
    """Append an end marker to the stream; return its id once the broker confirmed it."""
    marker = uuid.uuid4().hex
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            b"",
            exchange="",
            routing_key=queue,
            mandatory=True,
            properties=Basic.Properties(
                headers={MARKER_HEADER: marker}, delivery_mode=2, app_id="listener"
            ),
        )
    except aiormq.exceptions.PublishError as exc:
        raise ReplayError(f"the archive {queue!r} is gone; is broker.archive on?") from exc
    finally:
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
            await channel.close()
    return marker


async def read_archive(
    connection: AbstractConnection,
    queue: str,
    selection: EventFilter,
    *,
    stall: float = ARCHIVE_STALL,
    stats: ArchiveStats | None = None,
) -> AsyncGenerator[list[ArchivedEvent], None]:
    """
    Yield batches of the archived events ``selection`` accepts, in stream order, up to
    the stream's end when the read started.

    The properties are copies, without the broker's ``x-stream-offset`` header.

    Raises:
        ReplayError: the end marker was not confirmed within ``stall`` seconds, or nothing
            arrived for ``stall`` seconds before it.
    """
    stats = stats if stats is not None else ArchiveStats()
    try:
        # A broker under a memory or disk alarm never confirms it: the replay hung, and
        # held one of the few running replays' places, until a restart.
        marker = await within(_append_marker(connection, queue), stall)
    except TimeoutError:
        raise ReplayError(
            f"the broker did not confirm the archive's end marker within {stall:g}s"
            " (is it blocked, under a memory or disk alarm?): run the replay again"
        ) from None
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def on_message(message: DeliveredMessage) -> None:
        inbox.put_nowait(message)

    await underlay.basic_qos(prefetch_count=PREFETCH)
    # Never later than a while ago: the marker just appended must be read back, also for a
    # window in the future or a broker clock behind ours (it hung `stall` s, then failed).
    start = min((selection.since or 0.0) - ARCHIVE_SKEW, time.time() - 10 * ARCHIVE_SKEW)
    consume = await underlay.basic_consume(
        queue,
        on_message,
        arguments={_OFFSET_HEADER: datetime.fromtimestamp(max(start, 0.0), UTC)},
    )
    seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
    try:
        while True:
            try:
                async with asyncio.timeout(stall):
                    first = await inbox.get()
            except TimeoutError:
                raise ReplayError(
                    f"the archive sent nothing for {stall:g}s before its end; the read stopped"
                    " incomplete (is the broker under load?): run the replay again"
                ) from None
            messages = [first]
            while len(messages) < BATCH and not inbox.empty():
                messages.append(inbox.get_nowait())
            batch: list[ArchivedEvent] = []
            ended = False
            for message in messages:
                headers = message.header.properties.headers or {}
                if headers.get(MARKER_HEADER) == marker:
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
    seen: collections.OrderedDict[tuple[str, str], None],
    stats: ArchiveStats,
) -> ArchivedEvent | None:
    try:
        event = orjson.loads(message.body)
        moment = datetime.fromisoformat(event["time"]).timestamp()
        source, type_, event_id = str(event["source"]), str(event["type"]), str(event["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        stats.skipped += 1  # not one of our CloudEvents (a marker, say): nothing to replay
        return None
    if not selection.accepts(source=source, type_=type_, moment=moment):
        return None
    key = (source, event_id)
    if key in seen:
        seen.move_to_end(key)
        return None
    seen[key] = None
    if len(seen) > SEEN_MAX:
        seen.popitem(last=False)
    properties = copy.copy(message.header.properties)
    headers = properties.headers or {}
    if _OFFSET_HEADER in headers:
        properties.headers = {k: v for k, v in headers.items() if k != _OFFSET_HEADER} or None
    return ArchivedEvent(message.body, message.routing_key or type_, properties)
