"""
What replicas keep in RabbitMQ to share units (CONTRACT §10), on the raw aiormq
connection the publisher publishes on:

* a **lease**: the exclusive queue ``<exchange>.lease.<unit>``. Declaring it takes the
  lease; the broker refuses a second declare from another connection (405
  RESOURCE_LOCKED) and deletes the queue with the connection that declared it, so a
  replica cut off from the broker holds nothing. Deleting it releases the lease.
* a **cursor**: the last message of ``<exchange>.cursor.<unit>`` (``x-max-length`` 1,
  the oldest dropped), written with a publisher confirm;
* **presence**: the fanout exchange ``<exchange>.cluster``, on which each replica says
  which units it holds; each reads it through an exclusive queue of its own.

Each operation opens a short-lived channel (a refused declare closes the channel it
happened on) and raises :class:`aiormq.exceptions.AMQPError` or ``ConnectionError``
when the broker cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import orjson
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp import commands as spec
from pamqp.common import FieldTable

from listener.broker.connection import blocked

__all__ = [
    "Names",
    "Presence",
    "blocked",
    "probe",
    "read_cursor",
    "release",
    "still_held",
    "take",
    "write_cursor",
]

# Queue names are at most 255 bytes: a longer unit name is cut and given a digest.
_MAX_UNIT = 180
_READABLE = str.maketrans({"?": ".", "&": ".", "=": "-", "/": "."})
_QUEUE_NAME = re.compile(r"[-_.:A-Za-z0-9]+")
_UNSAFE = re.compile(r"[^-_.:A-Za-z0-9]")
_OP_TIMEOUT = 10.0


class Names:
    """The names of one unit's lease and cursor queues, under ``exchange``."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.presence = f"{exchange}.cluster"

    @staticmethod
    def _unit(unit: str) -> str:
        # AMQP clients take [-_.:A-Za-z0-9] in queue names: "lx.trades?mint=X" becomes
        # "lx.trades.mint-X"; anything else, or a name too long, adds a digest.
        safe = unit.translate(_READABLE)
        if _QUEUE_NAME.fullmatch(safe) and len(safe) <= _MAX_UNIT:
            return safe
        digest = hashlib.sha256(unit.encode()).hexdigest()[:16]
        return f"{_UNSAFE.sub('_', safe)[: _MAX_UNIT - 17]}-{digest}"

    def lease(self, unit: str) -> str:
        """``<exchange>.lease.<unit>``."""
        return f"{self.exchange}.lease.{self._unit(unit)}"

    def cursor(self, unit: str) -> str:
        """``<exchange>.cursor.<unit>``."""
        return f"{self.exchange}.cursor.{self._unit(unit)}"


@contextlib.asynccontextmanager
async def _channel(
    connection: AbstractConnection, *, confirms: bool = False
) -> AsyncIterator[AbstractChannel]:
    channel = await connection.channel(publisher_confirms=confirms, timeout=_OP_TIMEOUT)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):  # the connection may be going: it is gone then
                await channel.close()


async def probe(connection: AbstractConnection) -> None:
    """One round trip to the broker (a channel opened and closed)."""
    async with _channel(connection):
        pass


async def take(connection: AbstractConnection, queue: str) -> bool:
    """Declare the lease queue: ``True`` held now, ``False`` another replica holds it."""
    async with _channel(connection) as channel:
        try:
            await channel.queue_declare(
                queue, exclusive=True, durable=False, auto_delete=False, timeout=_OP_TIMEOUT
            )
        except aiormq.exceptions.ChannelLockedResource:
            return False
    return True


async def still_held(connection: AbstractConnection, queue: str) -> bool:
    """Whether the lease queue is still there (ours: exclusive to this connection)."""
    async with _channel(connection) as channel:
        try:
            await channel.queue_declare(queue, passive=True, timeout=_OP_TIMEOUT)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except aiormq.exceptions.ChannelLockedResource:
            return False  # another connection's (ours was deleted and taken)
    return True


async def release(connection: AbstractConnection, queue: str) -> None:
    """Delete the lease queue: another replica may take the unit now."""
    async with _channel(connection) as channel:
        await channel.queue_delete(queue, timeout=_OP_TIMEOUT)


