"""
Prometheus metrics (CONTRACT §7), on a registry owned by the running service rather
than the process-global default, so tests and several services in one process never
share counters.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["OTHER_TYPE", "LoopCounter", "LoopHistogram", "Metrics", "watch_loop_lag"]

OTHER_TYPE = "other"
# Cached (source, type) lookups kept at most; unknown types map to one label anyway.
_CHILD_CACHE = 10_000

LOOP_LAG_INTERVAL = 0.1  # seconds between the event loop lag probes
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A commit with its fsync takes a few tenths of a millisecond on a quick disk.
_JOURNAL_BUCKETS = (0.00025, 0.0005, *_LATENCY_BUCKETS)
# Receipt to confirm spans a broker outage: its p99 read 60 s whatever the outage's length.
_LAG_BUCKETS = (*_LATENCY_BUCKETS, 300, 900, 3600, 14400, 86400)


async def watch_loop_lag(histogram: Histogram, *, interval: float = LOOP_LAG_INTERVAL) -> None:
    """
    Observe, every ``interval``, how late a sleep of that length woke: the time a
    request arriving then would have waited for the loop (a long callback, a commit
    on a slow disk, or the process not scheduled on a busy host). Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - due))


class LoopHistogram:
    """
    A histogram only the event loop's thread observes, for the per-event ones: no lock.
    prometheus_client's ``Histogram.observe`` takes a lock for the bucket and another
    for the sum (0.8 µs, measured); this is a list index and two additions (0.2 µs).
    Exposed exactly as a ``Histogram`` is (``_bucket``, ``_count``, ``_sum``, ``_created``),
    with its ``_name``, ``_type`` and ``_labelnames`` (no labels).
    """

    _type = "histogram"
    _labelnames: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        # The bounds as prometheus_client spells them ("1.0", "+Inf"), for the same text.
        self._les = tuple(
            floatToGoString(b)  # type: ignore[no-untyped-call]  # the library leaves it unannotated
            for b in (*self._bounds, math.inf)
        )
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose bound it does not exceed."""
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> list[Metric]:
        """The histogram family (a scrape on another thread reads a copy of the counts)."""
        counts, total = list(self._counts), self._sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(self._les, counts, strict=True):
            running += count
            buckets.append((le, running))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total)
        family.samples.append(Sample(f"{self._name}_created", {}, self._created))
        return [family]

    def describe(self) -> list[Metric]:
        """The family without samples (the registry checks names with it)."""
        return [HistogramMetricFamily(self._name, self._documentation)]


class LoopCount:
    """One labelled child of a :class:`LoopCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount


class LoopCounter:
    """
    A labelled counter only the event loop's thread increments: no lock per event.
    Exposed exactly as a ``Counter`` is, with its ``_name``, ``_type`` and ``_labelnames``.
    """

    _type = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopCount:
        """The child for these label values (created at zero on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopCount()
        return child

    def collect(self) -> list[Metric]:
        """The counter family, ``_total`` and ``_created`` per child."""
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value, created=child.created)
        return [family]

    def describe(self) -> list[Metric]:
        """The family without samples (the registry checks names with it)."""
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]


class Metrics:
    """Every metric the listener exports, registered on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._received_children: dict[tuple[str, str], LoopCount] = {}
        self._published_children: dict[tuple[str, str], LoopCount] = {}
        # Event types each source's provider declares; others are labelled "other".
        self._known: dict[str, frozenset[str]] = {}
        self.events_received = LoopCounter(
            "listener_events_received",
            "Events accepted into the journal.",
            ["source", "type"],
            registry=r,
        )
        self.events_published = LoopCounter(
            "listener_events_published",
            "Events confirmed by the broker.",
            ["source", "type"],
            registry=r,
        )
        self.events_quarantined = Counter(
            "listener_events_quarantined", "Inputs quarantined.", ["source", "reason"], registry=r
        )
        self.events_duplicate = Counter(
            "listener_events_duplicate", "Events already journaled.", ["source"], registry=r
        )
        self.public_refused = Counter(
            "listener_public_connections_refused",
            "Connections to the public port refused at http.max_connections (none idle).",
            registry=r,
        )
        self.webhook_rejected = Counter(
            "listener_webhook_rejected",
            "Webhook requests refused.",
            ["source", "reason"],
            registry=r,
        )
        self.publish_failures = Counter(
            "listener_publish_failures",
            "Messages returned or nacked; publishing sessions ended (timeout, connection, ...).",
            ["reason"],
            registry=r,
        )
        self.journal_pending = Gauge(
            "listener_journal_pending", "Journal entries not yet confirmed.", registry=r
        )
        self.journal_deferred = Gauge(
            "listener_journal_deferred",
            "Journal entries the broker returned or nacked, waiting for their retry.",
            registry=r,
        )
        self.journal_bytes = Gauge(
            "listener_journal_bytes", "Bytes of the journal database in use.", registry=r
        )
        self.ready = Gauge(
            "listener_ready",
            "1 while /readyz answers 200 (check=all), or /readyz?for=intake (check=intake:"
            " webhooks are journaled; 0 while the journal is full or failing).",
            ["check"],
            registry=r,
        )
        self.asyncio_tasks = Gauge(
            "listener_asyncio_tasks",
            "Tasks on the daemon's event loop (flat on a healthy daemon).",
            registry=r,
        )
        self.webhooks_in_flight = Gauge(
            "listener_webhook_requests_in_flight",
            "Webhook requests being verified, parsed and journaled (each is a task of its own).",
            registry=r,
        )
        self.broker_connected = Gauge(
            "listener_broker_connected", "1 while the broker connection is up.", registry=r
        )
        self.source_connected = Gauge(
            "listener_source_connected",
            "1 while a source is connected/listening.",
            ["source"],
            registry=r,
        )
        self.source_reconnects = Counter(
            "listener_source_reconnects", "Stream reconnections.", ["source"], registry=r
        )
        self.source_errors = Counter(
            "listener_source_errors",
            "Exceptions that ended a source's run (it was restarted).",
            ["source"],
            registry=r,
        )
        self.poll_requests = Counter(
            "listener_poll_requests",
            "HTTP requests of poll sources, by answer (a status, or error for no answer).",
            ["source", "status"],
            registry=r,
        )
        self.poll_last_success = Gauge(
            "listener_poll_last_success_timestamp_seconds",
            "Unix time of the last poll of a source that succeeded.",
            ["source"],
            registry=r,
        )
        self.poll_changes = Counter(
            "listener_poll_changes",
            "Change events poll sources produced.",
            ["source", "type"],
            registry=r,
        )
        self.stream_gaps = Counter(
            "listener_stream_gaps",
            "Sequence numbers the server could not resend.",
            ["source", "subscription"],
            registry=r,
        )
        self.subscription_failed = Gauge(
            "listener_subscription_failed",
            "1 for a subscription the server refused.",
            ["source", "subscription"],
            registry=r,
        )
        self.source_status = Gauge(
            "listener_source_status",
            "1 for the status a source is in now (connected, reconnecting, unauthorized, "
            "forbidden, polling, degraded, subscription_invalid, listening, stopped...).",
            ["source", "status"],
            registry=r,
        )
        self._statuses: dict[str, str] = {}
        self.poll_interval = Gauge(
            "listener_poll_interval_seconds",
            "The configured interval of a poll source (alert when a success is 3 overdue).",
            ["source"],
            registry=r,
        )
        self.config_reloads = Counter(
            "listener_config_reloads",
            "SIGHUP reloads of the configuration, by result (ok, failed: the running one kept).",
            ["result"],
            registry=r,
        )
        self.config_restart_pending = Gauge(
            "listener_config_restart_pending",
            "Keys the last reload found changed that only a restart applies.",
            registry=r,
        )
        self.lease_held = Gauge(
            "listener_lease_held",
            "1 while this replica holds the unit's lease (cluster.enabled; CONTRACT §10).",
            ["unit"],
            registry=r,
        )
        self.publish_seconds = LoopHistogram(
            "listener_publish_seconds",
            "Publish to broker confirm.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_lag_seconds = LoopHistogram(
            "listener_event_lag_seconds",
            "Receipt to broker confirm.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.journal_commit_seconds = LoopHistogram(
            "listener_journal_commit_seconds",
            "One journal transaction, its fsync included.",
            buckets=_JOURNAL_BUCKETS,
            registry=r,
        )
        self.journal_wait_seconds = LoopHistogram(
            "listener_journal_wait_seconds",
            "An append from queued to durable: what an accepted event waits for the journal.",
            buckets=_JOURNAL_BUCKETS,
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "listener_event_loop_lag_seconds",
            "How late the event loop woke from a short sleep (busy, or not scheduled).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def journal_timed(self, commit: float, waits: list[float]) -> None:
        """Observe one journal commit and the waits of the appends it made durable."""
        self.journal_commit_seconds.observe(commit)
        observe = self.journal_wait_seconds.observe
        for wait in waits:
            observe(wait)

    def declare_types(self, source: str, types: Iterable[str]) -> None:
        """The event types ``source`` may label; any other counts as :data:`OTHER_TYPE`."""
        self._known[source] = frozenset(types)

    def type_label(self, source: str, type_: str) -> str:
        """``type_`` when declared for ``source`` (or nothing is declared), else ``other``.

        A provider may invent any number of types: the label set must stay bounded.
        """
        known = self._known.get(source)
        return type_ if known is None or type_ in known else OTHER_TYPE

    def received(self, source: str, type_: str) -> LoopCount:
        """The ``events_received`` child for a source and type, looked up once (hot path)."""
        key = (source, type_)
        child = self._received_children.get(key)
        if child is None:
            label = self.type_label(source, type_)
            child = self._received_children[key] = self.events_received.labels(source, label)
            if len(self._received_children) > _CHILD_CACHE:
                self._received_children.clear()
        return child

    def published(self, source: str, type_: str) -> LoopCount:
        """The ``events_published`` child for a source and type, looked up once (hot path)."""
        key = (source, type_)
        child = self._published_children.get(key)
        if child is None:
            label = self.type_label(source, type_)
            child = self._published_children[key] = self.events_published.labels(source, label)
            if len(self._published_children) > _CHILD_CACHE:
                self._published_children.clear()
        return child

    def set_source_status(self, source: str, status: str) -> None:
        """Show ``status`` as the one current status of ``source`` (the old one is removed)."""
        previous = self._statuses.get(source)
        if previous == status:
            return
        if previous is not None:
            self.source_status.remove(source, previous)
        self.source_status.labels(source, status).set(1)
        self._statuses[source] = status

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
