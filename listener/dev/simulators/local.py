"""
Serve, on this machine, every provider a configuration's sources point at locally
(``listener simulate config``, ``make simulate``): a source whose URL is on
127.0.0.1 or localhost gets its provider's simulator on that port, accepting the
source's API key, with the projects or ISINs the source polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from listener.config import Config, PollSourceConfig, StreamSourceConfig
from listener.dev.simulators.layerx402 import Layerx402Simulator
from listener.dev.simulators.terrapin import TerrapinSimulator
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator

__all__ = ["local_simulators", "serve_local"]

_LOCAL = frozenset({"127.0.0.1", "localhost", "::1"})


def _port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port if parts.hostname in _LOCAL and parts.port else None


def _layerx402(source: StreamSourceConfig, port: int) -> Any:
    return Layerx402Simulator(
        port=port, api_keys=[source.api_key.get_secret_value()], rate=20.0, record=False
    )


def _tokenterminal(source: PollSourceConfig, port: int) -> Any:
    projects = sorted({p for r in source.resources for p in getattr(r, "projects", ())})
    return TokenTerminalSimulator(
        port=port,
        api_keys=[source.api_key.get_secret_value()],
        projects=projects,
        rate_limit=(1000, 60.0),
    )


def _terrapin(source: PollSourceConfig, port: int) -> Any:
    isins = sorted({i for r in source.resources for i in getattr(r, "isins", ())})
    return TerrapinSimulator(port=port, api_keys=[source.api_key.get_secret_value()], isins=isins)


# provider → how its simulator is made for a source (dev tooling may name providers).
FACTORIES: dict[str, Callable[[Any, int], Any]] = {
    "layerx402": _layerx402,
    "tokenterminal": _tokenterminal,
    "terrapin": _terrapin,
}


def local_simulators(config: Config) -> list[tuple[str, Any]]:
    """(source name, simulator) for every source with a local URL and a simulator."""
    found = []
    for source in config.sources:
        url = getattr(source, "url", None)
        factory = FACTORIES.get(source.provider)
        port = _port(url) if isinstance(url, str) else None
        if factory is not None and port is not None:
            found.append((source.name, factory(source, port)))
    return found


@contextlib.asynccontextmanager
async def serve_local(config: Config) -> AsyncIterator[list[tuple[str, Any]]]:
    """Run every local simulator of ``config`` for the duration of the block."""
    simulators = local_simulators(config)
    async with contextlib.AsyncExitStack() as stack:
        for _, simulator in simulators:
            await stack.enter_async_context(simulator)
        yield simulators
        await asyncio.sleep(0)