@contextlib.asynccontextmanager
async def _cursor_channel(
    connection: AbstractConnection, queue: str, queue_type: str, *, confirms: bool = False
) -> AsyncIterator[AbstractChannel]:
    """A channel on which the cursor queue is declared."""
    arguments: FieldTable = {"x-max-length": 1}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    async with _channel(connection, confirms=confirms) as channel:
        try:
            await channel.queue_declare(
                queue, durable=True, arguments=arguments, timeout=_OP_TIMEOUT
            )
        except aiormq.exceptions.ChannelPreconditionFailed:
            pass  # made before with another queue_type: used as it is, on a new channel
        else:
            yield channel
            return
    async with _channel(connection, confirms=confirms) as channel:
        yield channel


async def write_cursor(
    connection: AbstractConnection, queue: str, body: dict[str, Any], *, queue_type: str
) -> None:
    """
    Publish ``body`` as the cursor queue's one message, and wait for the broker's confirm.

    Raises:
        aiormq.exceptions.AMQPError: not confirmed (nacked, returned, connection gone).
    """
    async with _cursor_channel(connection, queue, queue_type, confirms=True) as channel:
        confirm = await channel.basic_publish(
            orjson.dumps(body),
            exchange="",
            routing_key=queue,
            properties=spec.Basic.Properties(
                delivery_mode=2, content_type="application/json", app_id="listener"
            ),
            mandatory=True,
            timeout=_OP_TIMEOUT,
        )
        if not isinstance(confirm, spec.Basic.Ack):
            raise aiormq.exceptions.PublishError(None, None)  # type: ignore[arg-type] # no message to name


async def read_cursor(
    connection: AbstractConnection, queue: str, *, queue_type: str
) -> dict[str, Any] | None:
    """The cursor queue's message, left in the queue; ``None`` when there is none."""
    async with _cursor_channel(connection, queue, queue_type) as channel:
        message = await channel.basic_get(queue, no_ack=False, timeout=_OP_TIMEOUT)
        delivery = message.delivery
        if not isinstance(delivery, spec.Basic.GetOk) or delivery.delivery_tag is None:
            return None
        await channel.basic_reject(delivery.delivery_tag, requeue=True)
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None


class Presence:
    """
    This replica on the presence exchange: what it hears goes to ``on_message``; it
    speaks with :meth:`say`. An exclusive queue of its own, gone with the connection.
    """

    def __init__(self, channel: AbstractChannel, exchange: str) -> None:
        self._channel = channel
        self._exchange = exchange

    @classmethod
    async def join(
        cls,
        connection: AbstractConnection,
        exchange: str,
        on_message: Callable[[dict[str, Any]], None],
    ) -> Presence:
        """Declare the exchange and a queue of ours on it, and start hearing."""
        channel = await connection.channel(publisher_confirms=False, timeout=_OP_TIMEOUT)
        try:
            await channel.exchange_declare(
                exchange, exchange_type="fanout", durable=True, timeout=_OP_TIMEOUT
            )
            declared = await channel.queue_declare(
                "", exclusive=True, auto_delete=True, timeout=_OP_TIMEOUT
            )
            assert declared.queue is not None  # a server-named queue has a name
            await channel.queue_bind(declared.queue, exchange, timeout=_OP_TIMEOUT)

            async def deliver(message: DeliveredMessage) -> None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    body = orjson.loads(message.body)
                    if isinstance(body, dict):
                        on_message(body)

            await channel.basic_consume(declared.queue, deliver, no_ack=True, timeout=_OP_TIMEOUT)
        except BaseException:
            await cls(channel, exchange).close()
            raise
        return cls(channel, exchange)

    async def say(self, body: dict[str, Any]) -> None:
        """Publish ``body`` to every replica (no confirm: presence is advice)."""
        await self._channel.basic_publish(
            orjson.dumps(body), exchange=self._exchange, timeout=_OP_TIMEOUT
        )

    async def close(self) -> None:
        """Stop hearing (the queue goes with the channel's consumer and connection)."""
        if not self._channel.is_closed:
            with contextlib.suppress(Exception):  # a closing connection takes it anyway
                async with asyncio.timeout(_OP_TIMEOUT):
                    await self._channel.close()
