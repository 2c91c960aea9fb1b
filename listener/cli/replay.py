"""
``listener replay`` (CONTRACT §2): re-publish stored events during an incident. The
engine and what a replay selects are :mod:`listener.ops.replay`; this is the command:
progress on a terminal, one summary line otherwise, exit 2 on a bad argument naming
the option. Ctrl-C stops it cleanly after what is in flight (exit 130); a second
Ctrl-C interrupts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
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

from listener.cli.common import CONFIG_OPTION, command_config
from listener.config import Config
from listener.exceptions import (
    BrokerError,
    JournalError,
    PublishError,
    ReplayArgumentError,
    ReplayError,
)
from listener.journal.file import JournalFile
from listener.loop import run_async
from listener.ops.replay import Replay, ReplayStatus
from listener.ops.replay_request import ReplayRequest, replay_request

__all__ = ["command"]


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
    type=click.FloatRange(min=1),
    metavar="N",
    help="At most N events per second (at least 1).",
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
    config = command_config(config_file)
    running: list[ReplayStatus] = []  # the replay's status, once it exists
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
            exchange=config.broker.exchange,
        )
        status = run_async(lambda: _run_cli(request, config, running))
    except ReplayArgumentError as exc:
        raise click.BadParameter(exc.message, param_hint=f"'{exc.option}'") from None
    except (ReplayError, PublishError, JournalError, BrokerError) as exc:
        # How far it got: a long window need not be replayed again from its start.
        far = (
            f" after {running[0].published} of {running[0].total or running[0].matched}"
            " events published"
            if running
            else ""
        )
        click.echo(f"replay failed{far}: {exc}", err=True)
        sys.exit(1)
    click.echo(_summary(request, status))
    if request.dry_run:
        for type_name, count in sorted(status.by_type.items()):
            click.echo(f"  {type_name}\t{count}")
    if status.state == "cancelled":
        sys.exit(130)


@contextlib.contextmanager
def _ctrl_c_stops(replay: Replay) -> Iterator[None]:
    """The first Ctrl-C cancels the replay cleanly; the second interrupts."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        click.echo("replay: stopping after what is in flight (Ctrl-C again to abort)", err=True)
        replay.cancel()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, stop)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _run_cli(
    request: ReplayRequest, config: Config, running: list[ReplayStatus]
) -> ReplayStatus:
    journal = JournalFile(config.journal.path) if request.origin == "journal" else None
    async with (
        journal or contextlib.nullcontext(),
        Replay(request, broker=config.broker, journal=journal) as replay,
    ):
        running.append(replay.status)
        with _ctrl_c_stops(replay):
            return await _show(replay, request)


async def _show(replay: Replay, request: ReplayRequest) -> ReplayStatus:
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
    if status.state == "cancelled":
        return (
            f"replay stopped: {status.published} of {status.total or status.matched} events"
            f" published from {request.origin} to {request.target}"
        )
    line = (
        f"replayed {status.published} of {status.matched} events from {request.origin}"
        f" to {request.target} in {seconds:.1f}s ({status.published / seconds:.0f}/s)"
    )
    if status.unroutable:
        line += f"; {status.unroutable} unroutable (returned by the broker)"
    return line
