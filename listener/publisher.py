"""
The publisher: drains the journal to RabbitMQ with publisher confirms (CONTRACT §4, §8).

* One aio-pika robust connection with a short heartbeat and one confirm-mode channel.
* Lean publishing (NOTES: "where the time goes"): frames go straight to the
  underlying aiormq channel without building ``aio_pika.Message`` objects, many
  messages per socket write (:func:`_send`), with a sliding window of up to
  ``broker.confirm_window`` publishes awaiting their confirm; never one at a time,
  and no task or timer per message: one deadline watches the oldest publish.
* ``mandatory`` with ``on_return_raises=True``: a returned (unroutable) message fails
  its publish instead of resolving as if confirmed (aio-pika's default).
* Every publish runs under a deadline of our own, which, unlike aio-pika's
  ``timeout=``, also covers reconnect waits and a connection blocked by an alarm.
* Any failure ends the session: in-flight publishes settle, confirms are recorded,
  and after a jittered backoff everything still pending in the journal is published
  again, oldest first (consumers deduplicate on ``message_id``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic

from listener.config import BrokerConfig, mask_url
from listener.confirms import Outgoing, send_batch, unroute
from listener.envelope import APP_ID, CONTENT_TYPE
from listener.exceptions import (
    JournalError,
    PublishNacked,
    PublishReturned,
    PublishTimeout,
)
from listener.journal import Journal, StoredEntry
from listener.metrics import Metrics
from listener.retry import backoff

__all__ = ["Publisher", "Topology", "declare_topology", "properties_for"]

log = structlog.get_logger("listener.publisher")

QUARANTINE_CONTENT_TYPE = "application/octet-stream"


class Topology:
    """Names of the exchanges and queues the listener declares (CONTRACT §4)."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.quarantine_exchange = f"{exchange}.quarantine"
        self.quarantine_queue = f"{exchange}.quarantine"
        self.archive_queue = f"{exchange}.archive"


