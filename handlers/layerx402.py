"""
Layerx402 streams (CONTRACT §6): frame builders, payload models and the frame parser.

The listener speaks JSON text frames: it sends ``auth``, ``subscribe`` (with
``since_seq``), ``unsubscribe`` and ``pong`` frames (:func:`auth_frame` and the others),
and :func:`parse_frame` turns whatever the server sends into one :data:`ServerFrame`:
:class:`AuthOk`, :class:`ErrorFrame`, :class:`Subscribed`, :class:`Unsubscribed`,
:class:`EventFrame`, :class:`Ping`, or :class:`Unparseable` for a frame that is not
JSON or not a frame this contract knows. :func:`parse_frame` never raises.

An event frame with a usable ``seq`` always yields an :class:`EventFrame`, whose
``result`` is an :class:`~handlers.Event` or a :class:`~handlers.Quarantine`, so the
runtime can journal the verdict and still advance its ``seq`` cursor (CONTRACT §8).
Quarantine reasons: ``invalid_json`` (not JSON or UTF-8), ``too_deep``,
``schema_violation`` (not a known frame, or the channel's ``data`` does not fit; the
detail names fields, never values), ``unknown_channel``. Pure: no I/O, logging or clock.

:data:`DATA_MODELS` maps each CloudEvent type to the model of its ``data``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypeGuard
from urllib.parse import urlencode

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from handlers.base import (
    MAX_DEPTH,
    CloseKind,
    Event,
    NoSettings,
    Quarantine,
    describe_errors,
    exact_numbers,
    too_deep,
)
from handlers.frames import (
    AuthOk,
    ErrorFrame,
    ErrorKind,
    EventFrame,
    Ping,
    ServerFrame,
    Subscribed,
    Unparseable,
    Unsubscribed,
)

__all__ = [
    "CHANNELS",
    "DATA_MODELS",
    "EVENT_TYPES",
    "NAMESPACE",
    "PROVIDER",
    "AuthOk",
    "ErrorFrame",
    "EventFrame",
    "Layerx402",
    "Ping",
    "PortfolioData",
    "ServerFrame",
    "Subscribed",
    "TokenData",
    "TradeData",
    "Unparseable",
    "Unsubscribed",
    "auth_frame",
    "event_id",
    "parse_frame",
    "pong_frame",
    "subscribe_frame",
    "subscription_key",
    "unsubscribe_frame",
]

NAME: Final = "layerx402"

# Fixed forever: every event id is a UUIDv5 in this namespace (RFC 9562 §5.5), so the
# same provider event gets the same id across reconnects, restarts and replays
# (CONTRACT §4). Changing it changes every id; tests pin a known answer.
NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://api.layerx402.dev/ws#event-id")
_NAMESPACE_BYTES: Final = NAMESPACE.bytes

# CONTRACT §6 table: channel → the params a subscription needs.
CHANNELS: Final[Mapping[str, tuple[str, ...]]] = {
    "token": ("mint",),
    "trades": ("mint",),
    "portfolio": ("wallet",),
}
# CONTRACT §6 table: channel → CloudEvent type (also the routing key, CONTRACT §4).
EVENT_TYPES: Final[Mapping[str, str]] = {
    "token": "layerx402.token",
    "trades": "layerx402.trade",
    "portfolio": "layerx402.portfolio",
}

# A decimal string is a JSON number (RFC 8259 §6) spelled as a string: no leading
# "+", no leading zeros, no NaN/Infinity. It stays a string end to end, so no
# precision is lost; a JSON number where one is required is a schema_violation.
_DECIMAL: Final = r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$"
# Milliseconds since the epoch, up to 9999-12-31T23:59:59.999Z (the last instant a
# datetime can hold), so converting it to Event.time cannot overflow.
_MAX_MS: Final = 253_402_300_799_999
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# CONTRACT §6: what the error codes and close codes mean.
_ERROR_KINDS: Final[Mapping[str, ErrorKind]] = {
    "UNAUTHORIZED": "unauthorized",
    "FORBIDDEN": "forbidden",
    "INVALID_PARAMS": "invalid_params",
    "RATE_LIMITED": "rate_limited",
}
_CLOSE_KINDS: Final[Mapping[int, CloseKind]] = {
    4001: "unauthorized",
    4003: "forbidden",
    4029: "rate_limited",
}
# A seq is stored as a SQLite INTEGER (signed 64-bit); a larger one is no position.
_MAX_SEQ: Final = 2**63 - 1

DecimalStr = Annotated[StrictStr, Field(pattern=_DECIMAL)]
Millis = Annotated[StrictInt, Field(ge=0, le=_MAX_MS)]
Ident = Annotated[StrictStr, Field(min_length=1)]


class _Data(BaseModel):
    # Extra fields are allowed and kept (CONTRACT §6); strict, so "12" is not an int
    # and 12.5 is not a decimal string.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class TokenData(_Data):
    """``data`` of the ``token`` channel: a token's price at ``updated_at`` (ms)."""

    mint: Ident
    price_usd: DecimalStr
    updated_at: Millis


