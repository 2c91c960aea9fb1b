"""
The command line (CONTRACT §2), built on click: one module per command. The only
package that imports click and rich (with ``listener.dev``); nothing imports it back.

Exit codes: 0 success; 2 bad configuration or bad arguments (one line per problem,
no traceback); 1 an unexpected failure.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

import click
import yaml

from listener import hangups
from listener.cli.common import CONFIG_OPTION, load_or_exit
from listener.config_loader import config_path, render_config, secret_values
from listener.exceptions import JournalError
from listener.hangups import hung_up, stopped
from listener.logs import configure_logging
from listener.loop import run_async
from listener.memory import settle_heap
from listener.sources.poll_budget import budget_warnings

__all__ = ["main"]


# Commands that live in their own modules, imported only when they run, so `listener run`
# loads no demo, simulator or replay engine (the click documentation's "lazy loading").
_LAZY = {
    "asyncapi": "listener.cli.asyncapi",
    "demo": "listener.cli.demo",
    "quarantine": "listener.cli.quarantine",
    "replay": "listener.cli.replay",
    "simulate": "listener.cli.simulate",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY})

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY:
            command = importlib.import_module(_LAZY[cmd_name]).command
            assert isinstance(command, click.Command)  # each module's one command
            return command
        return super().get_command(ctx, cmd_name)  # type: ignore[arg-type]  # click takes None here


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="listener")
def main() -> None:
    """listener: provider streams, webhooks and polls → durable CloudEvents on RabbitMQ."""


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_file: Path | None) -> None:
    """Validate the configuration and print it resolved, secrets shown as ***."""
    config = load_or_exit(config_file)
    click.echo(yaml.safe_dump(render_config(config), sort_keys=False), nl=False)
    for warning in budget_warnings(config.sources):
        click.echo(f"config warning: {warning}", err=True)


@main.command()
@CONFIG_OPTION
def run(config_file: Path | None) -> None:
    """Run the daemon until SIGTERM/SIGINT (exit 0 after a clean drain); SIGHUP reloads secrets."""
    from listener.service import Service  # noqa: PLC0415 - keeps the other commands light

    config = load_or_exit(config_file)
    configure_logging(level=config.log.level, fmt=config.log.format, secrets=secret_values(config))
    # SIGHUP re-reads the same file (with the same environment) and applies new secrets.
    service = Service(config, config_file=config_path(config_file))

    async def serve() -> None:
        service.install_signal_handlers(hung_up=hung_up())
        if stopped():  # a SIGTERM or SIGINT while it started: shut down at once
            service.stop()
        running = asyncio.create_task(service.run())
        started = asyncio.create_task(service.started.wait())
        await asyncio.wait({running, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if service.started.is_set():  # start-up's objects are built: freeze them
            settle_heap()
        await running

    try:
        run_async(serve)
    except JournalError as exc:
        # The operator must act (stop the other daemon, move a damaged file aside, let
        # the daemon write its journal): exit 2, one line, no traceback.
        started = "" if service.started.is_set() else "cannot start: "
        click.echo(f"listener: {started}{exc}", err=True)
        sys.exit(2)
    except (OSError, ExceptionGroup) as exc:
        # A port in use fails a task of the service's TaskGroup: it arrives grouped.
        error = _first_os_error(exc)
        if error is None or service.started.is_set():
            raise
        click.echo(f"listener: cannot start: {error}", err=True)
        sys.exit(1)
    finally:
        hangups.ignore()  # (the loop is closed: a signal now would change the exit code)


def _first_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, BaseExceptionGroup):
        found = (_first_os_error(e) for e in exc.exceptions)
        return next((e for e in found if e is not None), None)
    return exc if isinstance(exc, OSError) else None
