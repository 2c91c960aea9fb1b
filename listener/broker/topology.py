"""
What the listener declares on RabbitMQ, and the AMQP properties of what it publishes
(CONTRACT §4).

* topic exchange ``<exchange>`` (durable);
* topic exchange ``<exchange>.quarantine`` with durable queue ``<exchange>.quarantine``
  bound ``#``;
* when ``archive.enabled``, the stream queue ``<exchange>.archive`` bound ``#`` to
  ``<exchange>``, with ``x-max-age`` = ``archive.max_age``.

Declaring is idempotent, but an entity that already exists with other arguments is
refused with 406 PRECONDITION_FAILED (https://www.rabbitmq.com/docs/queues#property-equivalence),
and that is not a broker outage: :func:`declare_topology` tells the two apart.

* The archive with another ``x-max-age`` (retention changed between deploys) is a
  *mismatch*: the archive works with the retention it was created with (a queue's
  arguments cannot change, and they win over a policy), publishing goes on, and
  ``/readyz`` and the log show ``topology: mismatch`` with the two ways out.
* An exchange or the quarantine queue declared with another type or arguments is a
  *conflict*: publishing into it would not do what the contract says, so the
  publisher waits, ``/readyz`` shows ``topology: conflict`` naming the entity, and it
  tries again every :data:`CONFLICT_RETRY` seconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic
from pamqp.common import FieldTable

from listener.broker.frames import Prebuilt, prebuilt
from listener.config import BrokerConfig
from listener.envelope import APP_ID, CONTENT_TYPE
from listener.journal import StoredEntry

__all__ = [
    "CONFLICT_RETRY",
    "QUARANTINE_CONTENT_TYPE",
    "Topology",
    "TopologyReport",
    "declare_topology",
    "properties_for",
    "publish_properties",
    "raw_connection",
]

QUARANTINE_CONTENT_TYPE = "application/octet-stream"
CONFLICT_RETRY = 30.0


class Topology:
    """Names of the exchanges and queues the listener declares (CONTRACT §4)."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.quarantine_exchange = f"{exchange}.quarantine"
        self.quarantine_queue = f"{exchange}.quarantine"
        self.archive_queue = f"{exchange}.archive"

    def reserved_queues(self) -> frozenset[str]:
        """Queues of the listener's own that nothing else may publish into."""
        return frozenset({self.quarantine_queue, self.archive_queue})


