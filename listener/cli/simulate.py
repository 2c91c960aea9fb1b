"""
``listener simulate``: run a provider simulator on its own, against a listener you run.

* ``listener simulate layerx402`` serves the Layerx402 WebSocket API (CONTRACT §6) until
  Ctrl-C; point a ``websocket`` source's ``url`` at it and use one of its API keys.
* ``listener simulate tokenterminal`` / ``terrapin`` serve those REST APIs (CONTRACT §9);
* ``listener simulate config`` serves every provider the configuration's sources point
  at on this machine (``make simulate``);
* ``listener simulate getstoken`` posts signed Get Smart Token webhooks (CONTRACT §5)
  to a listener's webhook path, until Ctrl-C or ``--seconds``, then prints what the
  listener answered. It exits 1 when a signature was refused (wrong secret or scheme)
  or when nothing answered at all.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from listener.cli.common import CONFIG_OPTION, load_or_exit
from listener.dev.simulators.getstoken import GetSmartTokenSimulator
from listener.dev.simulators.layerx402 import Layerx402Simulator, run_standalone
from listener.dev.simulators.local import serve_local
from listener.dev.simulators.terrapin import run_standalone as terrapin_standalone
from listener.dev.simulators.tokenterminal import run_standalone as tokenterminal_standalone
from listener.loop import run_async
from listener.sources.signatures import Scheme

__all__ = ["command"]

command = click.Group("simulate", help="Run a provider simulator standalone (for local testing).")


@command.command("layerx402")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=float,
    help="Events per second per subscription (0: as fast as clients read).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="LAYERX402_API_KEY",
    help="An API key that authenticates (repeatable; default: $LAYERX402_API_KEY).",
)
def layerx402(host: str, port: int, rate: float, api_keys: tuple[str, ...]) -> None:
    """Serve a Layerx402 WebSocket API until Ctrl-C."""
    if not api_keys:
        raise click.UsageError("give --api-key or set LAYERX402_API_KEY")

    def ready(simulator: Layerx402Simulator) -> None:
        click.echo(
            f"layerx402 simulator listening on {simulator.url} "
            f"({rate:g} events/s per subscription, {len(api_keys)} API key(s)); Ctrl-C to stop"
        )

    try:
        run_standalone(host, port, rate, api_keys, on_ready=ready)
    except OSError as exc:
        click.echo(f"listener simulate: cannot listen on {host}:{port}: {exc}", err=True)
        sys.exit(1)


@command.command("getstoken")
@click.option(
    "--url",
    default="http://127.0.0.1:8080/webhooks/gst",
    show_default=True,
    help="The listener's webhook endpoint.",
)
@click.option(
    "--secret",
    envvar="GST_WEBHOOK_SECRET",
    help="Signing secret (whsec_... for standard-webhooks; default: $GST_WEBHOOK_SECRET).",
)
@click.option(
    "--scheme",
    type=click.Choice(get_args(Scheme)),
    default="standard-webhooks",
    show_default=True,
)
@click.option("--header", default=None, help="Signature header (stripe, hmac-sha256-hex).")
@click.option("--rate", default=10.0, show_default=True, type=float, help="Deliveries per second.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--seconds", type=click.FloatRange(min=0), default=None, help="Stop after this long.")
@click.option(
    "--bad-share",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of events sent as invalid JSON or schema violations.",
)
@click.option(
    "--duplicate-share",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of deliveries that resend an accepted event (same id).",
)
@click.option("--environment", type=click.Choice(["production", "sandbox"]), default="production")
@click.option("--id-prefix", default="evt_", show_default=True, help="Event ids: <prefix><n>.")
@click.option("--start", default=1, show_default=True, type=click.IntRange(0), help="First n.")
def getstoken(  # noqa: PLR0917 - click passes each option as an argument
    url: str,
    secret: str | None,
    scheme: Scheme,
    header: str | None,
    rate: float,
    concurrency: int,
    seconds: float | None,
    bad_share: float,
    duplicate_share: float,
    environment: str,
    id_prefix: str,
    start: int,
) -> None:
    """Post signed Get Smart Token webhooks until Ctrl-C (or --seconds)."""
    if not secret:
        raise click.UsageError("give --secret or set GST_WEBHOOK_SECRET")
    try:
        simulator = GetSmartTokenSimulator(
            url=url,
            secret=secret,
            scheme=scheme,
            header=header,
            rate=rate,
            concurrency=concurrency,
            bad_share=bad_share,
            duplicate_share=duplicate_share,
            environment=environment,
            id_prefix=id_prefix,
            start=start,
            record=False,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret") from None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, simulator.stop)
        click.echo(
            f"sending signed Get Smart Token webhooks to {url} "
            f"({scheme}, {rate:g}/s, {concurrency} at once); "
            + (f"for {seconds:g}s" if seconds is not None else "Ctrl-C to stop")
        )
        await simulator.run(seconds=seconds)

    run_async(main)
    click.echo(f"getstoken simulator: {simulator.summary()}")
    if simulator.rejected.get(401):
        click.echo(
            "listener simulate: the listener refused signatures (401): "
            "check --secret and --scheme against the source's signature settings",
            err=True,
        )
        sys.exit(1)
    if simulator.sent and simulator.errors == simulator.sent:
        click.echo(f"listener simulate: no answer from {url}; is the listener running?", err=True)
        sys.exit(1)


@command.command("tokenterminal")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8766, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="TOKENTERMINAL_API_KEY",
    help="An API key that authenticates (repeatable; default: $TOKENTERMINAL_API_KEY).",
)
def tokenterminal(host: str, port: int, api_keys: tuple[str, ...]) -> None:
    """Serve a Token Terminal REST API (project metrics) until Ctrl-C."""
    _serve_rest(tokenterminal_standalone, "tokenterminal", host, port, api_keys)


@command.command("terrapin")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8767, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="TERRAPIN_API_KEY",
    help="An API key that authenticates (repeatable; default: $TERRAPIN_API_KEY).",
)
def terrapin(host: str, port: int, api_keys: tuple[str, ...]) -> None:
    """Serve a Terrapin REST API (bond reference data) until Ctrl-C."""
    _serve_rest(terrapin_standalone, "terrapin", host, port, api_keys)


def _serve_rest(
    standalone: Callable[..., None], name: str, host: str, port: int, api_keys: tuple[str, ...]
) -> None:
    if not api_keys:
        raise click.UsageError(f"give --api-key or set {name.upper()}_API_KEY")

    def ready(simulator: Any) -> None:
        click.echo(f"{name} simulator listening on {simulator.url}; Ctrl-C to stop")

    try:
        standalone(host, port, api_keys, on_ready=ready)
    except OSError as exc:
        click.echo(f"listener simulate: cannot listen on {host}:{port}: {exc}", err=True)
        sys.exit(1)


@command.command("config")
@CONFIG_OPTION
def from_config(config_file: Path | None) -> None:
    """Serve every provider the configuration's sources point at on this machine."""
    config = load_or_exit(config_file)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve_local(config) as simulators:
            if not simulators:
                click.echo("no source of this configuration points at a local simulator")
                return
            for name, simulator in simulators:
                click.echo(f"source {name}: {type(simulator).__name__} on {simulator.url}")
            click.echo("Ctrl-C to stop")
            await stop.wait()

    try:
        run_async(main)
    except OSError as exc:
        click.echo(f"listener simulate: cannot start: {exc}", err=True)
        sys.exit(1)
