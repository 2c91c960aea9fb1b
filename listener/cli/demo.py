"""
``listener demo``: the real pipeline against built-in simulators (CONTRACT §2); the
engine is :mod:`listener.dev.demo`. A live table on a terminal, one summary line
otherwise; exit 1 when anything was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live

from listener.cli.common import CONFIG_OPTION, load_or_exit
from listener.config import Config, mask_url
from listener.config_loader import config_path, load_config
from listener.dev.demo import Demo
from listener.dev.replicas import ReplicasDemo
from listener.exceptions import ConfigError
from listener.logs import configure_logging
from listener.loop import run_async

__all__ = ["command"]


@contextlib.contextmanager
def _display(console: Console, demo: Demo | ReplicasDemo) -> Iterator[Callable[[], None]]:
    """A live table on a terminal (logs printed above it); otherwise nothing until the end."""
    stderr = sys.stderr
    secrets_ = demo.redacted()
    if not console.is_terminal:
        configure_logging(level="warning", fmt="console", secrets=secrets_, stream=stderr)
        yield lambda: None
        return
    with Live(
        console=console, auto_refresh=False, redirect_stderr=stderr.isatty(), transient=False
    ) as live:
        # sys.stderr is rich's proxy now, so warnings appear above the table, not inside it.
        configure_logging(level="warning", fmt="console", secrets=secrets_, stream=sys.stderr)
        try:
            yield lambda: live.update(demo.table(), refresh=True)
        finally:
            configure_logging(level="warning", fmt="console", secrets=secrets_, stream=stderr)


def _base_config(config_file: Path | None) -> Config:
    """
    The configuration whose broker settings the demo uses. The demo replaces sources,
    keys and ports, so a configuration that cannot load (e.g. its secrets are not set)
    is not fatal here: the demo then uses the defaults ($RABBITMQ_URL or localhost).
    An explicit --config that is broken still exits 2.
    """
    if config_file is not None:
        return load_or_exit(config_file)
    try:
        return load_config(config_path(None))
    except ConfigError as exc:
        url = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@localhost:5672/"
        where = config_path(None)
        click.echo(
            f"listener demo: not using {where} ({exc.problems[0]}); broker {mask_url(url)}",
            err=True,
        )
        return Config.model_validate({"broker": {"url": url}, "sources": []})


@click.command("demo")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="How long the simulators produce.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=2, max=9),
    default=None,
    help="Run this many `listener run` replicas (cluster.enabled) instead, show which "
    "holds each stream unit, kill one and start it again.",
)
@CONFIG_OPTION
def command(seconds: float, replicas: int | None, config_file: Path | None) -> None:
    """Run the real pipeline against built-in simulators and show what flows."""
    base = _base_config(config_file)
    console = Console()

    async def main() -> tuple[str, int]:
        demo: Demo | ReplicasDemo
        if replicas is not None:
            demo = ReplicasDemo(base=base, replicas=replicas, seconds=seconds)
        else:
            demo = Demo(base=base, seconds=seconds)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, demo.interrupt)
        with _display(console, demo) as show:
            return await demo.run(show)

    try:
        summary, lost = run_async(main)
    except* OSError as group:
        click.echo(f"listener demo: cannot start: {group.exceptions[0]}", err=True)
        sys.exit(1)
    click.echo(summary)
    if lost:
        sys.exit(1)
