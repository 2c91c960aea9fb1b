"""
Redrive: run quarantined payloads through the current handlers again (CONTRACT §2).

Each payload is re-validated with its source's current configuration and handler: a
webhook body with the provider's ``parse``, a stream frame with its ``parse_frame``.

* What now passes is published to ``<exchange>`` as a normal event, with publisher
  confirms (:class:`listener.confirms.ConfirmWindow`), then, in one short
  transaction, journaled as a published event (so it replays and deduplicates like
  any other) and its quarantine row marked redriven (status 2).
* An event whose id the journal already holds is not published again (the provider
  may have resent it fixed); its quarantine row is marked redriven all the same.
* What still fails keeps its row, with the new reason and detail.
* Rows the daemon has not yet sent to the quarantine exchange (status 0) are left to
  it: its pending count includes them. Records of a loss (``frame_too_large``) hold no
  payload to re-validate, and rows of a source no longer configured have no handler:
  both are skipped.

Published first, recorded second: a crash between the two publishes the event again
on the next redrive, which consumers drop as a duplicate (at least once).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq

from handlers import Event, Quarantine, StreamProvider, WebhookProvider, load_provider
from handlers.layerx402 import EventFrame, Unparseable
from listener.config import Config, SourceConfig, WebhookSourceConfig, mask_url
from listener.confirms import ConfirmWindow
from listener.envelope import Entry, event_entry, rfc3339
from listener.exceptions import PublishError
from listener.journal import PUBLISHED, REDRIVEN, StoredEntry
from listener.journalfile import JournalFile
from listener.publisher import declare_topology, properties_for

__all__ = ["ROW_COLUMNS", "QuarantinedRow", "RedriveReport", "redrive", "revalidate"]

# Verdicts that record a loss rather than keep a payload: nothing to re-validate.
NOT_REDRIVABLE = frozenset({"frame_too_large"})
BATCH = 500
ROW_COLUMNS = "seq, source, event_id, body, received_at, reason, detail, status"
_STATUS = {0: "pending", PUBLISHED: "quarantined", REDRIVEN: "redriven"}


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    """A quarantine row of the journal."""

    seq: int
    id: str
    source: str
    body: bytes
    received_at: float
    reason: str
    detail: str
    status: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> QuarantinedRow:
        seq, source, event_id, body, received_at, reason, detail, status = row
        return cls(
            seq, event_id, source, bytes(body), received_at, reason or "", detail or "", status
        )

    @property
    def received(self) -> str:
        """The received time, RFC 3339."""
        return rfc3339(datetime.fromtimestamp(self.received_at, UTC))

    def as_dict(self, *, payload_max: int = 4096) -> dict[str, Any]:
        """The JSON view: the payload as text, cut at ``payload_max`` characters."""
        text = self.body.decode("utf-8", errors="replace")
        return {
            "id": self.id,
            "seq": self.seq,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "received_at": self.received,
            "status": _STATUS.get(self.status, str(self.status)),
            "size": len(self.body),
            "payload": text[:payload_max],
            "payload_truncated": len(text) > payload_max,
        }


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
            line += f", unroutable {len(self.unroutable)} (left quarantined)"
        return line


def revalidate(source: SourceConfig | None, row: QuarantinedRow) -> Entry | Quarantine | str:
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
    provider = load_provider(source.provider)
    result: Event | Quarantine
    if isinstance(source, WebhookSourceConfig):
        assert isinstance(provider, WebhookProvider)  # checked when the config loaded
        result = provider.parse(
            row.body, environment=source.environment, unknown_types=source.unknown_types
        )
    else:
        assert isinstance(provider, StreamProvider)  # checked when the config loaded
        frame = provider.parse_frame(row.body)
        if isinstance(frame, EventFrame):
            result = frame.result
        elif isinstance(frame, Unparseable):
            result = frame.verdict
        else:
            result = Quarantine("schema_violation", f"not an event frame: {type(frame).__name__}")
    if isinstance(result, Quarantine):
        return result
    return event_entry(
        source=row.source, provider=provider.name, event=result, received_at=row.received_at
    )


async def redrive(config: Config, journal: JournalFile, ids: Sequence[str] = ()) -> RedriveReport:
    """
    Re-validate quarantined rows (all, or those with ``ids``) and publish what passes.

    Raises:
        PublishError: the broker failed; rows handled before stay handled.
        JournalError: the journal failed.
    """
    report = RedriveReport()
    sources = {s.name: s for s in config.sources}
    connection: aio_pika.abc.AbstractConnection | None = None
    after = 0
    try:
        while True:
            where = "kind = 'quarantine' AND status != ? AND seq > ?"
            args: list[Any] = [REDRIVEN, after]
            if ids:
                where += f" AND event_id IN ({','.join('?' * len(ids))})"
                args.extend(ids)
            rows = [
                QuarantinedRow.from_row(r)
                for r in await journal.query(
                    f"SELECT {ROW_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ?",  # noqa: S608 - constant fragments
                    [*args, BATCH],
                )
            ]
            if not rows:
                return report
            after = rows[-1].seq
            passing: list[tuple[QuarantinedRow, Entry]] = []
            failing: list[tuple[QuarantinedRow, Quarantine]] = []
            for row in rows:
                if row.status != PUBLISHED:
                    report.skipped.append((row, "not yet sent to the quarantine exchange"))
                    continue
                outcome = revalidate(sources.get(row.source), row)
                if isinstance(outcome, Entry):
                    passing.append((row, outcome))
                elif isinstance(outcome, Quarantine):
                    failing.append((row, outcome))
                else:
                    report.skipped.append((row, outcome))
            fresh, duplicates = await _split_journaled(journal, passing)
            unroutable: list[tuple[QuarantinedRow, Entry]] = []
            if fresh:
                if connection is None:
                    connection = await _connect(config)
                returned = await _publish(connection, config, [entry for _, entry in fresh])
                unroutable = [p for p in fresh if p[1].event_id in returned]
                fresh = [p for p in fresh if p[1].event_id not in returned]
            await journal.write(functools.partial(_record, fresh, duplicates, failing))
            report.redriven.extend(fresh)
            report.duplicates.extend(duplicates)
            report.failing.extend(failing)
            report.unroutable.extend(unroutable)
    finally:
        if connection is not None:
            await connection.close()


async def _split_journaled(
    journal: JournalFile, passing: list[tuple[QuarantinedRow, Entry]]
) -> tuple[list[tuple[QuarantinedRow, Entry]], list[tuple[QuarantinedRow, Entry]]]:
    """Split into events not yet in the journal and those already there (or twice here)."""
    if not passing:
        return [], []
    pairs = [(entry.source, entry.event_id) for _, entry in passing]
    values = ",".join("(?, ?)" for _ in pairs)
    found = await journal.query(
        f"SELECT source, event_id FROM events WHERE (source, event_id) IN (VALUES {values})",  # noqa: S608 - placeholders only
        [v for pair in pairs for v in pair],
    )
    seen = {(str(source), str(event_id)) for source, event_id in found}
    fresh: list[tuple[QuarantinedRow, Entry]] = []
    duplicates: list[tuple[QuarantinedRow, Entry]] = []
    for row, entry in passing:
        key = (entry.source, entry.event_id)
        (duplicates if key in seen else fresh).append((row, entry))
        seen.add(key)
    return fresh, duplicates


async def _connect(config: Config) -> aio_pika.abc.AbstractConnection:
    url = config.broker.url.get_secret_value()
    try:
        return await aio_pika.connect(
            url,
            timeout=config.broker.connect_timeout,
            client_properties={"connection_name": "listener-redrive"},
        )
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        raise PublishError(
            f"cannot reach the broker at {mask_url(url)} ({type(exc).__name__}: {exc})",
            message_id="",
        ) from exc


async def _publish(
    connection: aio_pika.abc.AbstractConnection, config: Config, entries: list[Entry]
) -> set[str]:
    """Publish with confirms; return the ids the broker returned as unroutable."""
    async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
        await declare_topology(channel, config.broker)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # the concrete channel takes wait=False
        window = ConfirmWindow(
            underlay, size=config.broker.confirm_window, timeout=config.broker.publish_timeout
        )
        async with window:
            for entry in entries:
                await window.publish(
                    entry.body,
                    exchange=config.broker.exchange,
                    routing_key=entry.routing_key,
                    properties=properties_for(StoredEntry(seq=0, entry=entry)),
                )
        return set(window.returned_ids)


def _record(
    published: list[tuple[QuarantinedRow, Entry]],
    duplicates: list[tuple[QuarantinedRow, Entry]],
    failing: list[tuple[QuarantinedRow, Quarantine]],
    conn: sqlite3.Connection,
) -> None:
    now = time.time()
    conn.executemany(
        "INSERT INTO events (source, event_id, kind, routing_key, body, time, received_at,"
        " status, published_at) VALUES (?, ?, 'event', ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (source, event_id) DO NOTHING",
        [
            (e.source, e.event_id, e.routing_key, e.body, e.time, e.received_at, PUBLISHED, now)
            for _, e in published
        ],
    )
    conn.executemany(
        "UPDATE events SET status = ?, published_at = ? WHERE seq = ?",
        [(REDRIVEN, now, row.seq) for row, _ in [*published, *duplicates]],
    )
    conn.executemany(
        "UPDATE events SET reason = ?, detail = ? WHERE seq = ?",
        [(v.reason, v.detail[:1000], row.seq) for row, v in failing],
    )
