"""
The vocabulary of stream frames a stream handler parses into (Sans-I/O).

A stream provider's ``parse_frame`` turns every server frame into exactly one of
these, so the runtime (``listener/sources/websocket.py``) needs no provider knowledge:
authentication accepted, an error (with the request it answers), a subscription
acknowledged or ended, an event (validated, or with its quarantine verdict), an
application-level ping, or input that fits no frame at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from handlers.base import Event, Quarantine

__all__ = [
    "AuthOk",
    "ErrorFrame",
    "ErrorKind",
    "EventFrame",
    "Ping",
    "ServerFrame",
    "Subscribed",
    "Unparseable",
    "Unsubscribed",
]


@dataclass(frozen=True, slots=True)
class AuthOk:
    """``{"type": "auth_ok"}``: the key was accepted; subscribe now."""


#: What an error frame means to the runtime; the provider's parser maps its codes.
ErrorKind = Literal["unauthorized", "forbidden", "invalid_params", "rate_limited", "other"]


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """
    ``{"type": "error", ...}``.

    ``id`` is the request id of the subscribe it answers (``None`` for connection
    errors such as an unauthorized key). ``code`` is the provider's own code, ``kind``
    what it means (the provider decides). ``retry_after`` (seconds) is set when the
    server gave one: after a rate-limited close, reconnect no sooner (CONTRACT §6).
    """

    id: str | None
    code: str
    message: str
    retry_after: float | None = None
    kind: ErrorKind = "other"


@dataclass(frozen=True, slots=True)
class Subscribed:
    """``{"type": "subscribed", ...}``: request ``id`` is now subscription ``subscription``."""

    id: str
    channel: str
    subscription: str


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """``{"type": "unsubscribed", ...}``: the server stopped sending ``subscription``."""

    id: str | None
    subscription: str


@dataclass(frozen=True, slots=True)
class EventFrame:
    """
    ``{"type": "event", ...}`` with a usable ``seq``.

    ``result`` is the validated event, or the verdict on its ``data``
    (``schema_violation``, ``unknown_channel``): either way ``seq`` may advance once
    the result is journaled (CONTRACT §8).
    """

    subscription: str
    channel: str
    seq: int
    result: Event | Quarantine


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping", "ts": <ms>}``: answer with :func:`pong_frame` (same ``ts``)."""

    ts: int


@dataclass(frozen=True, slots=True)
class Unparseable:
    """A frame that is not JSON or not a frame of CONTRACT §6: quarantine it raw."""

    verdict: Quarantine


ServerFrame = AuthOk | ErrorFrame | Subscribed | Unsubscribed | EventFrame | Ping | Unparseable
