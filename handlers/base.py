"""
What every provider handler returns and satisfies (Sans-I/O).

A handler knows one provider's payloads and nothing about sockets. It turns bytes
(and, for streams, frames) into typed results:

* :class:`Event` - a validated event with its stable CloudEvent id and type;
* :class:`Quarantine` - a verdict for input that does not fit, with a short reason
  code (``invalid_json``, ``schema_violation``, ``too_deep``, ...) and a
  human-readable detail that never echoes the input.

Each provider module ``handlers/<name>.py`` exposes a module-level ``PROVIDER`` that
satisfies the protocol of its transport: :class:`WebhookProvider`,
:class:`StreamProvider` or :class:`handlers.polling.PollProvider`. It carries its own
``settings_model`` (the source keys only it understands, validated with the config)
and its session policy (what its close and error codes mean), so the runtime of a
transport never names a provider. :func:`load_provider` finds it by the ``provider:``
name in the configuration: there is no central list to edit.

No I/O, sleeping, logging setup or clocks here (``received_at`` is passed in).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from handlers.frames import ServerFrame

__all__ = [
    "MAX_DEPTH",
    "CloseKind",
    "Event",
    "NoSettings",
    "Provider",
    "Quarantine",
    "StreamProvider",
    "WebhookProvider",
    "describe_errors",
    "exact_numbers",
    "load_provider",
    "name_problems",
    "published_models",
    "too_deep",
]

# Nesting deeper than this is quarantined at parse time (``too_deep``): real payloads
# nest a few levels, and a serialiser has a limit of its own (orjson: 254) that a
# provider must not be able to reach through us.
MAX_DEPTH = 64

# At most this many problems are named in a quarantine detail ("and N more" after).
MAX_PROBLEMS = 5

#: What a stream close code means to the runtime (``None``: an ordinary drop).
CloseKind = Literal["unauthorized", "forbidden", "rate_limited"]


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


class NoSettings(BaseModel):
    """The settings model of a provider that takes no source keys of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def too_deep(value: Any, *, raw: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """
    Whether parsed JSON ``value`` (parsed from ``raw``) nests deeper than ``limit``
    containers.

    Each container opens with a ``{`` or ``[`` in the text, so text with no more than
    ``limit`` of them (counted in C, strings included) cannot be too deep and is not
    walked: the hot path.
    """
    if isinstance(raw, str):
        opens = raw.count("{") + raw.count("[")
    else:
        opens = raw.count(b"{") + raw.count(b"[")
    if opens <= limit:
        return False
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        children: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                children.extend(v for v in item if isinstance(v, dict | list))
        level = children
    return False


# A number that a double or a 64-bit integer may not hold exactly has 16 significant
# digits or more (a point may sit among them), or a negative exponent of 3 digits (it
# may underflow). No part overlaps its neighbour: each start is tried in a few steps.
_LONG_NUMBER = re.compile(r"\d(?:\.?\d){15}|\d[eE]-\d{3}")
_LONG_NUMBER_BYTES = re.compile(rb"\d(?:\.?\d){15}|\d[eE]-\d{3}")
_INT_DIGITS = 19  # more digits than this may be past 64 bits


def exact_numbers(value: Any, *, raw: bytes | str) -> Any:
    """
    ``value``, parsed by orjson from ``raw``, with every number orjson did not hold
    exactly put back as ``raw`` writes it (an ``orjson.Fragment``, which orjson writes
    out as it is). orjson reads an integer past 64 bits, or a decimal with more digits
    than a double keeps, as the nearest double: 123456789012345678901234567890 went out
    as 1.2345678901234568e+29.

    Such a number is a float in ``value``: without any (the providers' decimals are
    strings), ``value`` is returned as it is after a walk of ~1.5 µs; with one, a scan
    of ``raw`` for a long number (~7 µs a KiB), and only then a parse of ``raw`` again,
    number by number.

    ``raw`` must be JSON that orjson parsed (UTF-8, no NaN, no lone surrogate).
    """
    if not _has_float(value):
        return value
    if isinstance(raw, str):
        if _LONG_NUMBER.search(raw) is None:
            return value
    elif _LONG_NUMBER_BYTES.search(raw) is None:
        return value
    return json.loads(raw, parse_int=_exact_int, parse_float=_exact_float)


def _has_float(value: Any) -> bool:
    # orjson makes plain dicts, lists and floats: type() is enough, and quicker.
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float:
            return True
    return False


def _exact_int(text: str) -> int | orjson.Fragment:
    # (no int() of thousands of digits: Python refuses over 4,300, and is slow before)
    if len(text.lstrip("-")) <= _INT_DIGITS:
        number = int(text)
        if -(2**63) <= number < 2**64:  # orjson's range
            return number
    return orjson.Fragment(text)


def _exact_float(text: str) -> float | orjson.Fragment:
    number = float(text)
    if math.isfinite(number) and Decimal(repr(number)) == Decimal(text):
        return number  # the same value (orjson may write it shorter: 1.10 as 1.1)
    return orjson.Fragment(text)


def name_problems(problems: Sequence[str], total: int | None = None) -> str:
    """The first :data:`MAX_PROBLEMS` problems, ``; ``-joined, and how many more there are."""
    total = len(problems) if total is None else total
    named = list(problems[:MAX_PROBLEMS])
    if total > MAX_PROBLEMS:
        named.append(f"and {total - MAX_PROBLEMS} more")
    return "; ".join(named)


def describe_errors(exc: ValidationError, *, prefix: str = "", whole: str = "(payload)") -> str:
    """
    A quarantine detail for a pydantic error: the failing fields (``prefix.loc``, or
    ``whole`` for the value itself) and why, never their values (large or private).
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    named = [
        f"{'.'.join(str(p) for p in ((prefix, *e['loc']) if prefix else e['loc'])) or whole}: "
        f"{e['msg']}"
        for e in errors[:MAX_PROBLEMS]
    ]
    return name_problems(named, len(errors))


@runtime_checkable
class Provider(Protocol):
    """What every provider has, whatever its transport."""

    name: str
    kind: str
    #: The source keys only this provider understands (``environment: sandbox``).
    settings_model: type[BaseModel]
    #: The CloudEvent types (routing keys) it knows, each → the model its ``data``
    #: validates against (the AsyncAPI document is generated from these; see
    #: :func:`published_models`). Other types count as ``other`` in metrics.
    data_models: Mapping[str, type[BaseModel]]


@runtime_checkable
class WebhookProvider(Protocol):
    """A provider that pushes signed HTTP webhooks."""

    name: str
    kind: Literal["webhook"]
    settings_model: type[BaseModel]
    data_models: Mapping[str, type[BaseModel]]

    def parse(self, body: bytes, settings: Any, headers: Mapping[str, str]) -> Event | Quarantine:
        """
        Turn a verified webhook (its raw body and headers) into an event or a quarantine
        verdict; never raises. ``headers`` may be empty (a redriven payload).
        """
        ...


@runtime_checkable
class StreamProvider(Protocol):
    """
    A provider that streams frames over a WebSocket (see ``handlers/layerx402.py``).

    It builds the frames the listener sends and turns every frame it receives into
    one ``ServerFrame`` (auth ok, error, subscribed, unsubscribed, event, ping, or
    unparseable), and says what its close codes mean (:meth:`close_kind`), so the
    runtime holds no provider knowledge. ``channels`` maps each channel to the params
    a subscription needs.
    """

    name: str
    kind: Literal["websocket"]
    default_url: str  # the production endpoint: a source's url when it gives none
    settings_model: type[BaseModel]
    data_models: Mapping[str, type[BaseModel]]
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

    def close_kind(self, code: int | None) -> CloseKind | None:
        """What a WebSocket close code means (``None``: reconnect with backoff)."""
        ...


_PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KINDS = frozenset({"webhook", "websocket", "poll"})


def load_provider(name: str) -> Any:
    """
    Return the ``PROVIDER`` of ``handlers/<name>.py``.

    Raises:
        LookupError: no such handler module, or it defines no usable ``PROVIDER``.
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
    if not isinstance(provider, Provider) or provider.kind not in _KINDS:
        raise LookupError(f"handlers/{name}.py defines no PROVIDER")
    return provider


def published_models(provider: Provider, settings: BaseModel) -> dict[str, type[BaseModel]]:
    """
    What a source of ``provider`` with ``settings`` publishes: routing key → data model.

    The provider's :attr:`~Provider.data_models`, plus, when it defines
    ``other_data_models(settings)``, the types it publishes beyond its table (a key
    there may name a ``{placeholder}``, as ``getstoken.{type}`` does).
    """
    models = dict(provider.data_models)
    others = getattr(provider, "other_data_models", None)
    if callable(others):
        models.update(others(settings))
    return models
