"""
Replay: re-publish stored events during an incident (CONTRACT §2 ``replay``, §4, §7).

One engine, :class:`Replay`, serves ``listener replay`` and ``POST /v1/replays``;
:func:`replay_request` validates the arguments of both.

* Sources. The journal (default) holds what was published for ``journal.retention``;
  it is read in ``seq`` order up to the last row present when the replay starts, so
  live ingestion during a replay adds nothing to it. The archive stream
  (``--from archive``) holds what was published for ``broker.archive.max_age``; it is
  read up to its end when the replay started (:mod:`listener.broker.archive`).
* Selection. Source, type pattern and ``[since, until)`` window on the CloudEvent
  ``time`` (:mod:`listener.selection`). Only published events are replayed;
  quarantined ones are redriven instead.
* Targets. ``--to-queue Q`` publishes through the default exchange with routing key
  ``Q``, so only that queue sees the replay; ``--to-exchange X`` routes by type.
  Either must exist (a passive declare), be a valid AMQP name (1 to 255 bytes), and
  not be the broker's (``amq.*``) or the listener's own (the quarantine queue and
  exchange, the archive stream, leases and cursors).
* The message. Same body, same properties, plus the header ``x-replayed: true``,
  through the one confirm window; ``--rate N`` spaces publishes to at most N per
  second (at least :data:`MIN_RATE`, so a replay always ends). A replay can be
  cancelled (``DELETE /v1/replays/{id}``, Ctrl-C): it stops after what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiormq
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic

from listener.broker.archive import ARCHIVE_STALL, ArchiveStats, read_archive
from listener.broker.confirms import ConfirmWindow, Outgoing
from listener.broker.connection import close_quietly, connect
from listener.broker.topology import Topology, properties_for
from listener.config import BrokerConfig
from listener.envelope import rfc3339
from listener.exceptions import BrokerError, ReplayArgumentError, ReplayError
from listener.journal.queries import Reader, last_seq, replay_page, select_events
from listener.ops.replay_request import MIN_RATE, Origin, ReplayRequest, replay_request

__all__ = [
    "MIN_RATE",
    "REPLAY_HEADERS",
    "Origin",
    "Replay",
    "ReplayRequest",
    "ReplayStatus",
    "replay_request",
]

# Into a queue, a message the broker returns means the queue is gone (deleted while the
# replay ran): what was published into nothing is no success.
_GONE = (
    "the broker returned messages as unroutable: the queue {queue!r} no longer exists;"
    " declare it and run the replay again"
)

# CONTRACT §4: replayed messages carry this header and are otherwise identical.
REPLAY_HEADERS: dict[str, Any] = {"x-replayed": True}
# Journal rows read per query.
BATCH = 1000


@dataclass(slots=True)
class ReplayStatus:
    """Where a replay is; ``/v1/replays/{id}`` serves :meth:`as_dict`."""

    id: str
    origin: Origin
    dry_run: bool
    state: Literal["running", "completed", "failed", "cancelled"] = "running"
    total: int | None = None
    matched: int = 0
    published: int = 0
    unroutable: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON view (times RFC 3339)."""
        total = self.total
        done = self.matched if self.dry_run else self.published + self.unroutable

        def iso(moment: float | None) -> str | None:
            return rfc3339(datetime.fromtimestamp(moment, UTC)) if moment else None

        return {
            "id": self.id,
            "state": self.state,
            "from": self.origin,
            "dry_run": self.dry_run,
            "total": total,
            "matched": self.matched,
            "published": self.published,
            "unroutable": self.unroutable,
            "progress": round(min(done / total, 1.0), 4) if total else None,
            "by_type": dict(self.by_type),
            "error": self.error,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


@dataclass(slots=True)
class _Item:
    body: bytes
    routing_key: str
    properties: Basic.Properties


class _Pacer:
    """
    At most ``rate`` calls of :meth:`wait` return per second on average.

    Due times are counted from a start, so oversleeping (timer granularity at high
    rates) is made up by the next calls instead of lowering the rate; after a stall
    of over a second (a slow broker) the count restarts rather than burst to catch up.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._start = 0.0
        self._count = 0

    async def wait(self) -> None:
        now = time.monotonic()
        due = self._start + self._count / self._rate
        if self._count == 0 or now - due > 1.0:
            self._start, self._count, due = now, 0, now
        self._count += 1
        if due - now > 0.002:  # below the loop's timer resolution a sleep only adds lag
            await asyncio.sleep(due - now)


class Replay:
    """
    One replay run: ``async with Replay(...) as r: await r.run()``.

    Entering connects to the broker when needed and checks the target (and the
    archive) exist, so argument errors surface before anything is published.
    """

    def __init__(
        self,
        request: ReplayRequest,
        *,
        broker: BrokerConfig,
        journal: Reader | None,
        replay_id: str | None = None,
        stall: float = ARCHIVE_STALL,
        on_progress: Callable[[ReplayStatus], None] | None = None,
    ) -> None:
        if request.origin == "journal" and journal is None:
            raise ValueError("a journal replay needs the journal")
        self.request = request
        self.status = ReplayStatus(
            id=replay_id or f"rpl_{uuid.uuid4().hex[:16]}",
            origin=request.origin,
            dry_run=request.dry_run,
        )
        self._broker = broker
        self._journal = journal
        self._names = Topology(broker.exchange)
        self._stall = stall
        self.on_progress = on_progress or (lambda _: None)
        self._connection: AbstractConnection | None = None
        self._cancelled = False
        self.archive_stats = ArchiveStats()

    async def __aenter__(self) -> Replay:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def cancel(self) -> None:
        """Stop after what is in flight; the state becomes ``cancelled``."""
        self._cancelled = True

    async def open(self) -> None:
        """
        Connect (unless a dry run from the journal without a target) and check names.

        Raises:
            ReplayArgumentError: the target queue or exchange, or the archive, is missing.
            ReplayError: the broker cannot be reached.
        """
        request = self.request
        target = request.to_queue is not None or request.to_exchange is not None
        if request.origin == "journal" and request.dry_run and not target:
            return
        try:
            self._connection = await connect(self._broker, name="listener-replay")
        except BrokerError as exc:
            raise ReplayError(str(exc)) from exc
        try:
            if request.to_queue is not None:
                await self._check("to_queue", "queue", request.to_queue)
            if request.to_exchange is not None:
                await self._check("to_exchange", "exchange", request.to_exchange)
            if request.origin == "archive":
                await self._check("from", "queue", self._names.archive_queue)
        except BaseException:
            await self.close()
            raise

    async def _check(self, field_name: str, kind: str, name: str) -> None:
        assert self._connection is not None  # connected first
        # A failed passive declare closes its channel: one throwaway channel per check.
        async with self._connection.channel() as channel:
            try:
                if kind == "queue":
                    await channel.declare_queue(name, passive=True)
                else:
                    await channel.declare_exchange(name, passive=True)
            except aiormq.exceptions.ChannelLockedResource:
                # An exclusive queue of another connection: it exists, and any
                # connection may publish into it.
                pass
            except aiormq.exceptions.ChannelNotFoundEntity:
                hint = " (does the daemon run with broker.archive.enabled?)"
                raise ReplayArgumentError(
                    field_name,
                    f"no {kind} named {name!r} on the broker"
                    + (hint if field_name == "from" else ""),
                ) from None

    async def close(self) -> None:
        """Close the broker connection."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await close_quietly(connection)

    async def run(self) -> ReplayStatus:
        """
        Replay everything selected; return the final status (also on :attr:`status`).

        Raises:
            ReplayError, PublishError, JournalError: the replay stopped; the status says
            how far it got, and ``state`` is ``failed``.
        """
        status = self.status
        try:
            source = (
                self._from_journal() if self.request.origin == "journal" else self._from_archive()
            )
            # Closed explicitly, so the archive consumer is cancelled even on a failure.
            async with contextlib.aclosing(source) as items:
                if self.request.dry_run:
                    async for batch in items:
                        for item in batch:
                            status.matched += 1
                            status.by_type[item.routing_key] += 1
                        self.on_progress(status)
                else:
                    await self._publish(items)
        except BaseException as exc:
            status.state = "cancelled" if self._cancelled else "failed"
            status.error = str(exc) or type(exc).__name__
            raise
        else:
            status.state = "cancelled" if self._cancelled else "completed"
            if status.total is None and not self._cancelled:  # an archive's size, once read
                status.total = status.matched
        finally:
            status.finished_at = time.time()
            self.on_progress(status)
        return status

    async def _publish(self, items: AsyncIterator[list[_Item]]) -> None:
        assert self._connection is not None  # opened: a target is required to publish
        request, status = self.request, self.status
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # the concrete channel the window writes to
        exchange = "" if request.to_queue is not None else request.to_exchange or ""
        pacer = _Pacer(request.rate) if request.rate else None
        window = ConfirmWindow(
            underlay,
            size=self._broker.confirm_window,
            timeout=self._broker.publish_timeout,
            # Paced: write each message at its time, not when a chunk has filled.
            chunk=1 if pacer is not None else None,
        )
        try:
            async with window:
                async for batch in items:
                    for item in batch:
                        if self._cancelled:
                            return
                        if pacer is not None:
                            await pacer.wait()
                        key = request.to_queue or item.routing_key
                        if request.to_queue is not None and window.returned:
                            raise ReplayError(_GONE.format(queue=request.to_queue))
                        await window.publish(Outgoing(item.body, exchange, key, item.properties))
                        status.matched += 1
                        status.by_type[item.routing_key] += 1
                        if pacer is not None:
                            self._count(window)
                    self._count(window)
        finally:
            self._count(window)
            # A channel on a broken connection may fail to close; it is gone either way.
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
                await channel.close()
        if window.nacked:
            raise ReplayError(f"the broker refused (nacked) {window.nacked} messages; run again")
        if request.to_queue is not None and window.returned:
            raise ReplayError(_GONE.format(queue=request.to_queue))

    def _count(self, window: ConfirmWindow) -> None:
        status = self.status
        status.published = window.confirmed
        status.unroutable = window.returned
        if status.total is not None and status.matched > status.total:
            status.total = status.matched
        self.on_progress(status)

    # -- sources ---------------------------------------------------------------------

    async def _from_journal(self) -> AsyncGenerator[list[_Item], None]:
        reader = self._journal
        assert reader is not None  # checked in __init__
        selected = await select_events(
            reader, self.request.selection, published_up_to=await last_seq(reader)
        )
        self.status.total = selected.total
        self.on_progress(self.status)
        if self.request.dry_run:
            # The grouped count is the answer; no need to read a single body.
            self.status.matched = selected.total
            self.status.by_type.update(selected.by_type)
            return
        after = 0
        while not self._cancelled:
            rows = await replay_page(reader, selected, after=after, limit=BATCH)
            if not rows:
                return
            after = rows[-1].seq
            yield [
                _Item(s.entry.body, s.entry.routing_key, properties_for(s, dict(REPLAY_HEADERS)))
                for s in rows
            ]

    async def _from_archive(self) -> AsyncGenerator[list[_Item], None]:
        assert self._connection is not None  # opened: the archive needs the broker
        archive = read_archive(
            self._connection,
            self._names.archive_queue,
            self.request.selection,
            stall=self._stall,
            stats=self.archive_stats,
        )
        async with contextlib.aclosing(archive):
            async for events in archive:
                if self._cancelled:
                    return
                batch = []
                for event in events:
                    properties = event.properties
                    properties.headers = {**(properties.headers or {}), **REPLAY_HEADERS}
                    batch.append(_Item(event.body, event.routing_key, properties))
                yield batch
