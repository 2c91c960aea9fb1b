"""
The stream runtime's bookkeeping and close policy, pure (no sockets): what a
subscription holds, how a connection ended, and the wait before the next one
(CONTRACT §6). :mod:`listener.sources.websocket` drives them.

The provider says what its close codes and error codes mean
(``StreamProvider.close_kind``, ``ErrorFrame.kind``); the policy is the same for
every provider:

* unauthorized → ``unauthorized``, backoff growing to ``reconnect.max`` (never a hot loop);
* forbidden → ``forbidden``, the same;
* rate limited → wait the ``retry_after`` of the preceding error frame (capped at
  :data:`RETRY_AFTER_CAP`), when given;
* anything else → exponential backoff with jitter, reset after ``healthy_after``; the
  first retry after a connection that had been healthy comes within
  :data:`QUICK_RECONNECT` (jittered: a fleet does not return in lockstep), the usual
  backoff after that (a blip costs at most a fifth of a second, not ``reconnect.initial``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from handlers import CloseKind
from listener.config import SubscriptionConfig
from listener.envelope import rfc3339
from listener.retry import backoff

__all__ = [
    "QUICK_RECONNECT",
    "RETRY_AFTER_CAP",
    "Delays",
    "Outcome",
    "SourceStatus",
    "SubState",
    "Subscription",
    "close_policy",
    "iso",
]

# A server's retry_after is honoured up to this long (a hostile or broken value must
# not park the source for years).
RETRY_AFTER_CAP = 900.0
# The first reconnect after a healthy connection dropped comes within this long.
QUICK_RECONNECT = 0.2  # the attempt; its handshake and auth still fit in 250 ms

SourceStatus = Literal[
    "starting", "connected", "reconnecting", "unauthorized", "forbidden", "stopped"
]
SubState = Literal["pending", "active", "forbidden", "invalid_params"]


@dataclass(slots=True)
class Subscription:
    config: SubscriptionConfig
    key: str
    request_id: str
    state: SubState = "pending"
    server_id: str | None = None
    # The last seq handed to the journal on this connection (frames at or below it do
    # not move the cursor), and the last one known to be on disk (what a reconnect asks
    # after).
    last_seq: int | None = None
    durable_seq: int | None = None
    last_event_at: float | None = None
    # Monotonic clock of the last event (or of the subscribe ack), for staleness.
    last_heard: float = 0.0
    error: str | None = None
    refused_at: float = 0.0  # monotonic clock of the last FORBIDDEN
    # Pending: asked for again on a live connection at this monotonic time (after an
    # error or the server ending it), or to be answered by then; failures in a row.
    retry_due: float = math.inf
    failures: int = 0  # (reset by an event)
    asked: bool = False  # a subscribe sent and not answered yet (answered by retry_due)
    behind: bool = False  # frames at or below last_seq arrive (logged once)

    def view(self) -> dict[str, Any]:
        return {
            "channel": self.config.channel,
            "params": dict(self.config.params),
            "state": self.state,
            "last_seq": self.durable_seq,
            "last_event_at": iso(self.last_event_at),
            **({"error": self.error} if self.error else {}),
        }


@dataclass(slots=True)
class Outcome:
    """How a connection ended, for :func:`close_policy`."""

    code: int | None = None
    reason: str = ""
    retry_after: float | None = None
    unauthorized: bool = False
    lasted: float = 0.0
    stale: bool = False


@dataclass(slots=True)
class Delays:
    """The backoff generators, kept between connections and reset when healthy."""

    initial: float
    maximum: float
    general: Iterator[float] = field(init=False)
    auth: Iterator[float] = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.general = backoff(self.initial, self.maximum)
        self.auth = backoff(max(self.initial, 1.0), self.maximum)


def close_policy(
    outcome: Outcome, delays: Delays, *, healthy_after: float, kind: CloseKind | None = None
) -> tuple[SourceStatus, float]:
    """
    Decide the source's state and the wait before reconnecting (pure; CONTRACT §6).

    Returns:
        The status to show while waiting, and the delay in seconds.
    """
    if outcome.unauthorized or kind == "unauthorized":
        return "unauthorized", next(delays.auth)
    if kind == "forbidden":
        return "forbidden", next(delays.auth)
    delays.auth = backoff(max(delays.initial, 1.0), delays.maximum)
    healthy = outcome.lasted >= healthy_after
    if healthy:
        delays.general = backoff(delays.initial, delays.maximum)
    if kind == "rate_limited" and outcome.retry_after is not None:
        return "reconnecting", max(min(outcome.retry_after, RETRY_AFTER_CAP), next(delays.general))
    if healthy and kind != "rate_limited":
        # Not cryptographic: only spreads a fleet's reconnects apart.
        quick = min(QUICK_RECONNECT, delays.initial) * random.uniform(0.2, 1.0)  # noqa: S311
        return "reconnecting", quick
    return "reconnecting", next(delays.general)


def iso(moment: float | None) -> str | None:
    return rfc3339(datetime.fromtimestamp(moment, UTC)) if moment is not None else None
