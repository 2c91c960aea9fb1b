"""
The command line (CONTRACT §2), built on click: one module per command. The only
package that imports click and rich (with ``listener.dev``); nothing imports it back.

Exit codes: 0 success; 2 bad configuration or bad arguments (one line per problem,
no traceback); 1 an unexpected failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from listener.cli import demo, quarantine, replay, simulate
from listener.cli.common import CONFIG_OPTION, load_or_exit
from listener.config_loader import render_config, secret_values
from listener.exceptions import JournalCorrupt, JournalLocked
from listener.logs import configure_logging
from listener.loop import run_async

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="listener")
def main() -> None:
    """listener: provider streams, webhooks and polls → durable CloudEvents on RabbitMQ."""


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_file: Path | None) -> None:
    """Validate the configuration and print it resolved, secrets shown as ***."""
    config = load_or_exit(config_file)
    click.echo(yaml.safe_dump(render_config(config), sort_keys=False), nl=False)


@main.command()
@CONFIG_OPTION
def run(config_file: Path | None) -> None:
    """Run the daemon until SIGTERM/SIGINT; exit 0 after a clean drain."""
    from listener.service import Service  # noqa: PLC0415 - keeps the other commands light

    config = load_or_exit(config_file)
    configure_logging(level=config.log.level, fmt=config.log.format, secrets=secret_values(config))
    service = Service(config)

    async def serve() -> None:
        service.install_signal_handlers()
        await service.run()

    try:
        run_async(serve)
    except (JournalLocked, JournalCorrupt) as exc:
        # The operator must act (stop the other daemon, move the file aside): exit 2,
        # one line, no traceback.
        click.echo(f"listener: cannot start: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"listener: cannot start: {exc}", err=True)
        sys.exit(1)


for _command in (demo.command, replay.command, quarantine.command, simulate.command):
    main.add_command(_command)