def _max_age(seconds: float) -> str:
    # Stream x-max-age takes a number and a unit: Y, M, D, h, m, s
    # (https://www.rabbitmq.com/docs/streams#retention).
    whole = max(int(seconds), 1)
    for unit, size in (("D", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


async def declare_topology(channel: aio_pika.abc.AbstractChannel, config: BrokerConfig) -> None:
    """Declare exchanges, the quarantine queue and the archive stream, idempotently."""
    names = Topology(config.exchange)
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    quarantine = await channel.declare_exchange(
        names.quarantine_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names.quarantine_queue, durable=True)
    await queue.bind(quarantine, "#")
    if config.archive.enabled:
        archive = await channel.declare_queue(
            names.archive_queue,
            durable=True,
            arguments={"x-queue-type": "stream", "x-max-age": _max_age(config.archive.max_age)},
        )
        await archive.bind(exchange, "#")


def properties_for(stored: StoredEntry, headers: dict[str, Any] | None = None) -> Any:
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


class Publisher:
    """Keeps the broker connection and drains the journal into it, forever."""

    def __init__(self, *, config: BrokerConfig, journal: Journal, metrics: Metrics) -> None:
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._names = Topology(config.exchange)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._confirmed: list[StoredEntry] = []
        self._last_error: str | None = None
        self._drained = asyncio.Event()
        self._closing = False
        # Set by confirms and by journal commits: the drain loop's one wake-up call.
        self._wake = asyncio.Event()
        journal.add_commit_listener(self._wake.set)

    # -- state ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    def state(self) -> dict[str, Any]:
        """Component status for ``/readyz``."""
        return {
            "status": "ok" if self.connected else "unavailable",
            **({"last_error": self._last_error} if self._last_error else {}),
        }

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (retrying), declare the topology, then drain the journal until cancelled."""
        try:
            await self._connect()
            delays = backoff(self._config.retry_initial, self._config.retry_max)
            while True:
                healthy = await self._session()
                if healthy:
                    delays = backoff(self._config.retry_initial, self._config.retry_max)
                await asyncio.sleep(next(delays))
        finally:
            await self._close()

    async def wait_drained(self) -> None:
        """Return once nothing is pending in the journal (shutdown drain)."""
        while self._journal.pending_count > 0:
            self._drained.clear()
            await self._drained.wait()

    async def _connect(self) -> None:
        delays = backoff(self._config.retry_initial, self._config.retry_max)
        url = self._config.url.get_secret_value()
        first = True
        while True:
            connection: AbstractRobustConnection | None = None
            try:
                async with asyncio.timeout(self._config.connect_timeout * 2):
                    connection = await aio_pika.connect_robust(
                        url,
                        heartbeat=max(int(self._config.heartbeat), 1),
                        timeout=self._config.connect_timeout,
                        reconnect_interval=self._config.retry_initial,
                        client_properties={"connection_name": "listener"},
                    )
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    assert isinstance(channel, AbstractRobustChannel)  # a robust connection's
                    await declare_topology(channel, self._config)
            except Exception as exc:  # any failure to connect is retried (aiormq raises many kinds)
                self._last_error = f"{type(exc).__name__}: {exc}"
                if connection is not None:
                    await self._close_quietly(connection)
                delay = next(delays)
                log.warning(
                    "broker_connect_failed",
                    error=self._last_error,
                    retry_in=round(delay, 2),
                    note="events are journaled and published when the broker is reachable",
                )
                if first:
                    first = False
                    log.warning("broker_unreachable_journaling_only", url=mask_url(url))
                await asyncio.sleep(delay)
                continue
            self._connection, self._channel = connection, channel
            self._metrics.broker_connected.set(1)
            connection.close_callbacks.add(self._on_lost)
            connection.reconnect_callbacks.add(self._on_reconnect)
            self._last_error = None
            log.info("broker_connected", exchange=self._config.exchange)
            return

    def _on_lost(self, *_: object) -> None:
        self._metrics.broker_connected.set(0)
        if not self._closing:
            log.warning("broker_connection_lost")

    def _on_reconnect(self, *_: object) -> None:
        self._metrics.broker_connected.set(1)
        log.info("broker_reconnected")

    async def _close(self) -> None:
        self._metrics.broker_connected.set(0)
        self._closing = True
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._close_quietly(connection)

    @staticmethod
    async def _close_quietly(connection: AbstractRobustConnection) -> None:
        try:
            async with asyncio.timeout(5):
                await connection.close()
        except Exception as exc:  # closing a broken connection may fail in many ways; it is gone
            log.warning("broker_close_failed", error=f"{type(exc).__name__}: {exc}")

    # -- one session: publish until something fails ----------------------------------

    async def _session(self) -> bool:
        """
        Publish pending entries with a sliding window until a publish fails.

        Returns:
            Whether at least one publish was confirmed (resets the backoff).
        """
        assert self._channel is not None  # connected first
        try:
            async with asyncio.timeout(self._config.publish_timeout):
                underlay = await self._channel.get_underlay_channel()
            # The concrete aiormq channel: _Batch writes frames through it (see there).
            assert isinstance(underlay, aiormq.Channel)
        except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            self._record_failure("channel_unavailable", exc)
            return False
        try:
            # A connection the broker blocked (a resource alarm: Connection.Blocked,
            # https://www.rabbitmq.com/docs/connection-blocked) reads nothing: a window
            # written into it would sit in the socket buffer, one more each retry (memory
            # without bound, and a duplicate of each once the alarm clears). Wait here for
            # Connection.Unblocked instead; the events wait in the journal.
            async with asyncio.timeout(self._config.publish_timeout):
                await underlay.connection.ready()
        except TimeoutError:
            self._record_failure(
                "blocked", TimeoutError("the broker blocks publishing (a resource alarm)")
            )
            return True  # nothing was sent: retry soon, without a growing backoff

        window = self._config.confirm_window
        deadline = self._config.publish_timeout
        journal = self._journal
        backlog: collections.deque[StoredEntry] = collections.deque()
        # Publishes awaiting their confirm, oldest first, with their deadlines.
        waiting: collections.deque[tuple[float, asyncio.Future[Any], StoredEntry]] = (
            collections.deque()
        )
        in_flight: dict[str, StoredEntry] = {}
        failures: list[BaseException] = []
        confirmed_any = False
        after = 0
        wake = self._wake

        def settled(stored: StoredEntry, started: float, future: asyncio.Future[Any]) -> None:
            nonlocal confirmed_any
            in_flight.pop(stored.entry.event_id, None)
            wake.set()
            error = _outcome(stored, future)
            if error is None:
                confirmed_any = True
                self._confirmed.append(stored)
                now = time.monotonic()
                self._metrics.publish_seconds.observe(now - started)
                self._metrics.event_lag_seconds.observe(
                    max(time.time() - stored.entry.received_at, 0.0)
                )
            elif not isinstance(error, asyncio.CancelledError):
                failures.append(error)

        try:
            while not failures:
                wake.clear()
                room = window - len(in_flight)
                if not backlog and room > 0:
                    backlog.extend(await journal.pending(after_seq=after, limit=2 * window))
                    if backlog:
                        after = backlog[-1].seq
                # Refill in chunks (not one message per confirm): one socket write per chunk.
                if backlog and (room >= window // 4 or not in_flight):
                    batch: list[StoredEntry] = []
                    while backlog and len(batch) < room:
                        if backlog[0].entry.event_id in in_flight:
                            # Never two publishes with one message_id in flight on a channel
                            # (NOTES: aiormq matches returns by message_id).
                            break
                        batch.append(backlog.popleft())
                    if batch:
                        started = time.monotonic()
                        try:
                            # The deadline covers the write too: a dead connection's
                            # write queue stops draining.
                            async with asyncio.timeout(deadline):
                                futures = await _send(underlay, batch, self._names)
                        except TimeoutError:
                            failures.append(
                                PublishTimeout(
                                    f"could not write within {deadline}s",
                                    message_id=batch[0].entry.event_id,
                                )
                            )
                            break
                        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                            # The channel closed under us (connection lost): end the session
                            # instead of the publisher; the next one, on the reconnected
                            # channel, reads this batch from the journal again.
                            failures.append(exc)
                            break
                        for stored, future in zip(batch, futures, strict=True):
                            in_flight[stored.entry.event_id] = stored
                            future.add_done_callback(functools.partial(settled, stored, started))
                            waiting.append((started + deadline, future, stored))
                        continue
                if len(self._confirmed) >= 64 or (self._confirmed and not in_flight):
                    await self._flush_confirmed(wait=False)
                while waiting and waiting[0][1].done():
                    waiting.popleft()
                if not in_flight and not backlog and journal.pending_count == 0:
                    self._drained.set()
                # Sleep until a confirm, an append or a commit wakes us, or the oldest
                # publish passes its deadline (one timer for the window, not one each).
                limit = waiting[0][0] - time.monotonic() if waiting else 1.0
                try:
                    async with asyncio.timeout(max(limit, 0.0)):
                        await wake.wait()
                except TimeoutError:
                    if waiting and waiting[0][0] <= time.monotonic():
                        oldest = waiting[0][2].entry.event_id
                        failures.append(
                            PublishTimeout(f"no confirm within {deadline}s", message_id=oldest)
                        )
        finally:
            # Settle the window: what has no confirm now has an unknown outcome and is
            # published again next session (consumers deduplicate on message_id).
            for _, future, stored in waiting:
                if not future.done():
                    unroute(underlay, stored.entry.event_id, future)
                    future.cancel()
            for _ in range(8):  # let settled futures run their callbacks (bounded)
                if not in_flight:
                    break
                await asyncio.sleep(0)
            await self._flush_confirmed(wait=True)
        if failures:
            self._record_failure(_reason(failures[0]), failures[0])
        return confirmed_any

    async def _flush_confirmed(self, *, wait: bool) -> None:
        if not self._confirmed:
            return
        confirmed, self._confirmed = self._confirmed, []
        try:
            await self._journal.mark_published([s.seq for s in confirmed], wait=wait)
        except JournalError as exc:
            # The journal cannot write (disk full, I/O error). The broker has these
            # messages: keep them to mark at the next flush instead of letting the error
            # end the publisher, and with it the whole service. They stay pending on disk
            # meanwhile, so a restart before then publishes them again (a duplicate).
            # (The journal's failed commit shows in /readyz as journal status "error".)
            self._confirmed = confirmed + self._confirmed
            log.warning("journal_mark_failed", error=str(exc), confirmed=len(self._confirmed))
            return
        for stored in confirmed:
            if stored.entry.kind == "event":
                self._metrics.events_published.labels(
                    stored.entry.source, stored.entry.routing_key
                ).inc()
        self._metrics.journal_pending.set(self._journal.pending_count)

    def _record_failure(self, reason: str, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._metrics.publish_failures.labels(reason).inc()
        log.warning(
            "publish_failed",
            reason=reason,
            error=self._last_error,
            message_id=getattr(exc, "message_id", None),
            pending=self._journal.pending_count,
        )


async def _send(
    channel: aiormq.Channel, batch: list[StoredEntry], names: Topology
) -> list[asyncio.Future[Any]]:
    """Publish ``batch`` in one socket write (:func:`listener.confirms.send_batch`)."""
    return await send_batch(
        channel,
        [
            Outgoing(
                stored.entry.body,
                names.exchange if stored.entry.kind == "event" else names.quarantine_exchange,
                stored.entry.routing_key,
                properties_for(stored),
            )
            for stored in batch
        ],
    )


def _outcome(stored: StoredEntry, future: asyncio.Future[Any]) -> BaseException | None:
    """The failure a settled confirm future stands for, or ``None`` for an ack."""
    entry = stored.entry
    if future.cancelled():
        return asyncio.CancelledError()
    error = future.exception()
    if error is None:
        result = future.result()
        if isinstance(result, Basic.Ack):
            return None
        return PublishNacked(f"broker answered {result!r}", message_id=entry.event_id)
    if isinstance(error, aiormq.exceptions.PublishError):
        return PublishReturned(
            f"returned unroutable by the broker (routing key {entry.routing_key!r});"
            " check the bindings of the exchange",
            message_id=entry.event_id,
        )
    if isinstance(error, aiormq.exceptions.DeliveryError):
        return PublishNacked(f"nacked: {error}", message_id=entry.event_id)
    return error


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PublishReturned):
        return "returned"
    if isinstance(exc, PublishNacked):
        return "nacked"
    if isinstance(exc, PublishTimeout):
        return "timeout"
    return "connection"
