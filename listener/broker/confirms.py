"""
Publishing with confirms, the lean way (NOTES: "where the time goes"): the one confirm
window the daemon, replay and redrive all publish through.

:class:`ConfirmWindow` writes many messages in one socket write on the aiormq channel
under an aio-pika confirm channel: no ``aio_pika.Message``, no task, timer or future
per message. It does the bookkeeping of aiormq's own ``Channel.basic_publish``
(delivery tags, ``confirmations``, ``message_id_delivery_tag`` so a Basic.Return finds
the right publish), but each publish's frames are bytes built in one pass
(:mod:`listener.broker.frames`), and what waits in ``confirmations`` is a small
:class:`Sent` that settles the window when aiormq acks, nacks or returns it. Every
publish is ``mandatory``: an unroutable message comes back instead of vanishing (the
channel must be opened with ``on_return_raises=True``). Those aiormq internals are
pinned in ``pyproject.toml`` and checked by ``tests/test_confirms.py``.

The window keeps up to ``size`` publishes awaiting their confirm. Each message's
outcome is its own (STYLE: "one message, one fate"): an ack, a return (unroutable) or
a nack is handed to ``on_settled`` and never ends the window; only what concerns the
connection does (no confirm within the deadline, the channel closing), through
:attr:`ConfirmWindow.failure`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import aiormq
import structlog
from aiormq.abc import ChannelFrame, ConfirmationFrameType
from pamqp.commands import Basic

from listener.broker.frames import Prebuilt, publish_frames
from listener.exceptions import PublishError, PublishNacked, PublishReturned, PublishTimeout

__all__ = ["ConfirmWindow", "Outcome", "Outgoing", "Sent"]

log = structlog.get_logger("listener.confirms")

# What a settled publish came to: None for an ack, else the per-message error.
Outcome = PublishReturned | PublishNacked | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: where, what, its AMQP properties, and the caller's token."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties | Prebuilt
    token: Any = None

    @property
    def message_id(self) -> str:
        return self.properties.message_id or ""


class Sent:
    """
    One publish written and awaiting its confirm; ``on_settled`` is handed it. It sits
    in aiormq's ``channel.confirmations`` where aiormq keeps a future, and answers the
    calls aiormq makes on one (``done``, ``cancelled``, ``set_result``,
    ``set_exception``) by settling the window at once: no future, no callback per message.

    Of its :class:`Outgoing` it keeps the ``message_id``, ``routing_key`` and ``token``,
    not the body and properties (on the wire once written): a drain after an outage has
    thousands in flight, a high-water mark that Python's allocator partly keeps.
    """

    __slots__ = ("_window", "deadline", "done_", "message_id", "routing_key", "tag", "token")

    def __init__(self, window: ConfirmWindow, message: Outgoing, tag: int, deadline: float) -> None:
        self._window = window
        self.message_id = message.message_id
        self.routing_key = message.routing_key
        self.token = message.token
        self.tag = tag
        self.deadline = deadline  # (written at deadline - the window's timeout)
        self.done_ = False

    def done(self) -> bool:
        return self.done_

    def cancelled(self) -> bool:
        return self.done_  # only ever done early by cancel_outstanding (aiormq: "ignored")

    def set_result(self, result: Any) -> None:
        self._window._settled(self, result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._window._settled(self, None, exc)


async def _on_confirm_frame(channel: aiormq.Channel, frame: ConfirmationFrameType) -> None:
    """
    aiormq's ``Channel._on_confirm_frame``, but a ``multiple`` ack settles its publishes
    at once. aiormq schedules a callback per delivery tag it covers, and again for each
    ack frame that arrives before those ran: while a backlog drains (2,048 publishes in
    flight) that was more loop handles at once than publishes, and a scheduled call per
    message.
    """
    confirmations = channel.confirmations
    if not (getattr(frame, "multiple", False) and frame.delivery_tag in confirmations):
        await aiormq.Channel._on_confirm_frame(channel, frame)  # (one tag, or aiormq's error)
        return
    last = frame.delivery_tag
    # Collected first: settling pops them. A return re-inserts its tag at the end, so
    # the dict is not quite in tag order: every tag is looked at.
    for tag in [tag for tag in confirmations if tag <= last]:
        channel._confirm_delivery(tag, frame)


def _settle_in_bulk(channel: aiormq.Channel) -> None:
    """Put :func:`_on_confirm_frame` in place of the channel's own (once per channel)."""
    if "_on_confirm_frame" not in vars(channel):
        # An instance attribute: aiormq's frame reader calls self._on_confirm_frame.
        bulk = functools.partial(_on_confirm_frame, channel)
        setattr(channel, "_on_confirm_frame", bulk)  # noqa: B010 - mypy: no assigning to a method


def _forget(channel: aiormq.Channel, sent: Sent) -> None:
    """Drop the publish's message_id → tag entry (a later publish may reuse the id)."""
    message_id = sent.message_id
    if channel.message_id_delivery_tag.get(message_id) == sent.tag:
        del channel.message_id_delivery_tag[message_id]


