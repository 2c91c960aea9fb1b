"""
Quarantine: inspect, redrive and purge what failed validation (CONTRACT §2, §7).

Every quarantined payload is kept raw in the journal (``kind = 'quarantine'``) with its
reason, besides going to ``<exchange>.quarantine``, so all of this works from the
journal alone, while a daemon runs on it. Quarantine rows are never pruned by
retention: they stay until redriven or purged.

* ``list`` shows id (``q_...``, as the webhook answer gave it), source, reason,
  received time and detail of what is still quarantined (also ``/v1/quarantine``).
* ``redrive`` re-validates with the current handlers, journals what passes, then
  publishes it (:mod:`listener.ops.redrive`).
* ``purge --before T`` deletes quarantine rows received before ``T``, in small
  batches so the daemon's commits never wait long. Rows not yet sent to the
  quarantine exchange are kept: the daemon still owes them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from listener.cli.common import CONFIG_OPTION, command_config
from listener.config import Config
from listener.envelope import rfc3339
from listener.exceptions import BrokerError, JournalError, PublishError
from listener.journal.file import JournalFile
from listener.journal.queries import (
    QuarantinedRow,
    list_quarantined,
    missing_quarantine_ids,
    purge_quarantine,
)
from listener.loop import run_async
from listener.ops.redrive import RedriveReport, redrive
from listener.selection import parse_time

__all__ = ["command"]

_T = TypeVar("_T")


# -- the command line ---------------------------------------------------------------


@click.group("quarantine")
def command() -> None:
    """Inspect, redrive and purge quarantined events."""


def _open(config_file: Path | None, *, writable: bool) -> tuple[Config, JournalFile]:
    config = command_config(config_file)
    return config, JournalFile(config.journal.path, writable=writable)


def _run(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    try:
        return run_async(main)
    except (JournalError, PublishError, BrokerError) as exc:
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
                missing = await missing_quarantine_ids(journal, ids)
                if missing:
                    raise click.BadParameter(
                        f"no quarantined event {', '.join(missing)}", param_hint="'--id'"
                    )
            return await redrive(config, journal, ids)

    report = _run(main)
    if Console().is_terminal:  # a line per payload; else one summary line (CONTRACT §2)
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
            return await purge_quarantine(journal, before=cutoff)

    deleted = _run(main)
    moment = rfc3339(datetime.fromtimestamp(cutoff, UTC))
    click.echo(f"purged {deleted} quarantined events received before {moment}")
