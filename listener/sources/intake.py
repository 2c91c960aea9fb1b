"""
The intake step, the same for every source kind and for redrive (STYLE: data flows
one way): a handler's result (an :class:`~handlers.Event` or a
:class:`~handlers.Quarantine`) → one journal :class:`~listener.envelope.Entry` → once
the journal has answered, the metrics and the log line.

Intake never raises on provider content: an event that validated but cannot be
enveloped (a date past what UTC can hold, a value JSON cannot write, nesting past the
serialiser's limit) becomes a quarantine entry with reason ``unrepresentable`` and
the raw input as its payload, so the input is kept, the stream's cursor can move past
it, and nothing crashes or loops (STYLE: "intake never raises on provider content").

Metric labels stay bounded: an event type the provider's handler does not declare
(a provider may invent any number) is counted under the type ``other``
(:meth:`listener.metrics.Metrics.type_label`).
"""

from __future__ import annotations

import time
from collections.abc import Collection

import structlog

from handlers import Event, Quarantine
from listener.envelope import Entry, event_entry, quarantine_entry
from listener.logs import redact, redact_bytes
from listener.metrics import Metrics

__all__ = ["Intake"]

log = structlog.get_logger("listener.intake")


class Intake:
    """One source's intake: builds entries, and records outcomes once they are durable."""

    def __init__(
        self,
        *,
        source: str,
        provider: str,
        metrics: Metrics,
        known_types: Collection[str] | None = None,
    ) -> None:
        self.source = source
        self.provider = provider
        self._metrics = metrics
        if known_types is not None:
            metrics.declare_types(source, known_types)
        self._quarantined = metrics.events_quarantined
        self._duplicates = metrics.events_duplicate.labels(source)
        self.events_received = 0
        self.last_event_at: float | None = None

    def build(
        self,
        result: Event | Quarantine,
        *,
        raw: bytes,
        received_at: float,
        keep: int | None = None,
    ) -> Entry:
        """
        The journal entry for ``result``; never raises. A quarantined ``raw`` over
        ``keep`` bytes is kept cut to them, the detail saying so.
        """
        if isinstance(result, Event):
            try:
                return event_entry(
                    source=self.source,
                    provider=self.provider,
                    event=result,
                    received_at=received_at,
                )
            except (TypeError, ValueError, OverflowError) as exc:
                # orjson raises TypeError past its depth or 64-bit limits; datetime
                # raises OverflowError/ValueError converting an extreme time to UTC.
                result = Quarantine(
                    "unrepresentable", f"valid, but cannot be written as a CloudEvent: {exc}"
                )
        # Kept, shown and published: no secret a provider echoed back (our API key).
        raw, result = redact_bytes(raw), Quarantine(result.reason, redact(result.detail))
        if keep is not None and len(raw) > keep:
            detail = f"{result.detail}; the first {keep} of {len(raw)} bytes kept"
            raw, result = raw[:keep], Quarantine(result.reason, detail)
        return quarantine_entry(
            source=self.source, payload=raw, verdict=result, received_at=received_at
        )

    def record(self, entry: Entry, *, new: bool) -> None:
        """Count and log an entry the journal has answered for (durable, or a duplicate)."""
        if not new:
            self._duplicates.inc()
            return
        if entry.kind == "quarantine":
            self._quarantined.labels(self.source, entry.reason or "unknown").inc()
            log.info(
                "event_quarantined",
                source=self.source,
                reason=entry.reason,
                detail=entry.detail,
                id=entry.event_id,
            )
            return
        self._metrics.received(self.source, entry.routing_key).inc()
        self.events_received += 1
        self.last_event_at = time.time()
