"""
Publishing with confirms, the lean way (NOTES: "where the time goes"): the one confirm
window the daemon, replay and redrive all publish through.

:func:`send_batch` writes many messages in one socket write on the aiormq channel
under an aio-pika confirm channel and returns one confirm future per message: no
``aio_pika.Message``, no task and no timer per message. It does the bookkeeping of
aiormq's own ``Channel.basic_publish`` (delivery tags, ``confirmations``,
``message_id_delivery_tag`` so a Basic.Return fails the right publish), but marshals
every message's frames into one ``ChannelFrame``. Every publish is ``mandatory``: an
unroutable message comes back instead of vanishing (the channel must be opened with
``on_return_raises=True``). Those aiormq internals are pinned in ``pyproject.toml`` and
checked by ``tests/test_confirms.py``.

:class:`ConfirmWindow` keeps up to ``size`` publishes awaiting their confirm. Each
message's outcome is its own (STYLE: "one message, one fate"): an ack, a return
(unroutable) or a nack is handed to ``on_settled`` and never ends the window; only what
concerns the connection does (no confirm within the deadline, the channel closing),
through :attr:`ConfirmWindow.failure`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from listener.exceptions import PublishError, PublishNacked, PublishReturned, PublishTimeout

__all__ = ["ConfirmWindow", "Outcome", "Outgoing", "send_batch", "unroute"]

# What a settled publish came to: None for an ack, else the per-message error.
Outcome = PublishReturned | PublishNacked | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: where, what, its AMQP properties, and the caller's token."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties
    token: Any = None

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


def outcome_of(message: Outgoing, future: asyncio.Future[Any]) -> Outcome | BaseException:
    """What a settled confirm future stands for: an ack, a per-message error, or a failure."""
    error = future.exception()
    message_id = message.message_id
    if error is None:
        result = future.result()
        if isinstance(result, Basic.Ack):
            return None
        return PublishNacked(f"broker answered {result!r}", message_id=message_id)
    if isinstance(error, aiormq.exceptions.PublishError):
        return PublishReturned(
            f"returned unroutable by the broker (routing key {message.routing_key!r});"
            " check the bindings of the exchange",
            message_id=message_id,
        )
    if isinstance(error, aiormq.exceptions.DeliveryError):
        return PublishNacked(f"nacked: {error}", message_id=message_id)
    return PublishError(
        f"broker connection failed: {type(error).__name__}: {error}", message_id=message_id
    )


class ConfirmWindow:
    """
    Up to ``size`` publishes awaiting their confirm, on one channel; an async context
    manager. See the module docstring.

    Two ways to feed it: :meth:`send` writes a batch now (the daemon: it knows its
    backlog), :meth:`publish` buffers and writes ``chunk`` at a time (replay, redrive).
    ``on_settled(message, outcome, seconds)`` runs for every ack, return and nack, with
    the time from the write to the broker's answer. Leaving the
    block waits for the outstanding confirms (each under ``timeout``, watched as one
    deadline on the oldest) unless a failure ended it; what is still unconfirmed then is
    cancelled (an unknown outcome: the caller publishes it again).
    """

    def __init__(
        self,
        channel: aiormq.Channel,
        *,
        size: int,
        timeout: float,
        chunk: int | None = None,
        on_settled: Callable[[Outgoing, Outcome, float], None] | None = None,
        wake: asyncio.Event | None = None,
    ) -> None:
        self._channel = channel
        self._timeout = timeout
        self._size = size
        self._chunk = max(1, min(chunk or size // 4 or 1, size))
        self._buffer: list[Outgoing] = []
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any], Outgoing]] = (
            collections.deque()
        )
        self._in_flight: set[str] = set()
        self._on_settled = on_settled
        #: Set by confirms: waiters wake on it (the daemon shares it with journal commits).
        self.wake = wake if wake is not None else asyncio.Event()
        #: The first failure that ended the window (a deadline, the channel closing).
        self.failure: PublishError | None = None
        self.confirmed = 0
        self.returned = 0
        self.nacked = 0

    async def __aenter__(self) -> ConfirmWindow:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self.failure is None:
                await self.flush()
                await self.drain()
        finally:
            self.cancel_outstanding()
            # Let the callbacks of futures settled just now run (bounded).
            for _ in range(8):
                if not self._in_flight:
                    break
                await asyncio.sleep(0)
        if exc is None and self.failure is not None:
            raise self.failure

    # -- state -------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """How many more publishes may be written now."""
        return self._size - len(self._in_flight)

    @property
    def outstanding(self) -> int:
        """Publishes written and not yet settled."""
        return len(self._in_flight)

    def in_flight(self, message_id: str) -> bool:
        """Whether a publish with this ``message_id`` awaits its confirm."""
        return message_id in self._in_flight

    # -- writing -------------------------------------------------------------------------

    async def send(self, batch: Sequence[Outgoing]) -> None:
        """
        Write ``batch`` in one socket write now; the caller keeps it within :attr:`room`
        and never sends a ``message_id`` that is :meth:`in_flight` (aiormq matches
        returns by id, NOTES). A failure to write sets :attr:`failure`.
        """
        if not batch or self.failure is not None:
            return
        started = time.monotonic()
        try:
            # The deadline covers the write too: a dead connection's queue stops draining.
            async with asyncio.timeout(self._timeout):
                futures = await send_batch(self._channel, batch)
        except TimeoutError:
            self._fail(
                PublishTimeout(
                    f"could not write within {self._timeout}s", message_id=batch[0].message_id
                )
            )
            return
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            # The channel closed under us (connection lost).
            self._fail(
                PublishError(
                    f"broker connection failed: {type(exc).__name__}: {exc}",
                    message_id=batch[0].message_id,
                )
            )
            return
        deadline = started + self._timeout
        for message, future in zip(batch, futures, strict=True):
            self._in_flight.add(message.message_id)
            future.add_done_callback(functools.partial(self._settled, message, started))
            self._waiting.append((deadline, future, message))

    async def publish(self, message: Outgoing) -> None:
        """
        Queue one message; it is written with the next chunk (its confirm comes later).

        Raises:
            PublishError: the window failed; stop publishing.
        """
        if self.failure is not None:
            raise self.failure
        self._buffer.append(message)
        if len(self._buffer) >= self._chunk:
            await self.flush()

    async def flush(self) -> None:
        """Write everything buffered, waiting for room as needed."""
        while self._buffer:
            if self.failure is not None:
                raise self.failure
            batch: list[Outgoing] = []
            for message in self._buffer[: self.room]:
                if message.message_id in self._in_flight or any(
                    m.message_id == message.message_id for m in batch
                ):
                    break
                batch.append(message)
            if not batch:
                await self.wait()
                continue
            del self._buffer[: len(batch)]
            await self.send(batch)

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self, max_wait: float | None = None, *, clear: bool = True) -> None:
        """
        Sleep until :attr:`wake` is set (a confirm), ``max_wait`` passes, or the oldest
        publish passes its deadline (then :attr:`failure` is set): one timer for the window.
        ``clear=False``: the caller clears :attr:`wake` itself, before it looks for work.
        """
        while self._waiting and self._waiting[0][1].done():
            self._waiting.popleft()
        if clear:
            self.wake.clear()
        limit = max_wait
        if self._waiting:
            oldest = max(self._waiting[0][0] - time.monotonic(), 0.0)
            limit = oldest if limit is None else min(limit, oldest)
        elif limit is None:
            await asyncio.sleep(0)  # settled futures whose callbacks have yet to run
            return
        try:
            async with asyncio.timeout(limit):
                await self.wake.wait()
        except TimeoutError:
            pass
        if self._waiting and self._waiting[0][0] <= time.monotonic():
            future, message = self._waiting[0][1], self._waiting[0][2]
            if not future.done():
                self._fail(
                    PublishTimeout(
                        f"no confirm within {self._timeout}s", message_id=message.message_id
                    )
                )

    async def drain(self) -> None:
        """Wait until every publish written so far has settled (or the window failed)."""
        while self._in_flight and self.failure is None:
            await self.wait()

    def cancel_outstanding(self) -> None:
        """Give up on what has no confirm yet (an unknown outcome)."""
        for _, future, message in self._waiting:
            if not future.done():
                unroute(self._channel, message.message_id, future)
                future.cancel()
        self._waiting.clear()

    # -- outcomes ------------------------------------------------------------------------

    def _settled(self, message: Outgoing, started: float, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(message.message_id)
        self.wake.set()
        if future.cancelled():
            return
        outcome = outcome_of(message, future)
        if outcome is None:
            self.confirmed += 1
        elif isinstance(outcome, PublishReturned):
            self.returned += 1
        elif isinstance(outcome, PublishNacked):
            self.nacked += 1
        else:
            self._fail(
                outcome
                if isinstance(outcome, PublishError)
                else PublishError(str(outcome), message_id=message.message_id)
            )
            return
        if self._on_settled is not None:
            self._on_settled(message, outcome, time.monotonic() - started)

    def _fail(self, exc: PublishError) -> None:
        if self.failure is None:
            self.failure = exc
        self.wake.set()