class TradeData(_Data):
    """``data`` of the ``trades`` channel: one swap of ``mint`` by ``wallet`` at ``ts`` (ms)."""

    signature: Ident
    mint: Ident
    side: Literal["buy", "sell"]
    amount: DecimalStr
    price_usd: DecimalStr
    wallet: Ident
    ts: Millis


class PortfolioData(_Data):
    """``data`` of the ``portfolio`` channel: ``wallet`` holds ``balance`` of ``mint`` at ``ts``."""

    wallet: Ident
    mint: Ident
    balance: DecimalStr
    ts: Millis


#: The CloudEvent type → the model of its ``data`` (the AsyncAPI document's schemas).
DATA_MODELS: Final[Mapping[str, type[BaseModel]]] = {
    "layerx402.token": TokenData,
    "layerx402.trade": TradeData,
    "layerx402.portfolio": PortfolioData,
}
# One adapter per channel, built once at import (pydantic builds its validator then).
_ADAPTERS: Final[Mapping[str, TypeAdapter[Any]]] = {
    channel: TypeAdapter(DATA_MODELS[type_]) for channel, type_ in EVENT_TYPES.items()
}


# --- frames the listener sends -------------------------------------------------------


def auth_frame(api_key: str) -> str:
    """``{"type": "auth", "api_key": ...}``, the first frame on every connection."""
    return orjson.dumps({"type": "auth", "api_key": api_key}).decode()


def subscribe_frame(
    request_id: str, channel: str, params: Mapping[str, str], since_seq: int | None = None
) -> str:
    """
    A subscribe request; ``since_seq`` asks for every held event after it (CONTRACT §6).

    ``since_seq`` is left out when ``None`` (a first subscription: live events only).
    """
    frame: dict[str, Any] = {
        "type": "subscribe",
        "id": request_id,
        "channel": channel,
        "params": dict(params),
    }
    if since_seq is not None:
        frame["since_seq"] = since_seq
    return orjson.dumps(frame).decode()


def unsubscribe_frame(request_id: str, subscription: str) -> str:
    """An unsubscribe request for the server's subscription id (used on shutdown, CONTRACT §8)."""
    return orjson.dumps(
        {"type": "unsubscribe", "id": request_id, "subscription": subscription}
    ).decode()


def pong_frame(ts: int) -> str:
    """The answer to a :class:`Ping`, echoing its ``ts`` (CONTRACT §6)."""
    return orjson.dumps({"type": "pong", "ts": ts}).decode()


def subscription_key(channel: str, params: Mapping[str, str]) -> str:
    """
    The stable name of a subscription: ``channel`` plus its params, sorted.

    ``seq`` rises per key (CONTRACT §6), so this is what a ``seq`` cursor is stored
    under, e.g. ``trades?mint=So11111111111111111111111111111111111111112``.
    """
    if not params:
        return channel
    return f"{channel}?{urlencode(sorted(params.items()))}"


