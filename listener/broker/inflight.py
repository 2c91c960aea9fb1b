"""
What the publisher writes for a journal entry, and what it keeps of it until the
broker's confirm is recorded.

A publish in flight keeps a :class:`Kept`, not its entry: the body and properties are
on the wire once written. After an outage the drain has ``broker.confirm_window``
publishes in flight at once (2,048 by default), and what they hold is a high-water mark
that Python's small-object allocator partly keeps for good (README.md: the memory
paragraph under "Health and metrics").
"""

from __future__ import annotations

from dataclasses import dataclass

from listener.broker.confirms import Outgoing
from listener.broker.topology import Topology, publish_properties
from listener.journal import Status, StoredEntry

__all__ = ["Kept", "outgoing"]


@dataclass(slots=True)  # (not frozen: one per message, and a frozen one takes 5x as long)
class Kept:
    """One message in flight, as much as recording its outcome needs."""

    seq: int
    retried: bool  # it was deferred (returned or nacked) before
    event: bool  # an event, not a quarantined payload
    source: str
    routing_key: str
    event_id: str
    received_at: float


def outgoing(stored: StoredEntry, names: Topology) -> Outgoing:
    """The publish of a journal entry, its token a :class:`Kept`."""
    entry = stored.entry
    event = entry.kind == "event"
    kept = Kept(
        stored.seq,
        stored.status == Status.DEFERRED,
        event,
        entry.source,
        entry.routing_key,
        entry.event_id,
        entry.received_at,
    )
    exchange = names.exchange if event else names.quarantine_exchange
    return Outgoing(entry.body, exchange, entry.routing_key, publish_properties(stored), kept)
