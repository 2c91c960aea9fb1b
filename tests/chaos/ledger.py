"""
The ledger: the oracle of every chaos scenario (after the ledger of RabbitMQ's own
Jepsen tests).

A scenario tells the ledger which events the listener *acknowledged*: a webhook the
listener answered 2xx, or a stream event whose cursor the listener advanced. The ledger
reads back everything that reached the exchange through a durable tap queue of its own
(bound ``#``), and classifies each acknowledged event as delivered, lost, or
duplicated. Lost must be 0 (the contract's promise); duplicates are allowed
(at-least-once) and counted.

Events are keyed by (CloudEvent ``source``, ``message_id``), the identity consumers
deduplicate on within a source. The tap is durable, consumed with manual acks over a
robust connection, so it survives a broker restart; a message the broker redelivers to
the tap after such a restart is not counted twice.

Every check appends one row to the results file (JSON lines; see :func:`results_path`):
scenario, acknowledged, delivered, lost, duplicates, extra (delivered but never
acknowledged, such as a request in flight at a SIGKILL) and the time to recover (from
the moment the fault was cleared until every event acknowledged before it was
delivered). ``python -m tests.chaos.report`` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from tests.conftest import UNIT, wait_for

__all__ = ["Ledger", "Verdict", "ledger", "results_path"]

REPO = Path(__file__).resolve().parents[2]


def results_path() -> Path:
    """``$LISTENER_CHAOS_RESULTS``, else ``data/chaos-results.jsonl`` (git-ignored)."""
    explicit = os.environ.get("LISTENER_CHAOS_RESULTS")
    return Path(explicit) if explicit else REPO / "data" / "chaos-results.jsonl"


@dataclass(slots=True)
class Verdict:
    """One scenario's row in the table."""

    run: str
    scenario: str
    acknowledged: int
    delivered: int
    lost: int
    duplicates: int
    extra: int
    recover_s: float | None
    outcome: str = "checked"
    notes: dict[str, Any] = field(default_factory=dict)


Key = tuple[str, str]