# --- ids -----------------------------------------------------------------------------


def event_id(channel: str, *fields: str | int) -> str:
    """
    The stable id of a provider event: ``uuid5(NAMESPACE, '["<channel>", <fields>...]')``.

    The name is a JSON array, so no field value can make two events collide. The
    fields per channel are CONTRACT §6's "id from" column. Equal to
    ``str(uuid.uuid5(NAMESPACE, name))``, computed without building a UUID object.
    """
    name = orjson.dumps([channel, *fields])
    # RFC 9562 §5.5: SHA-1 over namespace + name, first 16 bytes, version 5, variant 10.
    raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _id_fields(channel: str, data: Mapping[str, Any]) -> tuple[str | int, ...]:
    # CONTRACT §6 "id from": token mint + updated_at; trades signature + mint;
    # portfolio wallet + mint + ts.
    if channel == "token":
        return (data["mint"], data["updated_at"])
    if channel == "trades":
        return (data["signature"], data["mint"])
    return (data["wallet"], data["mint"], data["ts"])


# --- parsing -------------------------------------------------------------------------


def _violation(detail: str) -> Quarantine:
    return Quarantine(reason="schema_violation", detail=detail)


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int in Python; true/false are not a seq or a timestamp.
    return isinstance(value, int) and not isinstance(value, bool)


def _event_result(channel: str, data: object) -> Event | Quarantine:
    adapter = _ADAPTERS.get(channel)
    if adapter is None:
        return Quarantine(reason="unknown_channel", detail=f"unknown channel {channel[:64]!r}")
    if not isinstance(data, dict):
        return _violation(f"{channel} event: data must be an object")
    try:
        adapter.validate_python(data)
    except ValidationError as exc:
        return _violation(f"{channel} data: {describe_errors(exc, whole='(data)')}")
    ms: int = data["updated_at"] if channel == "token" else data["ts"]
    return Event(
        id=event_id(channel, *_id_fields(channel, data)),
        type=EVENT_TYPES[channel],
        time=_EPOCH + timedelta(milliseconds=ms),
        data=data,
    )


def _parse_event(frame: dict[str, Any]) -> ServerFrame:
    subscription = frame.get("subscription")
    channel = frame.get("channel")
    seq = frame.get("seq")
    if not isinstance(subscription, str) or not isinstance(channel, str):
        return Unparseable(_violation("event frame: subscription and channel must be strings"))
    if not _is_int(seq) or not 0 <= seq <= _MAX_SEQ:
        return Unparseable(_violation(f"event frame: seq must be an integer from 0 to {_MAX_SEQ}"))
    return EventFrame(
        subscription=subscription,
        channel=channel,
        seq=seq,
        result=_event_result(channel, frame.get("data")),
    )


def _parse_error(frame: dict[str, Any]) -> ServerFrame:
    code = frame.get("code")
    if not isinstance(code, str):
        return Unparseable(_violation("error frame: code must be a string"))
    request_id = frame.get("id")
    message = frame.get("message")
    retry_after = frame.get("retry_after")
    # An error frame is control-plane: keep its code even when the optional fields
    # are off-spec, rather than lose a RATE_LIMITED or UNAUTHORIZED.
    return ErrorFrame(
        kind=_ERROR_KINDS.get(code, "other"),
        id=request_id if isinstance(request_id, str) else None,
        code=code,
        message=message if isinstance(message, str) else "",
        retry_after=(
            float(retry_after)
            if isinstance(retry_after, int | float)
            and not isinstance(retry_after, bool)
            and 0 <= retry_after < float("inf")
            else None
        ),
    )


def _parse_subscribed(frame: dict[str, Any]) -> ServerFrame:
    request_id = frame.get("id")
    channel = frame.get("channel")
    subscription = frame.get("subscription")
    if not (
        isinstance(request_id, str) and isinstance(channel, str) and isinstance(subscription, str)
    ):
        return Unparseable(
            _violation("subscribed frame: id, channel and subscription must be strings")
        )
    return Subscribed(id=request_id, channel=channel, subscription=subscription)


