"""
Redrive: run quarantined payloads through the current handlers again (CONTRACT §2).

Each payload is re-validated with its source's current configuration and handler,
through the same intake step as live input (:class:`listener.sources.intake.Intake`):
a webhook body with the provider's ``parse``, a stream frame with its ``parse_frame``.
In the daemon's order (STYLE: data flows one way):

1. what now passes is *journaled* as a pending event, and its quarantine row marked
   redriven, in one short transaction (an event whose id the journal already holds is
   not journaled again: its row is marked all the same); what still fails keeps its
   row, with the new reason and detail;
2. the new events are then published with confirms through the one confirm window,
   and marked published. A crash between 1 and 2 loses nothing: they are pending in
   the journal, and the daemon publishes them.

Rows the daemon has not yet sent to the quarantine exchange (pending) are left to it.
Records of a loss (``frame_too_large``) hold no payload to re-validate, poll answers
are asked for again by the next poll, and rows of a source no longer configured have
no handler: all are skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq

from handlers import Event, Quarantine
from handlers.frames import EventFrame, Unparseable
from listener.broker.confirms import ConfirmWindow, Outcome, Outgoing, Sent
from listener.broker.connection import close_quietly, connect
from listener.broker.topology import Topology, declare_topology, properties_for, raw_connection
from listener.config import Config, SourceConfig
from listener.envelope import Entry
from listener.journal import Status
from listener.journal.file import JournalFile
from listener.journal.queries import (
    QuarantinedRow,
    mark_published,
    pending_rows,
    quarantine_rows,
    record_redrive,
    split_journaled,
)
from listener.metrics import Metrics
from listener.sources.intake import Intake

__all__ = ["RedriveReport", "redrive", "revalidate"]

# Verdicts that record a loss rather than keep a payload: nothing to re-validate.
NOT_REDRIVABLE = frozenset({"frame_too_large"})
BATCH = 500


@dataclass(slots=True)
class RedriveReport:
    """What a redrive did, per row: ``(row, new entry or verdict or why skipped)``."""

    redriven: list[tuple[QuarantinedRow, Entry]] = field(default_factory=list)
    duplicates: list[tuple[QuarantinedRow, Entry]] = field(default_factory=list)
    failing: list[tuple[QuarantinedRow, Quarantine]] = field(default_factory=list)
    skipped: list[tuple[QuarantinedRow, str]] = field(default_factory=list)
    unroutable: list[tuple[QuarantinedRow, Entry]] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts."""
        line = (
            f"redriven {len(self.redriven)}, already journaled {len(self.duplicates)},"
            f" still quarantined {len(self.failing)}, skipped {len(self.skipped)}"
        )
        if self.unroutable:
            line += (
                f", unroutable {len(self.unroutable)} (journaled; the daemon retries them"
                " with backoff)"
            )
        return line


def _result(source: SourceConfig, provider: Any, payload: bytes) -> Event | Quarantine | str:
    if source.kind == "webhook":
        # Only the body is kept: a provider that reads headers works without them here.
        result: Event | Quarantine = provider.parse(payload, source.settings, {})
        return result
    if source.kind == "websocket":
        frame = provider.parse_frame(payload)
        if isinstance(frame, EventFrame):
            return frame.result
        if isinstance(frame, Unparseable):
            return frame.verdict
        return Quarantine("schema_violation", f"not an event frame: {type(frame).__name__}")
    return f"{source.kind} sources ask again at the next poll; nothing to redrive"


def revalidate(
    source: SourceConfig | None, row: QuarantinedRow, intake: Intake
) -> Entry | Quarantine | str:
    """
    Run a quarantined payload through the current handler of its source.

    Returns:
        The event entry it now makes, the verdict it still gets, or why it cannot be
        re-validated.
    """
    if source is None:
        return f"source {row.source!r} is not configured"
    if row.reason in NOT_REDRIVABLE:
        return f"{row.reason} records a loss, not a payload"
    from handlers import load_provider  # noqa: PLC0415 - bound per source, once per row is cheap

    result = _result(source, load_provider(source.provider), row.body)
    if isinstance(result, str | Quarantine):
        return result
    entry = intake.build(result, raw=row.body, received_at=row.received_at)
    if entry.kind == "quarantine":
        return Quarantine(entry.reason or "unrepresentable", entry.detail or "")
    return entry


