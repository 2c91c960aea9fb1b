"""
What every command shares: the ``--config`` option, loading it (exit 2 on a bad one)
and logging set up for a command (warnings only; secrets redacted).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from listener.config import Config
from listener.config_loader import config_path, load_config, secret_values
from listener.exceptions import ConfigError
from listener.logs import configure_logging

__all__ = ["CONFIG_OPTION", "command_config", "load_or_exit"]

CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $LISTENER_CONFIG, then ./config.yaml).",
)


def load_or_exit(config_file: Path | None) -> Config:
    """Load the configuration, or print one line per problem and exit 2."""
    path = config_path(config_file)
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"config error: {problem}", err=True)
        sys.exit(2)


def command_config(config_file: Path | None) -> Config:
    """The configuration for a command other than ``run``, with its logging set up."""
    config = load_or_exit(config_file)
    configure_logging(level="warning", fmt=config.log.format, secrets=secret_values(config))
    return config