def _parse_unsubscribed(frame: dict[str, Any]) -> ServerFrame:
    request_id = frame.get("id")
    subscription = frame.get("subscription")
    if not isinstance(subscription, str):
        return Unparseable(_violation("unsubscribed frame: subscription must be a string"))
    return Unsubscribed(
        id=request_id if isinstance(request_id, str) else None, subscription=subscription
    )


def _parse_ping(frame: dict[str, Any]) -> ServerFrame:
    ts = frame.get("ts")
    if not _is_int(ts):
        return Unparseable(_violation("ping frame: ts must be an integer"))
    return Ping(ts=ts)


def _too_deep(frame: dict[str, Any]) -> ServerFrame:
    verdict = Quarantine(reason="too_deep", detail=f"nested deeper than {MAX_DEPTH} levels")
    parsed = _parse_event(frame) if frame.get("type") == "event" else None
    if isinstance(parsed, EventFrame):
        # Its seq is usable: quarantine the event and let the cursor move past it.
        return EventFrame(parsed.subscription, parsed.channel, parsed.seq, verdict)
    return Unparseable(verdict)


def parse_frame(raw: str | bytes) -> ServerFrame:
    """
    Turn one frame from the server into a :data:`ServerFrame`. Never raises.

    Args:
        raw: the frame as received (text frames as ``str``, binary ones as ``bytes``).

    Returns:
        The typed frame, or :class:`Unparseable` with an ``invalid_json`` or
        ``schema_violation`` verdict.
    """
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Unparseable(Quarantine(reason="invalid_json", detail=f"not JSON: {exc}"))
    if not isinstance(frame, dict):
        return Unparseable(_violation("a frame must be a JSON object"))
    if too_deep(frame, raw=raw):
        return _too_deep(frame)
    frame = exact_numbers(frame, raw=raw)  # (data is published as sent)
    kind = frame.get("type")
    # Ordered by frequency: events dominate a busy stream.
    if kind == "event":
        return _parse_event(frame)
    if kind == "ping":
        return _parse_ping(frame)
    if kind == "subscribed":
        return _parse_subscribed(frame)
    if kind == "error":
        return _parse_error(frame)
    if kind == "auth_ok":
        return AuthOk()
    if kind == "unsubscribed":
        return _parse_unsubscribed(frame)
    if isinstance(kind, str):
        return Unparseable(_violation(f"unknown frame type {kind[:64]!r}"))
    return Unparseable(_violation("a frame needs a string type"))


class Layerx402:
    """
    The Layerx402 stream provider: what the runtime needs to speak CONTRACT §6.

    Stateless; the module-level :data:`PROVIDER` is the one instance, found by
    :func:`handlers.load_provider` for ``provider: layerx402``.
    """

    name: str = NAME
    kind: Literal["websocket"] = "websocket"
    default_url: str = "wss://api.layerx402.dev/ws"  # (a source's url when it gives none)
    channels: Mapping[str, tuple[str, ...]] = CHANNELS
    data_models: Mapping[str, type[BaseModel]] = DATA_MODELS
    settings_model: type[NoSettings] = NoSettings

    def close_kind(self, code: int | None) -> CloseKind | None:
        """4001 unauthorized, 4003 forbidden, 4029 rate limited (CONTRACT §6)."""
        return _CLOSE_KINDS.get(code) if code is not None else None

    # The module's pure functions, as the StreamProvider protocol's methods.
    auth_frame = staticmethod(auth_frame)
    subscribe_frame = staticmethod(subscribe_frame)
    unsubscribe_frame = staticmethod(unsubscribe_frame)
    pong_frame = staticmethod(pong_frame)
    subscription_key = staticmethod(subscription_key)
    parse_frame = staticmethod(parse_frame)


PROVIDER: Final = Layerx402()
