"""
Provider handlers: the pure edge of the listener.

A handler knows one provider's payloads and nothing about sockets. It turns bytes
(and, for streams, frames) into typed results:

* :class:`Event` - a validated event with its stable CloudEvent id and type;
* :class:`Quarantine` - a verdict for input that does not fit, with a short reason
  code (``invalid_json``, ``schema_violation``, ...) and a human-readable detail.

Adding a provider is one new module ``handlers/<name>.py`` exposing a module-level
``PROVIDER`` that satisfies :class:`WebhookProvider` or :class:`StreamProvider`;
:func:`load_provider` finds it by the ``provider:`` name in the configuration, so
there is no central list to edit.

No I/O, sleeping, logging setup or clocks here (``received_at`` is passed in).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    # The stream frame vocabulary lives with its first provider for now; only types
    # are needed here, so there is no import cycle at run time.
    from handlers.frames import ServerFrame

__all__ = [
    "Event",
    "Quarantine",
    "StreamProvider",
    "WebhookProvider",
    "load_provider",
]


@dataclass(frozen=True, slots=True)
class Event:
    """
    A validated provider event, ready to be wrapped in a CloudEvent.

    ``id`` is stable: the same provider event always yields the same id, so
    consumers can deduplicate on it. ``type`` is the CloudEvent type and the
    routing key, ``<provider>.<event type>``. ``time`` is when the provider says
    the event happened (``None`` when it does not say). ``data`` is the payload as
    the provider sent it (validated; extra fields kept; decimals stay strings).
    """

    id: str
    type: str
    time: datetime | None
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A verdict for input that does not fit: it is kept and published to quarantine."""

    reason: str
    detail: str


@runtime_checkable
class WebhookProvider(Protocol):
    """A provider that pushes signed HTTP webhooks."""

    name: str
    kind: Literal["webhook"]

    def parse(
        self,
        body: bytes,
        *,
        environment: str,
        unknown_types: Literal["publish", "quarantine"],
    ) -> Event | Quarantine:
        """Turn a verified webhook body into an event or a quarantine verdict."""
        ...


@runtime_checkable
class StreamProvider(Protocol):
    """
    A provider that streams frames over a WebSocket (see ``handlers/layerx402.py``).

    It builds the frames the listener sends and turns every frame it receives into
    one ``ServerFrame`` (auth ok, error, subscribed, unsubscribed, event, ping, or
    unparseable), so the runtime holds no provider knowledge. ``channels`` maps each
    channel to the params a subscription needs.
    """

    name: str
    kind: Literal["websocket"]
    channels: Mapping[str, tuple[str, ...]]

    def auth_frame(self, api_key: str) -> str:
        """The first frame on every connection."""
        ...

    def subscribe_frame(
        self,
        request_id: str,
        channel: str,
        params: Mapping[str, str],
        since_seq: int | None = None,
    ) -> str:
        """A subscribe request; ``since_seq`` asks for every held event after it."""
        ...

    def unsubscribe_frame(self, request_id: str, subscription: str) -> str:
        """An unsubscribe request for a server subscription id."""
        ...

    def pong_frame(self, ts: int) -> str:
        """The answer to an application-level ping."""
        ...

    def subscription_key(self, channel: str, params: Mapping[str, str]) -> str:
        """The stable name a ``seq`` cursor is kept under (channel + sorted params)."""
        ...

    def parse_frame(self, raw: str | bytes) -> ServerFrame:
        """Turn one received frame into a typed frame; never raises."""
        ...


_PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def load_provider(name: str) -> WebhookProvider | StreamProvider:
    """
    Return the ``PROVIDER`` of ``handlers/<name>.py``.

    Raises:
        LookupError: no such handler module, or it defines no ``PROVIDER``.
    """
    if not _PROVIDER_NAME.match(name):
        raise LookupError(f"unknown provider {name!r}: expected a handlers/<name>.py module")
    try:
        module = importlib.import_module(f"handlers.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"handlers.{name}":
            raise
        raise LookupError(f"unknown provider {name!r}: there is no handlers/{name}.py") from exc
    provider = getattr(module, "PROVIDER", None)
    if not isinstance(provider, WebhookProvider | StreamProvider):
        raise LookupError(f"handlers/{name}.py defines no PROVIDER")
    return provider
