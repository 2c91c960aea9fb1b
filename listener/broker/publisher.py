"""
The publisher: drains the journal to RabbitMQ with publisher confirms (CONTRACT §4, §8).

* One connection (:mod:`listener.broker.connection`) and one confirm-mode channel
  with ``on_return_raises=True``; frames go straight to the underlying aiormq channel
  through the one confirm window (:class:`listener.broker.confirms.ConfirmWindow`),
  many messages per socket write, no task or timer per message.
* One message, one fate (STYLE): a message the broker returns (unroutable) or nacks is
  set aside in the journal as *deferred*, counted, logged, and retried with backoff
  away from the head (1 s doubling to 1 min; all of a routing key at once when one of
  them goes through again); it never ends the session, nor holds up the messages
  behind it, nor makes others go twice. ``/readyz`` shows ``degraded`` meanwhile.
* Reconnecting is ours (not aio-pika's robust connection, whose channel restore has no
  deadline): a lost connection is closed and another made under our deadlines and
  backoff, from the next node of ``broker.urls`` on (CONTRACT §10).
* What ends a session concerns the connection: no confirm within
  ``broker.publish_timeout`` (a blocked or dead broker; our own deadline, which also
  covers reconnect waits), or the channel closing. In-flight publishes then have an
  unknown outcome and are published again from the journal after a jittered backoff
  (consumers deduplicate on ``message_id``).
* Each session declares the topology first; an entity that exists with other settings
  is told apart from an outage (:mod:`listener.broker.topology`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from listener.broker.backlog import Backlog
from listener.broker.confirms import ConfirmWindow, Outgoing
from listener.broker.connection import blocked, close_quietly, confirm_channel, connect_retrying
from listener.broker.deadline import quietly, within
from listener.broker.inflight import Kept, outgoing
from listener.broker.settling import DEFER_CAP, Settling
from listener.broker.topology import (
    CONFLICT_RETRY,
    Topology,
    TopologyReport,
    declare_topology,
    raw_connection,
)
from listener.config import BrokerConfig, mask_url
from listener.exceptions import JournalError, PublishTimeout
from listener.journal import Journal
from listener.metrics import Metrics
from listener.retry import backoff, stop_if_cancelled

__all__ = ["Publisher"]

log = structlog.get_logger("listener.publisher")

DEFERRED_CHECK = 1.0  # seconds between the session's looks for deferred messages due
REFILL = 64  # write once this many can go (a quarter of the window if less) or none flies
FILL_MAX = 512  # entries taken at once (bodies may be 1 MiB each)
# Settled messages are recorded once this many wait, even mid-write: a drain the broker
# returned as fast as it went never ran out of room, and all of it stayed in memory.
SETTLE_MAX = 256


class Publisher(Settling):
    """Keeps the broker connection and drains the journal into it, forever."""

    def __init__(self, *, config: BrokerConfig, journal: Journal, metrics: Metrics) -> None:
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._names = Topology(config.exchange)
        self._connection: AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None
        self._confirmed: list[Kept] = []
        self._returned: list[tuple[Kept, str]] = []
        self._unlogged, self._log_deferred_at = 0, 0.0  # (the publish_deferred lines)
        self._confirmed_any = False
        self._last_error: str | None = None
        self._topology = TopologyReport()
        self._declared_on: object | None = None  # (the connection last declared on)
        self._drained = asyncio.Event()
        self._hurry = asyncio.Event()  # (the shutdown drain: retries stop waiting)
        self._closing, self._blocked = False, False  # (blocked: Connection.Blocked)
        self._node = 0  # (of broker.urls) connected to; after a loss, the next one first
        self._lost = False  # the connection was lost: make another
        self._leave = False  # publishes were given up on: the next session, a new channel
        self._watchers: list[Callable[[bool], None]] = []  # (:meth:`watch`)
        self._wake = asyncio.Event()  # (confirms, commits: the drain loop's one wake-up)
        journal.add_commit_listener(self._wake.set)

    # -- state ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    def watch(self, watcher: Callable[[bool], None]) -> None:
        """Call ``watcher(up)`` whenever the connection comes up or is lost."""
        self._watchers.append(watcher)

    def raw_connection(self) -> aiormq.abc.AbstractConnection | None:
        """The aiormq connection the publisher publishes on, while it is up."""
        up = self.connected and not self._lost and self._connection is not None
        return raw_connection(self._connection) if up and self._connection else None

    def _tell(self, up: bool) -> None:
        for watcher in self._watchers:
            watcher(up)

    def state(self) -> dict[str, Any]:
        """Component status for ``/readyz``: ok, degraded, blocked, conflict or unavailable."""
        deferred = self._journal.deferred_count
        if not self.connected:
            status = "unavailable"
        elif self._topology.conflicts:
            status = "conflict"
        elif self._blocked:
            status = "blocked"
        elif deferred or self._topology.mismatches:
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "deferred": deferred,
            "topology": self._topology.view(),
            **({"last_error": self._last_error} if self._last_error else {}),
        }

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (retrying), then drain the journal until cancelled."""
        try:
            await self._connect()
            delays = backoff(self._config.retry_initial, self._config.retry_max)
            while True:
                stop_if_cancelled()
                if self._lost or not self.connected:
                    await self._reconnect()
                if await self._session():  # healthy
                    delays = backoff(self._config.retry_initial, self._config.retry_max)
                await self._pause(next(delays))
        finally:
            await self._close()

    async def wait_drained(self) -> None:
        """Return once nothing is pending (shutdown drain; not deferred); hurry the backoff."""
        self._hurry.set()
        while True:
            await self._journal.settled()  # an append still queued is not pending yet
            if self._journal.pending_count == 0:
                await self._journal.recount()  # (rows a redrive added count too)
                if self._journal.pending_count == 0:
                    return
            self._drained.clear()
            await self._drained.wait()

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` between sessions, or ``retry_initial`` once draining."""
        if self._hurry.is_set():
            delay = min(delay, self._config.retry_initial)
        try:
            async with asyncio.timeout(delay):
                await self._hurry.wait()
        except TimeoutError:
            return
        # Woken by the drain: one more short pause, so a dead broker is not hammered.
        await asyncio.sleep(min(delay, self._config.retry_initial))

    async def _connect(self) -> None:
        url = ", ".join(mask_url(node.get_secret_value()) for node in self._config.nodes)

        def failed(exc: BaseException, delay: float, attempt: int) -> None:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "broker_connect_failed",
                error=self._last_error,
                retry_in=round(delay, 2),
                note="events are journaled and published when the broker is reachable",
            )
            if attempt == 1:
                log.warning("broker_unreachable_journaling_only", url=url)

        delays = backoff(self._config.retry_initial, self._config.retry_max)
        while True:
            connection, self._node = await connect_retrying(
                self._config, name="listener", on_failure=failed, start=self._node
            )
            try:
                channel = await confirm_channel(connection, self._config.connect_timeout * 2)
                break
            except BaseException as exc:  # a channel that cannot open: start over
                await close_quietly(connection)  # (cancelled too: nobody else holds it)
                if not isinstance(exc, Exception):
                    raise
                stop_if_cancelled(exc)
                failed(exc, delay := next(delays), 2)
                await asyncio.sleep(delay)
        self._connection, self._channel, self._blocked = connection, channel, False
        self._leave = False  # (a new channel already)
        self._metrics.broker_connected.set(1)
        connection.close_callbacks.add(self._on_lost)
        self._last_error = None
        log.info("broker_connected", exchange=self._config.exchange, node=self._node)
        self._tell(True)

    async def _reconnect(self) -> None:
        """The connection was lost: close it, connect again from the next node on."""
        self._lost = False
        self._tell(False)
        if self._connection is not None:
            old, self._connection, self._channel = self._connection, None, None
            old.close_callbacks.discard(self._on_lost)
            await close_quietly(old)
        self._node = (self._node + 1) % len(self._config.nodes)  # (CONTRACT §10)
        await self._connect()

    def _on_lost(self, *_: object) -> None:
        self._metrics.broker_connected.set(0)
        if not self._closing:
            log.warning("broker_connection_lost")
            self._lost = True
            self._wake.set()
        self._tell(False)

    async def _close(self) -> None:
        self._metrics.broker_connected.set(0)
        self._closing = True
        if self._connection is not None:
            connection, self._connection = self._connection, None
            if (error := await close_quietly(connection)) is not None:
                log.warning("broker_close_failed", error=error)

    # -- one session: publish until the connection fails ------------------------------

    async def _declare(self, underlay: aiormq.Channel) -> bool:
        """
        Declare the topology once per underlying connection (at the start, and after
        every reconnect); ``False`` when it conflicts (nothing is published then).
        """
        connection = underlay.connection
        if self._declared_on is connection and not self._topology.conflicts:
            return True
        before = self._topology.status
        # Our own deadline (a declare waits forever), in this task (one abandoned leaks).
        async with asyncio.timeout(self._config.publish_timeout):
            self._topology = await declare_topology(connection, self._config)
        self._declared_on = connection
        if self._topology.conflicts:
            self._last_error = "; ".join(self._topology.conflicts)
            log.error(
                "topology_conflict",
                conflicts=self._topology.conflicts,
                retry_in=CONFLICT_RETRY,
                note="nothing is published until this is fixed; events wait in the journal",
            )
            return False
        if self._topology.mismatches and before != "mismatch":
            log.warning("topology_mismatch", mismatches=self._topology.mismatches)
        return True

    async def _session(self) -> bool:
        """Publish with a sliding window until the connection fails; ``True``: reset backoff."""
        assert self._connection is not None  # connected first
        assert self._channel is not None
        try:
            if self._leave:  # (publishes were given up on: see _leave_channel)
                await self._leave_channel(self._channel)
            if self._channel.is_closed:  # the broker closed it (the connection is up)
                self._channel = await confirm_channel(
                    self._connection, self._config.publish_timeout
                )
                self._declared_on = None  # (a 404 closes it: the exchange may be gone)
            underlay = self._channel
            if not await self._declare(underlay):
                await asyncio.sleep(CONFLICT_RETRY)
                return True  # a known state, retried at its own pace
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            self._record_failure("channel_unavailable", exc)
            return False
        except asyncio.CancelledError as exc:  # aiormq's, as its connection closed: it ended
            stop_if_cancelled(exc)  # the publisher, which published nothing from then on
            self._record_failure("channel_unavailable", exc)
            return False
        try:
            # A connection the broker blocked (a resource alarm) reads nothing: a window
            # written into it would sit in the socket buffer, one more each retry (memory
            # without bound, a duplicate of each later). Wait for Connection.Unblocked.
            await within(underlay.connection.ready(), self._config.publish_timeout)
            self._blocked = False
        except TimeoutError:
            self._record_failure("blocked", TimeoutError("the broker blocks publishing (an alarm)"))
            return True  # nothing was sent: retry soon, without a growing backoff
        self._confirmed_any = False
        window = ConfirmWindow(
            underlay,
            size=self._config.confirm_window,
            timeout=self._config.publish_timeout,
            on_settled=self._settled,
            wake=self._wake,
        )
        taken = Backlog(self._journal)  # (the journal keeps the handoff until closed)
        try:
            await self._publish_until_failure(window, taken)
        except JournalError as exc:  # a read failed: the next session reads again
            self._record_failure("journal", exc)
        finally:
            taken.close()
            # What has no confirm now has an unknown outcome and is published again next
            # session (consumers deduplicate on message_id).
            self._leave |= window.cancel_outstanding() > 0  # (left as the next session begins)
            for _ in range(8):  # let settled futures run their callbacks (bounded)
                if not window.outstanding:
                    break
                await asyncio.sleep(0)
            await self._flush_confirmed(wait=True)
            await self._flush_returned()
        if window.failure is not None:
            reason = "timeout" if isinstance(window.failure, PublishTimeout) else "connection"
            self._record_failure(reason, window.failure)
        return self._confirmed_any

    async def _leave_channel(self, channel: aiormq.Channel) -> None:
        """
        After publishes were given up on, close the channel so that they go again on
        another. This one's table keeps each (a late ack finds it): a window more each
        round of a broker that does not confirm, and their message_ids seen again on it
        (NOTES). Not while the broker blocks the connection (an alarm: it reads nothing,
        the close would hang); a close that does not finish in time is left to finish,
        and the channel used meanwhile (never a reconnect for it: a cluster's units
        would move).
        """
        if await blocked(channel.connection):
            return  # (the session waits for it, and the next one leaves)
        self._leave = False
        await quietly(channel.close(), self._config.connect_timeout)

    async def _publish_until_failure(self, window: ConfirmWindow, taken: Backlog) -> None:
        journal = self._journal
        size = self._config.confirm_window
        backlog = taken.items
        next_check = 0.0
        wake = self._wake
        while window.failure is None and not self._lost:
            wake.clear()
            room = window.room
            if not backlog and room > 0:
                if journal.deferred_count and time.monotonic() >= next_check:
                    next_check = time.monotonic() + DEFERRED_CHECK
                    due = await journal.due_deferred(
                        now=time.time(), limit=min(size, FILL_MAX), longest=DEFER_CAP + 1
                    )
                    # Not those still in flight, or settled and not yet recorded: read again
                    # a second later, each went out twice (and held up the rest meanwhile).
                    settled = {k.seq for k in self._confirmed} | {k.seq for k, _ in self._returned}
                    backlog.extend(
                        d
                        for d in due
                        if d.seq not in settled and not window.in_flight(d.entry.event_id)
                    )
                if not backlog:
                    await taken.fill(min(2 * size, FILL_MAX))
            # Refill in chunks (not one message per confirm): one socket write per chunk.
            if backlog and (room >= min(size // 4, REFILL) or not window.outstanding):
                batch: list[Outgoing] = []
                ids: set[str] = set()
                while backlog and len(batch) < room:
                    message_id = backlog[0].entry.event_id
                    if message_id in ids or window.in_flight(message_id):
                        # One publish per message_id in flight (aiormq matches returns
                        # by id, NOTES; sources may share ids, quarantine ids are digests).
                        break
                    ids.add(message_id)
                    batch.append(outgoing(backlog.popleft(), self._names))
                if batch:
                    await window.send(batch)
                    if len(self._confirmed) < SETTLE_MAX and len(self._returned) < SETTLE_MAX:
                        continue
                    wake.set()  # record them below, then straight back to writing
            if len(self._confirmed) >= 64 or (self._confirmed and not window.outstanding):
                await self._flush_confirmed(wait=False)
            if self._returned:
                await self._flush_returned()
            if not window.outstanding and not backlog and journal.pending_count == 0:
                self._drained.set()
            # Until a confirm, an append, a commit or the oldest publish's deadline.
            await window.wait(DEFERRED_CHECK, clear=False)
