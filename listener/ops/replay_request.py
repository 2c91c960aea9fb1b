"""
The arguments of a replay, validated the same for ``listener replay`` and
``POST /v1/replays`` (see :mod:`listener.ops.replay` for what a replay does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from listener.broker.topology import Topology
from listener.exceptions import ReplayArgumentError
from listener.selection import EventFilter, TopicPattern, parse_time

__all__ = ["MIN_RATE", "Origin", "ReplayRequest", "replay_request"]

# The slowest replay allowed, in events per second: a replay must end.
MIN_RATE = 1.0
# AMQP 0-9-1 §4.2.5.3: names are shortstrs, at most 255 bytes.
_NAME_MAX = 255

Origin = Literal["journal", "archive"]


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """A validated replay: what to select, from where, to where, how fast."""

    selection: EventFilter
    origin: Origin = "journal"
    to_queue: str | None = None
    to_exchange: str | None = None
    dry_run: bool = False
    rate: float | None = None

    @property
    def target(self) -> str:
        """The target in words, for summaries."""
        if self.to_queue is not None:
            return f"queue {self.to_queue!r}"
        if self.to_exchange is not None:
            return f"exchange {self.to_exchange!r}"
        return "nowhere (dry run)"


def _check_name(field_name: str, value: str, exchange: str, kind: str) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= _NAME_MAX or any(ord(c) < 32 for c in value):
        raise ReplayArgumentError(
            field_name, f"a {kind} name is 1 to {_NAME_MAX} bytes of printable text"
        )
    own = Topology(exchange)
    reserved = {own.quarantine_exchange} if kind == "exchange" else own.reserved_queues()
    if value.startswith(("amq.", f"{exchange}.lease.", f"{exchange}.cursor.")) or value in reserved:
        raise ReplayArgumentError(
            field_name, f"{value!r} is the broker's or the listener's own {kind}, not a target"
        )


def replay_request(
    *,
    since: str | None,
    until: str | None = None,
    source: str | None = None,
    type_: str | None = None,
    origin: str = "journal",
    to_queue: str | None = None,
    to_exchange: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    archive_enabled: bool = True,
    exchange: str = "events",
    now: float | None = None,
) -> ReplayRequest:
    """
    Validate replay arguments as the CLI and the API take them.

    Raises:
        ReplayArgumentError: naming the first wrong argument.
    """
    now = time.time() if now is None else now
    if not since:
        raise ReplayArgumentError("since", "is required (ISO-8601 or relative: 15m, 2h, 1d)")
    try:
        start = parse_time(since, now=now)
    except ValueError as exc:
        raise ReplayArgumentError("since", str(exc)) from None
    end: float | None = None
    if until:
        try:
            end = parse_time(until, now=now)
        except ValueError as exc:
            raise ReplayArgumentError("until", str(exc)) from None
        if end <= start:
            raise ReplayArgumentError("until", "must be after since")
    types: TopicPattern | None = None
    if type_ is not None:
        try:
            types = TopicPattern(type_)
        except ValueError as exc:
            raise ReplayArgumentError("type", str(exc)) from None
    if source is not None and not source:
        raise ReplayArgumentError("source", "must not be empty")
    if origin not in {"journal", "archive"}:
        raise ReplayArgumentError("from", f"{origin!r}: expected journal or archive")
    if origin == "archive" and not archive_enabled:
        raise ReplayArgumentError("from", "the archive stream is off (broker.archive.enabled)")
    if to_queue is not None and to_exchange is not None:
        raise ReplayArgumentError("to_queue", "give one target: a queue or an exchange")
    if to_queue is not None:
        _check_name("to_queue", to_queue, exchange, "queue")
    if to_exchange is not None:
        _check_name("to_exchange", to_exchange, exchange, "exchange")
    if to_queue is None and to_exchange is None and not dry_run:
        raise ReplayArgumentError("to_queue", "a target is required: a queue or an exchange")
    if rate is not None and not rate >= MIN_RATE:
        raise ReplayArgumentError("rate", f"must be at least {MIN_RATE:g} event per second")
    return ReplayRequest(
        selection=EventFilter(source=source, types=types, since=start, until=end),
        origin="archive" if origin == "archive" else "journal",
        to_queue=to_queue,
        to_exchange=to_exchange,
        dry_run=dry_run,
        rate=rate,
    )
