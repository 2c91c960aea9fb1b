"""
Publishing with confirms, the lean way (NOTES: "where the time goes").

:func:`send_batch` writes many messages in one socket write on the aiormq channel
under an aio-pika confirm channel and returns one confirm future per message: no
``aio_pika.Message``, no task and no timer per message. It does the bookkeeping of
aiormq's own ``Channel.basic_publish`` (delivery tags, ``confirmations``,
``message_id_delivery_tag`` so a Basic.Return fails the right publish), but marshals
every message's frames into one ``ChannelFrame``. Every publish is ``mandatory``: an
unroutable message comes back instead of vanishing (the channel must be opened with
``on_return_raises=True``).

The daemon's :class:`listener.publisher.Publisher` drains the journal with it;
replay and quarantine redrive publish a finite set through :class:`ConfirmWindow`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from listener.exceptions import PublishError, PublishNacked, PublishTimeout

__all__ = ["ConfirmWindow", "Outgoing", "send_batch", "unroute"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: where, what, and its AMQP properties."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties

    @property
    def message_id(self) -> str:
        return self.properties.message_id or ""


async def send_batch(
    channel: aiormq.Channel, messages: Sequence[Outgoing]
) -> list[asyncio.Future[Any]]:
    """
    Publish ``messages`` in one socket write; return one confirm future per message.

    A future resolves to Basic.Ack, or fails with ``aiormq.exceptions.PublishError``
    (returned unroutable) or ``DeliveryError`` (nacked); all fail if the channel closes.
    """
    frames: list[Any] = []
    futures: list[asyncio.Future[Any]] = []
    async with channel.lock:
        first_tag = channel.delivery_tag
        try:
            for message in messages:
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                future = channel.create_future()
                channel.confirmations[tag] = future
                message_id = message.message_id
                channel.message_id_delivery_tag[message_id] = tag
                future.add_done_callback(functools.partial(_forget, channel, message_id, tag))
                futures.append(future)
                frames.append(
                    Basic.Publish(
                        exchange=message.exchange, routing_key=message.routing_key, mandatory=True
                    )
                )
                frames.append(
                    ContentHeader(properties=message.properties, body_size=len(message.body))
                )
                frames.extend(channel._split_body(message.body))
            await channel.write_queue.put(
                ChannelFrame.marshall(channel_number=channel.number, frames=frames)
            )
        except BaseException:
            # Nothing reached the broker: give the delivery tags back, as aiormq does.
            channel.delivery_tag = first_tag
            for tag, future in enumerate(futures, start=first_tag + 1):
                channel.confirmations.pop(tag, None)
                future.cancel()
            raise
    return futures


def unroute(channel: aiormq.Channel, message_id: str, future: asyncio.Future[Any]) -> None:
    """
    Stop a Basic.Return still on its way from finding ``future``; call before cancelling it.

    aiormq routes a return to its publish by ``message_id`` and fails that publish's
    future; on a cancelled one ``set_exception`` raises InvalidStateError in aiormq's
    frame reader, which closes the channel (publishing then stalls until the connection
    is replaced). :func:`send_batch` forgets the id only in a done callback, a loop turn
    later: too late when the return is already being read. Forget it now.
    """
    tag = channel.message_id_delivery_tag.get(message_id)
    if tag is not None and channel.confirmations.get(tag) is future:
        del channel.message_id_delivery_tag[message_id]


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id, None)


class ConfirmWindow:
    """
    Publishes a finite set with up to ``size`` messages awaiting their confirm; an
    async context manager. Messages are written ``chunk`` at a time (1 for a paced
    replay, so nothing waits in a buffer).

    A returned (unroutable) message is counted in :attr:`returned` by routing key (its
    id in :attr:`returned_ids`) and is not an error. A nack, a missed deadline or a
    lost connection is: the next :meth:`publish` raises it, and leaving the block
    raises it if nothing else did. Leaving the block waits for every outstanding
    confirm (each under ``timeout``, watched as one deadline on the oldest).
    """

    def __init__(
        self, channel: aiormq.Channel, *, size: int, timeout: float, chunk: int | None = None
    ) -> None:
        self._channel = channel
        self._timeout = timeout
        self._size = size
        self._chunk = max(1, min(chunk or size // 4 or 1, size))
        self._buffer: list[Outgoing] = []
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any], str]] = (
            collections.deque()
        )
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()
        self._failure: PublishError | None = None
        self.confirmed = 0
        self.returned: Counter[str] = Counter()
        self.returned_ids: list[str] = []

    async def __aenter__(self) -> ConfirmWindow:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self._failure is None:
                await self._flush()
            # Until every confirm's callback has run (a done future's callbacks run later).
            while self._in_flight and self._failure is None:
                await self._wait()
        finally:
            for _, future, message_id in self._waiting:
                if not future.done():
                    unroute(self._channel, message_id, future)
                    future.cancel()
        if exc is None and self._failure is not None:
            raise self._failure

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties
    ) -> None:
        """
        Queue one message; it is written with the next chunk (its confirm comes later).

        Raises:
            PublishError: an earlier publish failed; stop publishing.
        """
        if self._failure is not None:
            raise self._failure
        self._buffer.append(Outgoing(body, exchange, routing_key, properties))
        if len(self._buffer) >= self._chunk:
            await self._flush()

    async def _flush(self) -> None:
        while self._buffer:
            if self._failure is not None:
                raise self._failure
            room = self._size - len(self._in_flight)
            batch: list[Outgoing] = []
            for message in self._buffer[:room]:
                # Never two publishes with one message_id in flight on a channel (NOTES:
                # aiormq matches returns by message_id).
                if message.message_id in self._in_flight:
                    break
                batch.append(message)
            if not batch:
                await self._wait()
                continue
            del self._buffer[: len(batch)]
            try:
                futures = await send_batch(self._channel, batch)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
                self._fail(
                    PublishError(
                        f"broker connection failed: {type(exc).__name__}: {exc}",
                        message_id=batch[0].message_id,
                    )
                )
                raise self._failure from exc  # type: ignore[misc]  # set just above
            deadline = time.monotonic() + self._timeout
            for message, future in zip(batch, futures, strict=True):
                self._in_flight.add(message.message_id)
                future.add_done_callback(functools.partial(self._settled, message))
                self._waiting.append((deadline, future, message.message_id))

    async def _wait(self) -> None:
        """Wait for a confirm, or fail when the oldest publish passes its deadline."""
        while self._waiting and self._waiting[0][1].done():
            self._waiting.popleft()
        self._wake.clear()
        if not self._waiting:
            await asyncio.sleep(0)  # settled futures whose callbacks have yet to run
            return
        try:
            async with asyncio.timeout(max(self._waiting[0][0] - time.monotonic(), 0.0)):
                await self._wake.wait()
        except TimeoutError:
            self._fail(PublishTimeout(f"no confirm within {self._timeout}s", message_id=""))

    def _settled(self, message: Outgoing, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(message.message_id)
        self._wake.set()
        if future.cancelled():
            return
        error = future.exception()
        message_id = message.message_id
        if error is None:
            if isinstance(future.result(), Basic.Ack):
                self.confirmed += 1
            else:
                self._fail(
                    PublishNacked(f"broker answered {future.result()!r}", message_id=message_id)
                )
        elif isinstance(error, aiormq.exceptions.PublishError):
            self.returned[message.routing_key] += 1
            self.returned_ids.append(message_id)
        elif isinstance(error, aiormq.exceptions.DeliveryError):
            self._fail(PublishNacked(f"nacked: {error}", message_id=message_id))
        else:
            self._fail(
                PublishError(
                    f"broker connection failed: {type(error).__name__}: {error}",
                    message_id=message_id,
                )
            )

    def _fail(self, exc: PublishError) -> None:
        if self._failure is None:
            self._failure = exc
