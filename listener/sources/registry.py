"""
The registry: binds each configured source to its transport's runtime by ``kind``
and to its handler by ``provider`` (:func:`handlers.load_provider`, by name).

A transport is a module under ``listener/sources/`` with a class built from its
sources; the service sees only the :class:`Transport` protocol, so it has no
``if webhook ... elif websocket`` of its own. Adding a provider to an existing
transport touches nothing here (its handler file, its tests and a config entry);
adding a transport is one line in :data:`TRANSPORTS`. A transport's module is
imported only when a source of its kind is configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from handlers import load_provider
from listener.config import Config, HttpConfig
from listener.journal import Journal
from listener.metrics import Metrics
from listener.sources.supervisor import SourceRuntime
from listener.web import PublicRoutes

__all__ = ["TRANSPORTS", "RuntimeTransport", "Transport", "TransportContext", "build_transports"]

#: kind → "module:class" of its transport.
TRANSPORTS: Mapping[str, str] = {
    "webhook": "listener.sources.webhook:WebhookTransport",
    "websocket": "listener.sources.websocket:StreamTransport",
    "poll": "listener.sources.poll:PollTransport",
}


@dataclass(frozen=True, slots=True)
class TransportContext:
    """What every transport may use."""

    http: HttpConfig
    journal: Journal
    metrics: Metrics
    #: cluster.enabled: one runtime per unit (each stream subscription on its own).
    units: bool = False


class Transport(Protocol):
    """The sources of one kind, as the service runs them."""

    kind: str
    #: Long-running parts, each supervised (a stream connection, a poll loop).
    runtimes: Sequence[SourceRuntime]

    def mount(self, routes: PublicRoutes) -> None:
        """Add routes to the public HTTP port (webhooks), if any."""
        ...

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """Each source's state, by name, for ``/readyz`` and ``/v1/sources``."""
        ...

    def stop_intake(self) -> None:
        """Shutdown step 1: take nothing more in."""
        ...

    def use_secrets(self, sources: Mapping[str, Any]) -> None:
        """
        SIGHUP: run with these source configurations (by name), equal to the running
        ones but for their secrets; nothing is reconnected or refused for it.
        """
        ...


class RuntimeTransport:
    """
    A transport whose sources are each one supervised runtime (streams, polls): no HTTP
    routes, nothing to stop but the runtimes (the service cancels them), and a SIGHUP's
    source configuration handed to each runtime's ``use_config``.
    """

    kind: str
    runtimes: Sequence[Any]

    def mount(self, routes: PublicRoutes) -> None:
        """No HTTP routes."""

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """Each source's state, by name."""
        return {r.name: r.state() for r in self.runtimes}

    def stop_intake(self) -> None:
        """Nothing to do: the service cancels the runtimes."""

    def use_secrets(self, sources: Mapping[str, Any]) -> None:
        """Each runtime takes its source's new configuration (equal but for secrets)."""
        for runtime in self.runtimes:
            if (source := sources.get(runtime.name)) is not None:
                runtime.use_config(source)


def build_transports(config: Config, context: TransportContext) -> list[Transport]:
    """One transport per configured kind, in the order kinds first appear."""
    grouped: dict[str, list[tuple[Any, Any]]] = {}
    for source in config.sources:
        grouped.setdefault(source.kind, []).append((source, load_provider(source.provider)))
    transports: list[Transport] = []
    for kind, pairs in grouped.items():
        module_name, _, class_name = TRANSPORTS[kind].partition(":")
        factory = getattr(importlib.import_module(module_name), class_name)
        transports.append(factory(pairs, context=context))
    return transports