async def redrive(config: Config, journal: JournalFile, ids: Sequence[str] = ()) -> RedriveReport:
    """
    Re-validate quarantined rows (all, or those with ``ids``), journal what passes,
    then publish it.

    Raises:
        BrokerError, PublishError: the broker failed; what was journaled stays pending.
        JournalError: the journal failed.
    """
    report = RedriveReport()
    sources = {s.name: s for s in config.sources}
    metrics = Metrics()
    intakes = {
        s.name: Intake(source=s.name, provider=s.provider, metrics=metrics) for s in config.sources
    }
    pending: list[tuple[QuarantinedRow, Entry, int]] = []
    after = 0
    while rows := await quarantine_rows(journal, after=after, limit=BATCH, ids=ids):
        after = rows[-1].seq
        passing: list[tuple[QuarantinedRow, Entry]] = []
        failing: list[tuple[QuarantinedRow, Quarantine]] = []
        for row in rows:
            if row.status != Status.PUBLISHED:
                report.skipped.append((row, "not yet sent to the quarantine exchange"))
                continue
            intake = intakes.get(row.source)
            outcome = revalidate(sources.get(row.source), row, intake) if intake else None
            if isinstance(outcome, Entry):
                passing.append((row, outcome))
            elif isinstance(outcome, Quarantine):
                failing.append((row, outcome))
            else:
                report.skipped.append((row, outcome or f"source {row.source!r} is not configured"))
        fresh_at, known_at = await split_journaled(journal, [e for _, e in passing])
        fresh = [passing[i] for i in fresh_at]
        duplicates = [passing[i] for i in known_at]
        seqs: list[int | None] = await journal.write(
            functools.partial(
                record_redrive,
                fresh=[(row.seq, entry) for row, entry in fresh],
                duplicates=[row.seq for row, _ in duplicates],
                failing=[(row.seq, v.reason, v.detail) for row, v in failing],
            )
        )
        for (row, entry), seq in zip(fresh, seqs, strict=True):
            if seq is None:  # journaled meantime (by the daemon): a duplicate after all
                duplicates.append((row, entry))
            else:
                pending.append((row, entry, seq))
        report.duplicates.extend(duplicates)
        report.failing.extend(failing)
    if pending:
        returned = await _publish(config, journal, [seq for _, _, seq in pending])
        for row, entry, seq in pending:
            (report.unroutable if seq in returned else report.redriven).append((row, entry))
    return report


async def _publish(config: Config, journal: JournalFile, seqs: list[int]) -> set[int]:
    """Publish the journaled rows with confirms; mark them; return the returned seqs."""
    rows = await pending_rows(journal, seqs)  # the daemon may have published some already
    if not rows:
        return set()
    names = Topology(config.broker.exchange)
    connection = await connect(config.broker, name="listener-redrive")
    confirmed: list[int] = []
    returned: set[int] = set()

    def settled(sent: Sent, outcome: Outcome, _: float) -> None:
        if outcome is None:
            confirmed.append(sent.token)
        else:
            returned.add(sent.token)

    try:
        await declare_topology(raw_connection(connection), config.broker)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # the concrete channel the window writes to
        async with ConfirmWindow(
            underlay,
            size=config.broker.confirm_window,
            timeout=config.broker.publish_timeout,
            on_settled=settled,
        ) as window:
            for stored in rows:
                entry = stored.entry
                await window.publish(
                    Outgoing(
                        entry.body,
                        names.exchange,
                        entry.routing_key,
                        properties_for(stored),
                        stored.seq,
                    )
                )
    finally:
        await close_quietly(connection)
    await journal.write(functools.partial(mark_published, seqs=confirmed))
    return returned
