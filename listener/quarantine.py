"""
Quarantine: inspect, redrive and purge what failed validation (CONTRACT §2, §7).

Every quarantined payload is kept raw in the journal (``kind = 'quarantine'``) with its
reason, besides going to ``<exchange>.quarantine``, so all of this works from the
journal alone, while a daemon runs on it. Quarantine rows are never pruned by
retention: they stay until redriven or purged.

* ``list`` shows id (``q_...``, as the webhook answer gave it), source, reason,
  received time and detail of what is still quarantined (also ``/v1/quarantine``).
* ``redrive`` re-validates with the current handlers and publishes what passes
  (:mod:`listener.redrive`).
* ``purge --before T`` deletes quarantine rows received before ``T``, in small
  batches so the daemon's commits never wait long. Rows not yet sent to the
  quarantine exchange are kept: the daemon still owes them.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from listener.config import Config, secret_values
from listener.envelope import rfc3339
from listener.exceptions import JournalError, PublishError
from listener.journal import REDRIVEN
from listener.journalfile import JournalFile
from listener.logs import configure_logging
from listener.redrive import ROW_COLUMNS, QuarantinedRow, RedriveReport, redrive
from listener.replay import CONFIG_OPTION
from listener.selection import JournalReader, parse_time

__all__ = ["command", "list_quarantined", "purge"]

BATCH = 500
_PURGE = (
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE kind = 'quarantine'"
    " AND status != 0 AND received_at < ? ORDER BY seq LIMIT ?)"
)


async def list_quarantined(
    reader: JournalReader,
    *,
    limit: int,
    offset: int = 0,
    reason: str | None = None,
    source: str | None = None,
) -> tuple[list[QuarantinedRow], int]:
    """What is still quarantined (not redriven), oldest first, and how many in all."""
    where = "kind = 'quarantine' AND status != ?"
    args: list[Any] = [REDRIVEN]
    if reason is not None:
        where += " AND reason = ?"
        args.append(reason)
    if source is not None:
        where += " AND source = ?"
        args.append(source)
    ((total,),) = await reader.query(f"SELECT count(*) FROM events WHERE {where}", args)  # noqa: S608 - constant fragments
    rows = await reader.query(
        f"SELECT {ROW_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ? OFFSET ?",  # noqa: S608 - constant fragments
        [*args, limit, offset],
    )
    return [QuarantinedRow.from_row(r) for r in rows], int(total)


async def purge(journal: JournalFile, *, before: float, batch: int = BATCH) -> int:
    """
    Delete quarantine rows received before ``before``, ``batch`` per transaction.

    Rows not yet sent to the quarantine exchange are kept (the daemon still owes them).
    """
    total = 0
    while True:
        deleted = await journal.write(lambda conn: conn.execute(_PURGE, (before, batch)).rowcount)
        total += deleted
        if deleted < batch:
            return total


# -- the command line ---------------------------------------------------------------


@click.group("quarantine")
def command() -> None:
    """Inspect, redrive and purge quarantined events."""


def _open(config_file: Path | None, *, writable: bool) -> tuple[Config, JournalFile]:
    from listener.cli import load_or_exit  # noqa: PLC0415 - see listener.replay.CONFIG_OPTION

    config = load_or_exit(config_file)
    configure_logging(level="warning", fmt=config.log.format, secrets=secret_values(config))
    return config, JournalFile(config.journal.path, writable=writable)


def _run(main: Any) -> Any:
    from listener.cli import run_async  # noqa: PLC0415 - see listener.replay.CONFIG_OPTION

    try:
        return run_async(main)
    except (JournalError, PublishError) as exc:
        click.echo(f"quarantine: {exc}", err=True)
        sys.exit(1)


@command.command("list")
@CONFIG_OPTION
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--reason", help="Only this reason (invalid_json, schema_violation, ...).")
@click.option("--source", metavar="NAME", help="Only this source.")
def list_command(
    *, config_file: Path | None, limit: int, reason: str | None, source: str | None
) -> None:
    """Show quarantined events: id, source, reason, received time, detail."""
    _, journal = _open(config_file, writable=False)

    async def main() -> tuple[list[QuarantinedRow], int]:
        async with journal:
            return await list_quarantined(journal, limit=limit, reason=reason, source=source)

    rows, total = _run(main)
    console = Console()
    if console.is_terminal:
        table = Table("id", "source", "reason", "received", "detail", title="quarantine")
        for row in rows:
            table.add_row(row.id, row.source, row.reason, row.received, row.detail)
        console.print(table)
    else:
        for row in rows:
            click.echo("\t".join((row.id, row.source, row.reason, row.received, row.detail)))
    click.echo(f"{len(rows)} of {total} quarantined events shown", err=not console.is_terminal)


@command.command("redrive")
@CONFIG_OPTION
@click.option("--id", "ids", multiple=True, metavar="ID", help="Only this id (repeatable).")
def redrive_command(*, config_file: Path | None, ids: tuple[str, ...]) -> None:
    """Re-validate with the current handlers; publish what passes now."""
    config, journal = _open(config_file, writable=True)

    async def main() -> RedriveReport:
        async with journal:
            if ids:
                marks = ",".join("?" * len(ids))
                found = await journal.query(
                    "SELECT event_id FROM events"  # noqa: S608 - placeholders only
                    f" WHERE kind = 'quarantine' AND event_id IN ({marks})",
                    ids,
                )
                missing = sorted(set(ids) - {str(r[0]) for r in found})
                if missing:
                    raise click.BadParameter(
                        f"no quarantined event {', '.join(missing)}", param_hint="'--id'"
                    )
            return await redrive(config, journal, ids)

    report = _run(main)
    for row, entry in report.redriven:
        click.echo(f"redriven\t{row.id}\t{row.source}\t{entry.event_id}\t{entry.routing_key}")
    for row, verdict in report.failing:
        click.echo(f"quarantined\t{row.id}\t{row.source}\t{verdict.reason}\t{verdict.detail}")
    for row, why in report.skipped:
        click.echo(f"skipped\t{row.id}\t{row.source}\t{why}")
    for row, entry in report.unroutable:
        click.echo(f"unroutable\t{row.id}\t{row.source}\t{entry.routing_key}")
    click.echo(report.summary())


@command.command("purge")
@CONFIG_OPTION
@click.option("--before", metavar="T", required=True, help="ISO-8601 or 7d (ago).")
def purge_command(*, config_file: Path | None, before: str) -> None:
    """Delete quarantined events received before T."""
    try:
        cutoff = parse_time(before, now=time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--before'") from None
    _, journal = _open(config_file, writable=True)

    async def main() -> int:
        async with journal:
            return await purge(journal, before=cutoff)

    deleted = _run(main)
    moment = rfc3339(datetime.fromtimestamp(cutoff, UTC))
    click.echo(f"purged {deleted} quarantined events received before {moment}")