def _outcome(sent: Sent, result: Any, error: BaseException | None) -> Outcome | PublishError:
    """What the broker's answer to a publish stands for: an ack, a message's error, a failure."""
    message_id = sent.message_id
    if error is None:
        if isinstance(result, Basic.Ack):
            return None
        return PublishNacked(f"broker answered {result!r}", message_id=message_id)
    if isinstance(error, aiormq.exceptions.PublishError):
        return PublishReturned(
            f"returned unroutable by the broker (routing key {sent.routing_key!r});"
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
        on_settled: Callable[[Sent, Outcome, float], None] | None = None,
        wake: asyncio.Event | None = None,
    ) -> None:
        self._channel = channel
        _settle_in_bulk(channel)
        self._timeout = timeout
        self._size = size
        self._chunk = max(1, min(chunk or size // 4 or 1, size))
        self._buffer: list[Outgoing] = []
        # Written and not yet settled, in write order (the oldest holds the deadline).
        self._waiting: collections.deque[Sent] = collections.deque()
        self._in_flight: set[str] = set()
        self._on_settled = on_settled
        # A closing channel fails no future of ours (there are none): watch it instead.
        self._closing = channel.closing
        self._closing.add_done_callback(self._channel_closed)
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
        try:
            # The deadline covers the write too: a dead connection's queue stops draining.
            async with asyncio.timeout(self._timeout):
                await self._write(batch)
        except TimeoutError:
            self._fail(
                PublishTimeout(
                    f"could not write within {self._timeout}s", message_id=batch[0].message_id
                )
            )
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            # The channel closed under us (connection lost).
            self._fail(
                PublishError(
                    f"broker connection failed: {type(exc).__name__}: {exc}",
                    message_id=batch[0].message_id,
                )
            )

    async def _write(self, batch: Sequence[Outgoing]) -> None:
        """
        Register each publish where aiormq looks for it (its delivery tag in
        ``confirmations``, its message_id in ``message_id_delivery_tag`` for a
        Basic.Return) and write all their frames as one ``ChannelFrame``.
        """
        channel = self._channel
        number, max_content = channel.number, channel.max_content_size
        async with channel.lock:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
            deadline = time.monotonic() + self._timeout
            first_tag = channel.delivery_tag
            # (aiormq types its values as futures: ours only act like one, see Sent)
            confirmations: dict[int, Any] = cast(dict[int, Any], channel.confirmations)
            by_id = channel.message_id_delivery_tag
            written: list[Sent] = []
            payload: list[bytes] = []
            try:
                for message in batch:
                    tag = first_tag + len(written) + 1
                    sent = Sent(self, message, tag, deadline)
                    confirmations[tag] = sent
                    by_id[sent.message_id] = tag
                    written.append(sent)
                    payload.append(
                        publish_frames(
                            number,
                            max_content,
                            exchange=message.exchange,
                            routing_key=message.routing_key,
                            properties=message.properties,
                            body=message.body,
                        )
                    )
                channel.delivery_tag = first_tag + len(written)
                await channel.write_queue.put(
                    ChannelFrame(payload=b"".join(payload), should_close=False)
                )
            except BaseException:
                # Nothing reached the broker: give the delivery tags back, as aiormq does.
                channel.delivery_tag = first_tag
                for sent in written:
                    sent.done_ = True
                    confirmations.pop(sent.tag, None)
                    if by_id.get(sent.message_id) == sent.tag:
                        del by_id[sent.message_id]
                raise
        for sent in written:
            self._in_flight.add(sent.message_id)
            self._waiting.append(sent)

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
        waiting = self._waiting
        while waiting and waiting[0].done_:
            waiting.popleft()
        if clear:
            self.wake.clear()
        limit = max_wait
        if waiting:
            oldest = max(waiting[0].deadline - time.monotonic(), 0.0)
            limit = oldest if limit is None else min(limit, oldest)
        elif limit is None:
            await asyncio.sleep(0)
            return
        try:
            async with asyncio.timeout(limit):
                await self.wake.wait()
        except TimeoutError:
            pass
        while waiting and waiting[0].done_:
            waiting.popleft()
        if waiting and waiting[0].deadline <= time.monotonic():
            self._fail(
                PublishTimeout(
                    f"no confirm within {self._timeout}s", message_id=waiting[0].message_id
                )
            )

    async def drain(self) -> None:
        """Wait until every publish written so far has settled (or the window failed)."""
        while self._in_flight and self.failure is None:
            await self.wait()

    def cancel_outstanding(self) -> int:
        """Give up on what has no confirm yet (an unknown outcome), the window done; how many."""
        channel, given_up = self._channel, len(self._in_flight)
        for sent in self._waiting:
            if not sent.done_:
                # Settled, unsettled: it stays in confirmations, where a late ack finds it
                # done and aiormq drops it quietly (a missing tag is logged as an error);
                # a Basic.Return still on its way finds no message_id.
                sent.done_ = True
                self._in_flight.discard(sent.message_id)
                _forget(channel, sent)
        self._waiting.clear()
        self._closing.remove_done_callback(self._channel_closed)
        self._closing.cancel()  # (an observer of the channel's closing: only it stops)
        return given_up

    # -- outcomes ------------------------------------------------------------------------

    def _settled(self, sent: Sent, result: Any, error: BaseException | None) -> None:
        if sent.done_:
            return
        sent.done_ = True
        self._in_flight.discard(sent.message_id)
        _forget(self._channel, sent)
        self.wake.set()
        outcome = _outcome(sent, result, error)
        if outcome is None:
            self.confirmed += 1
        elif isinstance(outcome, PublishReturned):
            self.returned += 1
        elif isinstance(outcome, PublishNacked):
            self.nacked += 1
        else:
            self._fail(outcome)
            return
        if self._on_settled is not None:
            try:
                seconds = time.monotonic() - (sent.deadline - self._timeout)
                self._on_settled(sent, outcome, seconds)
            except Exception:  # (this runs in aiormq's frame reader: never let it close it)
                log.exception("confirm_callback_failed", message_id=sent.message_id)

    def _channel_closed(self, closing: asyncio.Future[Any]) -> None:
        if closing.cancelled():
            return
        error = closing.exception()
        self._fail(
            PublishError(
                "broker connection failed: the channel closed"
                + (f": {type(error).__name__}: {error}" if error is not None else ""),
                message_id="",
            )
        )

    def _fail(self, exc: PublishError) -> None:
        if self.failure is None:
            self.failure = exc
        self.wake.set()
