"""
One publish's AMQP 0-9-1 frames as bytes, built with ``struct`` in one pass: the
Basic.Publish method frame (``mandatory`` set), the content header, the body frames.

pamqp's generic marshalling (an object per frame, a property table walked per message)
was a tenth of the publisher's time (NOTES: "where the time goes"). The fast path takes
the properties the journal's events carry (short strings, ``delivery_mode``,
``timestamp``, no ``headers``); anything else (headers: quarantined input, replays) is
marshalled by pamqp, so both give the same bytes (``tests/test_confirms.py`` compares
them).
"""

from __future__ import annotations

import calendar
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

__all__ = ["Prebuilt", "prebuilt", "publish_frames"]

_END = b"\xce"
_METHOD_HEAD = struct.Struct(">BHIHHH")  # type 1, channel, size; class 60, method 40, ticket
_HEADER_HEAD = struct.Struct(">BHIHHQH")  # type 2, channel, size; class, weight, body size, flags
_BODY_HEAD = struct.Struct(">BHI")  # type 3, channel, size
_U64 = struct.Struct(">Q")

# Property flags (AMQP 0-9-1 Basic class), in the order their values follow.
_CONTENT_TYPE = 1 << 15
_DELIVERY_MODE = 1 << 12
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3
# The properties the fast path does not write: any of them set → pamqp.
_OTHERS = (
    "content_encoding",
    "headers",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "user_id",
    "cluster_id",
)


def _short(value: str) -> bytes | None:
    raw = value.encode()
    return bytes((len(raw),)) + raw if len(raw) <= 255 else None


@dataclass(frozen=True, slots=True)
class Prebuilt:
    """
    Properties already in wire form (:func:`prebuilt`): building and reading back a
    ``Basic.Properties`` per event took 7.5 µs, this 1. For the uncommon path (pamqp's),
    :meth:`properties` reads pamqp's object back from the same bytes. It holds no
    closure to build one: a function with its cell was about 200 bytes of Python's
    small-object heap per message, thousands at once while a backlog drains.
    """

    flags: int
    values: bytes
    message_id: str

    def properties(self) -> Basic.Properties:
        """pamqp's ``Basic.Properties`` of the same bytes."""
        props = Basic.Properties()
        props.unmarshal(self.flags, self.values)
        return props


def prebuilt(
    *, content_type: str, message_id: str, message_type: str, timestamp: int, app_id: str
) -> Prebuilt | None:
    """
    The wire form of these properties (persistent, no headers, nothing else set), or
    ``None`` when pamqp must do it (a value over 255 bytes).
    """
    encoded = _encode(content_type, 2, message_id, timestamp, message_type, app_id)
    return None if encoded is None else Prebuilt(*encoded, message_id)


def _properties(props: Basic.Properties) -> tuple[int, bytes] | None:
    """(flags, encoded values), or ``None`` when pamqp must do it."""
    for name in _OTHERS:
        if (value := getattr(props, name)) is not None and value != "":  # (pamqp: "" is unset)
            return None
    moment = props.timestamp
    return _encode(
        props.content_type,
        props.delivery_mode,
        props.message_id,
        None if moment is None else calendar.timegm(moment.utctimetuple()),
        props.message_type,
        props.app_id,
    )


def _encode(  # noqa: PLR0917 - the properties in their wire order
    content_type: str | None,
    delivery_mode: int | None,
    message_id: str | None,
    timestamp: int | None,
    message_type: str | None,
    app_id: str | None,
) -> tuple[int, bytes] | None:
    flags = 0
    parts: list[bytes] = []
    if content_type:
        if (short := _short(content_type)) is None:
            return None
        flags |= _CONTENT_TYPE
        parts.append(short)
    if delivery_mode is not None:
        flags |= _DELIVERY_MODE
        parts.append(bytes((delivery_mode,)))
    if message_id:
        if (short := _short(message_id)) is None:
            return None
        flags |= _MESSAGE_ID
        parts.append(short)
    if timestamp is not None:
        flags |= _TIMESTAMP
        parts.append(_U64.pack(timestamp))
    for flag, text in ((_TYPE, message_type), (_APP_ID, app_id)):
        if text:
            if (short := _short(text)) is None:
                return None
            flags |= flag
            parts.append(short)
    return flags, b"".join(parts)


def publish_frames(
    channel: int,
    max_content: int,
    *,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties | Prebuilt,
    body: bytes,
) -> bytes:
    """
    The frames of one mandatory Basic.Publish on ``channel``, body split into frames of
    at most ``max_content`` bytes (the channel's ``frame_max - 8``).
    """
    ex, rk = _short(exchange), _short(routing_key)
    if isinstance(properties, Prebuilt):
        props: tuple[int, bytes] | None = (properties.flags, properties.values)
    else:
        props = _properties(properties)
    if ex is None or rk is None or props is None or exchange not in _CHECKED:
        if isinstance(properties, Prebuilt):
            properties = properties.properties()
        return _pamqp_frames(channel, max_content, exchange, routing_key, properties, body)
    flags, values = props
    method = ex + rk + b"\x01"  # bits: mandatory
    parts = [
        _METHOD_HEAD.pack(1, channel, 6 + len(method), 60, 40, 0),
        method,
        _END,
        _HEADER_HEAD.pack(2, channel, 14 + len(values), 60, 0, len(body), flags),
        values,
        _END,
    ]
    for chunk in _chunks(body, max_content):
        parts += (_BODY_HEAD.pack(3, channel, len(chunk)), chunk, _END)
    return b"".join(parts)


def _chunks(body: bytes, max_content: int) -> Sequence[bytes]:
    """The body frames' payloads, as aiormq splits them (one, empty or not, when it fits)."""
    if len(body) < max_content:
        return (body,)
    return [body[start : start + max_content] for start in range(0, len(body), max_content)]


# Exchange names pamqp has accepted (it checks their characters and length; so do we).
_CHECKED: set[str] = set()


def _pamqp_frames(  # noqa: PLR0917 - publish_frames' arguments, passed on
    channel: int,
    max_content: int,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties,
    body: bytes,
) -> bytes:
    from pamqp.body import ContentBody  # noqa: PLC0415 - the uncommon path only

    method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    if len(_CHECKED) < 1000:  # (a handful in practice: the exchange and its quarantine)
        _CHECKED.add(exchange)
    frames: list[bytes] = [
        pamqp_frame.marshal(method, channel),
        pamqp_frame.marshal(ContentHeader(properties=properties, body_size=len(body)), channel),
    ]
    frames += (pamqp_frame.marshal(ContentBody(c), channel) for c in _chunks(body, max_content))
    return b"".join(frames)
