"""
Replay: re-publish stored events during an incident (CONTRACT §2 ``replay``, §4, §7).

One engine, :class:`listener.replayer.Replay`, serves ``listener replay`` and
``POST /v1/replays``; this module validates the arguments of both and runs the command.

* Sources. The journal (default) holds what was published for ``journal.retention``;
  it is read in ``seq`` order up to the last row present when the replay starts, so
  live ingestion during a replay adds nothing to it. The archive stream
  (``--from archive``, ``<exchange>.archive``) holds what was published for
  ``broker.archive.max_age``; it is read from ``x-stream-offset`` = ``--since`` (a
  minute earlier, for provider clocks running ahead) and stops at the first message
  received after the replay started, or when nothing more arrives for a second (the
  end). Stream offsets by timestamp are chunk-granular
  (https://www.rabbitmq.com/docs/streams#consuming), and the archive is in publish
  order, not event-time order, so every message is checked against the window.
* Selection. Source, type pattern and ``[since, until)`` window on the CloudEvent
  ``time``, as :mod:`listener.selection` defines them. Only published events are
  replayed; quarantined ones are redriven instead (:mod:`listener.quarantine`).
* Targets. ``--to-queue Q`` publishes through the default exchange with routing key
  ``Q``, so only that queue sees the replay; ``--to-exchange X`` routes by type.
  Either must exist already (checked with a passive declare).
* The message. Same body, same properties (``properties_for`` for journal rows, the
  stored properties for archived ones), plus the header ``x-replayed: true``.
  Publisher confirms with a window (:class:`listener.confirms.ConfirmWindow`);
  ``--rate N`` spaces publishes to at most N per second.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from listener.config import Config, secret_values
from listener.exceptions import JournalError, PublishError
from listener.journalfile import JournalFile
from listener.logs import configure_logging
from listener.replayer import (
    Replay,
    ReplayArgumentError,
    ReplayError,
    ReplayRequest,
    ReplayStatus,
)
from listener.selection import EventFilter, TopicPattern, parse_time

__all__ = ["command", "replay_request"]


def replay_request(
    *,
    since: str | None,
    until: str | None = None,
    source: str | None = None,
    type_: str | None = None,
    origin: str = "journal",
    to_queue: str | None = None,
    to_exchange: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    archive_enabled: bool = True,
    now: float | None = None,
) -> ReplayRequest:
    """
    Validate replay arguments as the CLI and the API take them.

    Raises:
        ReplayArgumentError: naming the first wrong argument.
    """
    now = time.time() if now is None else now
    if not since:
        raise ReplayArgumentError("since", "is required (ISO-8601 or relative: 15m, 2h, 1d)")
    try:
        start = parse_time(since, now=now)
    except ValueError as exc:
        raise ReplayArgumentError("since", str(exc)) from None
    end: float | None = None
    if until:
        try:
            end = parse_time(until, now=now)
        except ValueError as exc:
            raise ReplayArgumentError("until", str(exc)) from None
        if end <= start:
            raise ReplayArgumentError("until", "must be after since")
    types: TopicPattern | None = None
    if type_ is not None:
        try:
            types = TopicPattern(type_)
        except ValueError as exc:
            raise ReplayArgumentError("type", str(exc)) from None
    if source is not None and not source:
        raise ReplayArgumentError("source", "must not be empty")
    if origin not in {"journal", "archive"}:
        raise ReplayArgumentError("from", f"{origin!r}: expected journal or archive")
    if origin == "archive" and not archive_enabled:
        raise ReplayArgumentError("from", "the archive stream is off (broker.archive.enabled)")
    if to_queue is not None and to_exchange is not None:
        raise ReplayArgumentError("to_queue", "give one target: a queue or an exchange")
    for name, value in (("to_queue", to_queue), ("to_exchange", to_exchange)):
        if value is not None and not value:
            raise ReplayArgumentError(name, "must not be empty")
    if to_queue is None and to_exchange is None and not dry_run:
        raise ReplayArgumentError("to_queue", "a target is required: a queue or an exchange")
    if rate is not None and not rate > 0:
        raise ReplayArgumentError("rate", "must be a positive number of events per second")
    return ReplayRequest(
        selection=EventFilter(source=source, types=types, since=start, until=end),
        origin="archive" if origin == "archive" else "journal",
        to_queue=to_queue,
        to_exchange=to_exchange,
        dry_run=dry_run,
        rate=rate,
    )


# -- the command line ---------------------------------------------------------------

# listener.cli imports this module to register `command`. Importing listener.cli
# here, at import time, would make it register a half-built module whenever this
# module is imported first (the admin API imports the engine), so its helpers are
# imported when the command runs and the --config option is spelled out again.
CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $LISTENER_CONFIG, then ./config.yaml).",
)


@click.command("replay")
@CONFIG_OPTION
@click.option("--since", metavar="T", required=True, help="Start: ISO-8601 or 15m, 2h, 1d ago.")
@click.option("--until", metavar="T", help="End (exclusive); default: now.")
@click.option("--source", metavar="NAME", help="Only events of this source.")
@click.option("--type", "type_", metavar="PATTERN", help="AMQP pattern: getstoken.badge.*")
@click.option("--to-queue", metavar="Q", help="Deliver into this queue only.")
@click.option("--to-exchange", metavar="X", help="Publish to this exchange, routed by type.")
@click.option(
    "--from",
    "origin",
    type=click.Choice(["journal", "archive"]),
    default="journal",
    show_default=True,
    help="Read the local journal or the archive stream.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be replayed, by type.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="At most N events per second.",
)
def command(
    *,
    config_file: Path | None,
    since: str,
    until: str | None,
    source: str | None,
    type_: str | None,
    to_queue: str | None,
    to_exchange: str | None,
    origin: str,
    dry_run: bool,
    rate: float | None,
) -> None:
    """Re-publish stored events (published ones; quarantined ones are redriven)."""
    from listener.cli import load_or_exit, run_async  # noqa: PLC0415 - see CONFIG_OPTION

    config = load_or_exit(config_file)
    configure_logging(level="warning", fmt=config.log.format, secrets=secret_values(config))
    try:
        request = replay_request(
            since=since,
            until=until,
            source=source,
            type_=type_,
            origin=origin,
            to_queue=to_queue,
            to_exchange=to_exchange,
            dry_run=dry_run,
            rate=rate,
            archive_enabled=config.broker.archive.enabled,
        )
        status = run_async(lambda: _run_cli(request, config))
    except ReplayArgumentError as exc:
        raise click.BadParameter(exc.message, param_hint=f"'{exc.option}'") from None
    except (ReplayError, PublishError, JournalError) as exc:
        click.echo(f"replay failed: {exc}", err=True)
        sys.exit(1)
    click.echo(_summary(request, status))
    if request.dry_run:
        for type_name, count in sorted(status.by_type.items()):
            click.echo(f"  {type_name}\t{count}")


async def _run_cli(request: ReplayRequest, config: Config) -> ReplayStatus:
    journal = JournalFile(config.journal.path) if request.origin == "journal" else None
    async with (
        journal or contextlib.nullcontext(),
        Replay(request, broker=config.broker, journal=journal) as replay,
    ):
        console = Console(stderr=True)
        if not console.is_terminal:
            return await replay.run()
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]replay[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(f"from {request.origin} to {request.target}", total=None)

            def show(status: ReplayStatus) -> None:
                progress.update(task, total=status.total, completed=status.matched)

            replay.on_progress = show
            return await replay.run()


def _summary(request: ReplayRequest, status: ReplayStatus) -> str:
    seconds = max((status.finished_at or time.time()) - status.started_at, 1e-6)
    if request.dry_run:
        return f"dry run: {status.matched} events would be replayed from {request.origin}"
    line = (
        f"replayed {status.published} of {status.matched} events from {request.origin}"
        f" to {request.target} in {seconds:.1f}s ({status.published / seconds:.0f}/s)"
    )
    if status.unroutable:
        line += f"; {status.unroutable} unroutable (returned by the broker)"
    return line