class Ledger:
    """Acknowledged events on one side, what reached the exchange on the other."""

    def __init__(self, url: str, exchange: str, *, scenario: str, run: str) -> None:
        self.url = url
        self.exchange = exchange
        self.scenario = scenario
        self.run = run
        self.queue_name = f"{exchange}.ledger"
        #: key → monotonic time it was acknowledged.
        self.acknowledged: dict[Key, float] = {}
        #: key → deliveries seen at the exchange.
        self.deliveries: Counter[Key] = Counter()
        #: key → monotonic time of its first delivery.
        self.first_seen: dict[Key, float] = {}
        self.notes: dict[str, Any] = {}
        self.checked = False
        self.cleared_at: float | None = None
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    # -- the exchange side -------------------------------------------------------------

    async def start(self, *, bind: bool = True, routing_key: str = "#") -> None:
        """
        Declare the exchange and the durable tap queue, and start counting. With
        ``bind=False`` the tap is bound only by :meth:`bind` (unroutable scenarios);
        ``routing_key`` is what it is bound with.
        """
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": "chaos-ledger"}
        )
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(self.queue_name, durable=True)
        if bind:
            await queue.bind(exchange, routing_key)
        await queue.consume(self._on_message)
        self._queue, self._exchange = queue, exchange

    async def bind(self, routing_key: str = "#") -> None:
        """Bind the tap queue to the exchange (``#``: everything)."""
        assert self._queue is not None and self._exchange is not None  # started first
        await self._queue.bind(self._exchange, routing_key)

    async def stop(self) -> None:
        """Close the tap's connection, then delete its queue."""
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        # Closed first: a robust channel that lost its queue would declare it again.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10 * UNIT):
                await connection.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10 * UNIT):
                plain = await aio_pika.connect(self.url)
                async with plain:
                    channel = await plain.channel()
                    await channel.queue_delete(self.queue_name)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = _key(message)
        # A redelivery to the tap itself (its connection dropped before our ack) is not
        # a duplicate the listener made.
        if not (message.redelivered and key in self.deliveries):
            self.deliveries[key] += 1
            self.first_seen.setdefault(key, time.monotonic())
        with contextlib.suppress(Exception):  # the tap's channel may be closing; redelivered
            await message.ack()

    # -- the acknowledged side ------------------------------------------------------------

    def acknowledge(self, source: str, ids: Iterable[str], *, at: float | None = None) -> None:
        """
        Record events the listener acknowledged (answered 2xx, or journaled its cursor),
        at ``at`` (monotonic; default now).
        """
        now = time.monotonic() if at is None else at
        for event_id in ids:
            self.acknowledged.setdefault((source, event_id), now)

    def fault_cleared(self) -> None:
        """Mark the moment the fault ended: the time to recover is measured from here."""
        self.cleared_at = time.monotonic()

    def note(self, **values: Any) -> None:
        """Add scenario-specific figures to the row (503s seen, memory growth, ...)."""
        self.notes.update(values)

    @property
    def missing(self) -> set[Key]:
        """Acknowledged events not seen at the exchange (yet)."""
        return {k for k in self.acknowledged if not self.deliveries[k]}

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until every acknowledged event was delivered, or ``timeout`` passes."""
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: not self.missing, timeout=timeout, what="ledger settled")

    def verdict(self, outcome: str = "checked") -> Verdict:
        """Classify every acknowledged event."""
        missing = self.missing
        acknowledged = len(self.acknowledged)
        duplicates = sum(count - 1 for count in self.deliveries.values() if count > 1)
        extra = sum(1 for k in self.deliveries if k not in self.acknowledged)
        recover: float | None = None
        if self.cleared_at is not None and not missing:
            owed = [
                self.first_seen[k] for k, at in self.acknowledged.items() if at <= self.cleared_at
            ]
            recover = round(max([*owed, self.cleared_at]) - self.cleared_at, 2)
        return Verdict(
            run=self.run,
            scenario=self.scenario,
            acknowledged=acknowledged,
            delivered=acknowledged - len(missing),
            lost=len(missing),
            duplicates=duplicates,
            extra=extra,
            recover_s=recover,
            outcome=outcome,
            notes=dict(self.notes),
        )

    async def check(self, timeout: float = 60.0, *, min_acknowledged: int = 1) -> Verdict:
        """
        Settle, record the row, and assert that nothing acknowledged was lost.

        Raises:
            AssertionError: an acknowledged event never reached the exchange, or the
                scenario acknowledged fewer than ``min_acknowledged`` events.
        """
        await self.settle(timeout)
        # Late duplicates (an unconfirmed publish repeated after a reconnect) still land
        # shortly after the last first delivery; give them a moment to be counted.
        await asyncio.sleep(0.3 * UNIT)
        verdict = self.verdict("ok" if not self.missing else "LOST")
        self.checked = True
        record(verdict)
        assert len(self.acknowledged) >= min_acknowledged, (
            f"the scenario acknowledged only {len(self.acknowledged)} events"
        )
        lost = sorted(self.missing)
        assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:5]}"
        return verdict


def _key(message: aio_pika.abc.AbstractIncomingMessage) -> Key:
    source = ""
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        source = str(orjson.loads(message.body).get("source", ""))
    return source, message.message_id or ""


def record(verdict: Verdict) -> None:
    """Append ``verdict`` to the results file."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as out:
        out.write(orjson.dumps(asdict(verdict)) + b"\n")


@contextlib.asynccontextmanager
async def ledger(
    url: str,
    exchange: str,
    *,
    scenario: str,
    run: str,
    bind: bool = True,
    routing_key: str = "#",
) -> AsyncIterator[Ledger]:
    """A started :class:`Ledger`; a scenario that ends before its check still gets a row."""
    book = Ledger(url, exchange, scenario=scenario, run=run)
    await book.start(bind=bind, routing_key=routing_key)
    try:
        yield book
    finally:
        if not book.checked:
            record(book.verdict(outcome="incomplete"))
        await book.stop()
