"""
What a poll learned, turned into events and state (CONTRACT §9): change by content,
never by a ``>=`` cursor.

For each record of an answer, the content hash is compared with the one the journal
holds for its key: the same → nothing; none (first sight) → an event (under
``initial: silent``, only remembered until the resource's first whole poll succeeded);
another → an event with the changed fields and their previous values. The events, the
new state of every key and renamed items are written in **one** journal transaction
(:class:`listener.journal.writes.PollWrite`): a crash before it loses nothing (the next
poll sees the same change, with the same id), and after it duplicates nothing (the
state says it was seen).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel

from handlers import Quarantine
from handlers.polling import Page, Record, Renamed, canonical
from listener.envelope import Entry
from listener.journal.writes import PollWrite
from listener.logs import redact
from listener.sources.poll_budget import utc_now
from listener.sources.websocket_policy import iso

if TYPE_CHECKING:
    from listener.sources.poll import PollSource

__all__ = ["Resource", "commit_page", "quarantine"]


@dataclass(slots=True)
class Resource:
    """One configured resource of a poll source, and where its polling is."""

    label: str
    model: BaseModel
    state: str = "pending"
    error: str | None = None
    primed: bool = False
    last_poll: float | None = None
    last_success: float | None = None
    last_change: float | None = None
    next_poll: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> dict[str, Any]:
        """For ``/v1/sources`` (``error`` is the provider's words; ``/readyz`` drops it)."""
        return {
            "resource": self.label,
            "state": self.state,
            "last_poll": iso(self.last_poll),
            "last_success": iso(self.last_success),
            "last_change": iso(self.last_change),
            "next_poll": iso(self.next_poll or None),
            **({"error": self.error} if self.error else {}),
        }

    async def sleep_until_due(self) -> None:
        """Wait until ``next_poll``, or until woken (``POST .../poll``)."""
        delay = self.next_poll - time.time()
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass
        self.wake.clear()

    def fail(self, state: str, detail: str) -> None:
        self.state, self.error = state, redact(detail)[:300]

    def succeeded(self) -> None:
        self.state, self.error = "ok", None
        self.last_success = time.time()
        self.primed = True


def _canonical(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


# An answer is kept in quarantine for inspection, not to be redriven (the next poll asks
# again): its head is enough, and whole 64 MiB answers, poll after poll, filled the
# journal every source shares.
QUARANTINE_KEEP = 2**20


async def quarantine(source: PollSource, payload: bytes, verdict: Quarantine) -> None:
    """Journal an answer (or an item) that is not usable, with its reason (and its head)."""
    intake = source.intake
    entry = intake.build(verdict, raw=payload, received_at=time.time(), keep=QUARANTINE_KEEP)
    (new,) = await source.journal.append([entry])
    intake.record(entry, new=new)


# Records written per transaction: an answer of 300,000 valid rows went in as one,
# and every other source's appends (webhooks: their 2xx) waited behind it for seconds.
CHUNK = 2000


async def commit_page(
    source: PollSource, resource: Resource, page: Page, renames: Sequence[Renamed]
) -> None:
    """
    Write the changes of one answer with their state, :data:`CHUNK` records a
    transaction, the renames with the last. Each change is durable with its state: a
    crash between two leaves the rest unwritten, found again (same ids) by the next poll.
    """
    records = page.records
    if page.rejection is not None:  # rows not valid beside valid ones: kept, with why
        await quarantine(source, _canonical(canonical(list(page.rejected))), page.rejection)
    for start in range(0, max(len(records), 1), CHUNK):
        last = start + CHUNK >= len(records)
        await _commit_records(
            source, resource, records[start : start + CHUNK], renames if last else ()
        )


async def _commit_records(
    source: PollSource, resource: Resource, records: Sequence[Record], renames: Sequence[Renamed]
) -> None:
    provider, intake, journal = source.provider, source.intake, source.journal
    known = await journal.poll_states(source.name, [record.key for record in records])
    observed = utc_now()
    silent = source.config.initial == "silent" and not resource.primed
    entries: list[Entry] = []
    states: list[tuple[str, str, bytes, int]] = []
    for record in records:
        before = known.get(record.key)
        if before is not None and before[0] == record.hash:
            continue
        previous = None
        if before is not None:
            content = orjson.loads(before[1])
            previous = Record(record.key, content, content, before[0], changes=before[2])
        changes = 0 if previous is None else previous.changes + 1
        states.append((record.key, record.hash, _canonical(record.content), changes))
        if previous is None and silent:
            continue  # first sight, remembered only
        event = provider.change_event(record, previous, observed=observed)
        entries.append(intake.build(event, raw=_canonical(record.data), received_at=time.time()))
    for renamed in renames:
        event = provider.rename_event(renamed, observed=observed)
        raw = _canonical({"old": renamed.old_id, "new": renamed.new_id})
        entries.append(intake.build(event, raw=raw, received_at=time.time()))
    write = PollWrite(source.name, states=states, aliases=[(r.item, r.new_id) for r in renames])
    flags = await journal.append(entries, poll=write)
    for entry, new in zip(entries, flags, strict=True):
        intake.record(entry, new=new)
        if new and entry.kind == "event":
            source.metrics.poll_changes.labels(source.name, entry.routing_key).inc()
    if any(flags):
        resource.last_change = time.time()
