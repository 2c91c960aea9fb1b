"""
The event on the wire: CloudEvents 1.0, structured JSON mode (CONTRACT §4).

An :class:`Entry` is what the journal stores and the publisher sends: the body is
serialised once, at intake, and never rebuilt, so a replay is byte-identical.

* events: body = the CloudEvent; routing key = its ``type``; exchange = ``<exchange>``;
* quarantined input: body = the raw payload; routing key = the source name;
  exchange = ``<exchange>.quarantine``; headers ``x-quarantine-reason``/``-detail``.

CloudEvents spec: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import orjson

from handlers import Event, Quarantine

__all__ = ["Entry", "event_entry", "held", "quarantine_entry", "rfc3339"]

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"
CONTENT_TYPE = "application/cloudevents+json"
APP_ID = "listener"


@dataclass(frozen=True, slots=True)
class Entry:
    """
    One journal row: an event or a quarantined payload, ready to publish.

    ``event_id`` is the CloudEvent id (the AMQP ``message_id``) for events, and a
    digest of the raw payload for quarantined input, so a retried bad delivery is
    kept once. ``time`` and ``received_at`` are Unix seconds.
    """

    source: str
    event_id: str
    kind: Literal["event", "quarantine"]
    routing_key: str
    body: bytes
    time: float
    received_at: float
    reason: str | None = None
    detail: str | None = None


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` and millisecond precision when there is any."""
    moment = moment.astimezone(UTC)
    # isoformat, not strftime: faster, and four-digit years before 1000 too.
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text[:-6] + "Z"  # "+00:00" → "Z"


def held(data: bytes) -> bytes:
    """
    ``data`` in a block of its own size, for bytes kept past the call that made them.

    ``orjson.dumps`` returns its working buffer: a 1 KB CloudEvent sits in an 8 KB
    block, 5 KB of text in 64 KB (it reserves for the worst-case escaping and never
    shrinks). An entry's body lives on in the publisher's handoff, backlog and confirm
    window, thousands at once after an outage: copied, those hold what they use.
    """
    return bytes(memoryview(data))


def event_entry(*, source: str, provider: str, event: Event, received_at: float) -> Entry:
    """Wrap a validated handler event in its CloudEvent and journal entry."""
    moment = event.time or datetime.fromtimestamp(received_at, UTC)
    body = orjson.dumps(
        {
            "specversion": SPECVERSION,
            "id": event.id,
            "source": source,
            "type": event.type,
            "time": rfc3339(moment),
            "datacontenttype": DATACONTENTTYPE,
            "provider": provider,
            "data": event.data,
        }
    )
    return Entry(
        source=source,
        event_id=event.id,
        kind="event",
        routing_key=event.type,
        body=held(body),
        time=moment.timestamp(),
        received_at=received_at,
    )


def quarantine_entry(
    *, source: str, payload: bytes, verdict: Quarantine, received_at: float
) -> Entry:
    """Keep input that failed validation, raw, with the reason it failed."""
    digest = hashlib.sha256(payload).hexdigest()[:32]
    return Entry(
        source=source,
        event_id=f"q_{digest}",
        kind="quarantine",
        routing_key=source,
        body=held(payload),  # (a poll's payload may come from orjson too)
        time=received_at,
        received_at=received_at,
        reason=verdict.reason,
        detail=verdict.detail[:1000],
    )