@dataclass(slots=True)
class TopologyReport:
    """What declaring found: ``conflicts`` stop publishing, ``mismatches`` do not."""

    conflicts: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``ok``, ``mismatch`` or ``conflict``."""
        return "conflict" if self.conflicts else "mismatch" if self.mismatches else "ok"

    def view(self) -> dict[str, Any]:
        """For ``/readyz``."""
        return {
            "status": self.status,
            **({"conflicts": self.conflicts} if self.conflicts else {}),
            **({"mismatches": self.mismatches} if self.mismatches else {}),
        }


def max_age(seconds: float) -> str:
    """A stream's ``x-max-age``: a number and a unit, Y, M, D, h, m, s (RabbitMQ streams docs)."""
    whole = max(int(seconds), 1)
    for unit, size in (("D", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


async def declare_topology(
    connection: aiormq.abc.AbstractConnection, config: BrokerConfig
) -> TopologyReport:
    """
    Declare exchanges, the quarantine queue and the archive stream, idempotently.

    Each step runs on a short-lived aiormq channel of its own on ``connection`` (a 406
    closes the channel it happened on; the publisher's channel must not be that one).

    Raises:
        aiormq.exceptions.AMQPError, ConnectionError: the broker is unreachable.
    """
    names = Topology(config.exchange)
    report = TopologyReport()

    async def step(
        what: str, fix: str, declare: Callable[[aiormq.abc.AbstractChannel], Awaitable[Any]]
    ) -> bool:
        channel = await connection.channel()
        try:
            await declare(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            report.conflicts.append(f"{what} exists with other settings ({exc}); {fix}")
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    exchange_fix = "delete it or choose another broker.exchange"
    for name in (names.exchange, names.quarantine_exchange):

        async def exchange(ch: aiormq.abc.AbstractChannel, name: str = name) -> None:
            await ch.exchange_declare(name, exchange_type="topic", durable=True)

        await step(f"exchange {name!r}", exchange_fix, exchange)

    # queue_type quorum: replicated over the cluster's nodes (CONTRACT §10).
    # (classic stays undeclared: queues made before this key existed carry no argument)
    quorum = config.queue_type == "quorum"
    quarantine_args: FieldTable = {"x-queue-type": "quorum"} if quorum else {}

    async def quarantine_queue(ch: aiormq.abc.AbstractChannel) -> None:
        await ch.queue_declare(names.quarantine_queue, durable=True, arguments=quarantine_args)
        await ch.queue_bind(names.quarantine_queue, names.quarantine_exchange, routing_key="#")

    await step(
        f"queue {names.quarantine_queue!r}",
        "delete it (after draining it), or set broker.queue_type to its type",
        quarantine_queue,
    )
    if config.archive.enabled:
        age = max_age(config.archive.max_age)
        arguments: FieldTable = {"x-queue-type": "stream", "x-max-age": age}

        async def archive(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.queue_declare(names.archive_queue, durable=True, arguments=arguments)
            await ch.queue_bind(names.archive_queue, names.exchange, routing_key="#")

        if not await step(f"queue {names.archive_queue!r}", "", archive):
            # It exists, with another x-max-age (or type): keep it and say how to fix it.
            report.conflicts.pop()

            async def bind_existing(ch: aiormq.abc.AbstractChannel) -> None:
                await ch.queue_declare(names.archive_queue, passive=True)
                await ch.queue_bind(names.archive_queue, names.exchange, routing_key="#")

            try:
                await step(f"queue {names.archive_queue!r}", "", bind_existing)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return report
            report.mismatches.append(
                f"queue {names.archive_queue!r} exists with another x-max-age than"
                f" broker.archive.max_age ({age}); it keeps archiving with"
                " the retention it was created with. Either set broker.archive.max_age back,"
                f" or delete the stream (rabbitmqctl delete_queue {names.archive_queue}: its"
                " messages go) and the listener declares it again with the new retention"
            )
    return report


def raw_connection(connection: AbstractConnection) -> aiormq.abc.AbstractConnection:
    """The aiormq connection under an aio-pika one (for :func:`declare_topology`)."""
    transport = connection.transport
    if transport is None:
        raise aiormq.exceptions.AMQPConnectionError("the connection is not open")
    return transport.connection


def publish_properties(stored: StoredEntry) -> Basic.Properties | Prebuilt:
    """:func:`properties_for` an entry, for an event already in wire form (the hot path)."""
    entry = stored.entry
    if entry.kind == "event" and entry.event_id and entry.routing_key:
        wire = prebuilt(
            content_type=CONTENT_TYPE,
            message_id=entry.event_id,
            message_type=entry.routing_key,
            timestamp=int(entry.received_at),
            app_id=APP_ID,
        )
        if wire is not None:
            return wire
    return properties_for(stored)


def properties_for(stored: StoredEntry, headers: dict[str, Any] | None = None) -> Basic.Properties:
    """The AMQP properties of a journal entry (CONTRACT §4); identical on replay."""
    entry = stored.entry
    moment = datetime.fromtimestamp(int(entry.received_at), UTC)
    if entry.kind == "event":
        return Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2,
            message_id=entry.event_id,
            message_type=entry.routing_key,
            timestamp=moment,
            app_id=APP_ID,
            headers=headers,
        )
    return Basic.Properties(
        content_type=QUARANTINE_CONTENT_TYPE,
        delivery_mode=2,
        message_id=entry.event_id,
        message_type="quarantine",
        timestamp=moment,
        app_id=APP_ID,
        headers={
            "x-quarantine-reason": entry.reason or "unknown",
            "x-quarantine-detail": entry.detail or "",
            "x-source": entry.source,
            **(headers or {}),
        },
    )
