"""
The command line (CONTRACT §2), built on click.

Exit codes: 0 success; 2 bad configuration or bad arguments (one line per problem,
no traceback); 1 an unexpected failure.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from listener.config import Config, config_path, load_config, render_config, secret_values
from listener.exceptions import ConfigError
from listener.logs import configure_logging

__all__ = ["main", "run_async"]

_T = TypeVar("_T")

CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $LISTENER_CONFIG, then ./config.yaml).",
)


def run_async(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``main`` on uvloop when it is installed (NOTES: ~15% more publishes/s)."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def load_or_exit(config_file: Path | None) -> Config:
    """Load the configuration, or print one line per problem and exit 2."""
    path = config_path(config_file)
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"config error: {problem}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="listener")
def main() -> None:
    """listener: Layerx402 streams and Get Smart Token webhooks → RabbitMQ CloudEvents."""


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
    from listener.service import Service  # noqa: PLC0415 - keeps check-config light

    config = load_or_exit(config_file)
    configure_logging(level=config.log.level, fmt=config.log.format, secrets=secret_values(config))
    service = Service(config)

    async def serve() -> None:
        service.install_signal_handlers()
        await service.run()

    try:
        run_async(serve)
    except OSError as exc:
        click.echo(f"listener: cannot start: {exc}", err=True)
        sys.exit(1)


def _register_optional_commands() -> None:
    # Commands that live in their own modules; absent until those modules exist.
    import importlib  # noqa: PLC0415

    for module_name in (
        "listener.demo",
        "listener.replay",
        "listener.quarantine",
        "listener.simulate",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register_optional_commands()
