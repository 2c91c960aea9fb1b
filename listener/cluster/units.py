"""
Units (CONTRACT §10): every stream subscription and every poll source, run by one
replica at a time, and how ``/v1/sources`` shows them with their holders.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from listener.journal import Checkpoint
from listener.sources.supervisor import SourceRuntime

__all__ = ["Holder", "Unit", "source_views", "units_of"]

Holder = Literal["self", "other", "none"]


@dataclass(eq=False)
class Unit:
    """One unit: a runtime and what its checkpoint is (``key``: a stream cursor's key)."""

    name: str
    source: str
    key: str | None
    runtime: SourceRuntime
    task: asyncio.Task[None] | None = None
    held: bool = False
    acquired_at: float = 0.0
    other_until: float = 0.0
    not_before: float = 0.0
    written: tuple[Any, ...] | None = None
    candidate: tuple[tuple[Any, ...], Checkpoint] | None = None

    def holder(self) -> Holder:
        """``self``, ``other`` (a peer holds it, as last heard) or ``none``."""
        if self.held:
            return "self"
        return "other" if time.monotonic() < self.other_until else "none"


def units_of(runtimes: Sequence[SourceRuntime]) -> list[Unit]:
    """
    One unit per runtime: a runtime with a ``unit_key`` (a stream source holding one
    subscription) is ``<source>.<key>`` with that cursor; any other is ``<source>``,
    whose checkpoint is its poll state.
    """
    units = []
    for runtime in runtimes:
        key = getattr(runtime, "unit_key", None)
        name = runtime.name if key is None else f"{runtime.name}.{key}"
        units.append(Unit(name=name, source=runtime.name, key=key, runtime=runtime))
    return units


def source_views(units: Sequence[Unit]) -> dict[str, dict[str, Any]]:
    """
    Each unit source's state for ``/readyz`` and ``/v1/sources``, with each unit's
    holder; a source none of whose units is held here is ``standby`` (healthy).
    """
    by_source: dict[str, list[Unit]] = {}
    for unit in units:
        by_source.setdefault(unit.source, []).append(unit)
    views = {}
    for source, members in by_source.items():
        states = [dict(u.runtime.state()) for u in members]
        view = dict(states[0])
        if members[0].key is None:
            view.update(unit=members[0].name, holder=members[0].holder())
        else:
            view["subscriptions"] = [
                {**sub, "unit": unit.name, "holder": unit.holder()}
                for unit, state in zip(members, states, strict=True)
                for sub in state.get("subscriptions", ())
            ]
            view["events_received"] = sum(s.get("events_received", 0) for s in states)
            times = [s["last_event_at"] for s in states if s.get("last_event_at")]
            view["last_event_at"] = max(times, default=None)
        held = [s["status"] for u, s in zip(members, states, strict=True) if u.held]
        unhealthy = [h for h in held if h not in {"connected", "polling"}]
        view["status"] = unhealthy[0] if unhealthy else held[0] if held else "standby"
        views[source] = view
    return views
