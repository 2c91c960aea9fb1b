"""
The docs cannot drift from the wire: every message a test reads back is checked against
the AsyncAPI document of the configuration that published it (CONTRACT §11).

:func:`tests.conftest.running` registers the document of every service it starts, by
exchange; the :class:`tests.conftest.Tap` checks each message it receives with
:func:`check`, and a tap that saw a message the document does not describe fails its
test. A message is checked for: a channel of the document for its exchange and routing
key; content type, delivery mode, AMQP ``type`` and ``message_id``; headers against the
message's header schema; for events, the body against the payload schema (the CloudEvent
envelope with that type's ``data`` schema) and a parse by the official CloudEvents SDK
(structured mode) whose ``id`` is the ``message_id``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import aio_pika
import jsonschema
import orjson
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_structured_event
from cloudevents.core.exceptions import CloudEventValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from listener.broker.asyncapi import build_document, channel_for
from listener.config import Config

__all__ = ["STATS", "check", "check_body", "register"]

_DOCUMENTS: dict[str, dict[str, Any]] = {}
_URI = "urn:listener:asyncapi:"
#: How many messages were checked, and how many of them had a CloudEvent body.
STATS = {"checked": 0, "events": 0}


def register(config: Config) -> dict[str, Any]:
    """Build the document of ``config`` and check what reaches its exchanges against it."""
    document = build_document(config)
    exchange = config.broker.exchange
    _DOCUMENTS[exchange] = document
    _DOCUMENTS[f"{exchange}.quarantine"] = document
    _validator.cache_clear()
    return document


@functools.lru_cache(maxsize=256)
def _validator(exchange: str, pointer: str) -> jsonschema.protocols.Validator:
    document = _DOCUMENTS[exchange]
    uri = f"{_URI}{exchange}"
    registry: Registry[Any] = Registry().with_resource(
        uri, Resource(contents=document, specification=DRAFT7)
    )
    return jsonschema.Draft7Validator({"$ref": f"{uri}#{pointer}"}, registry=registry)


def _errors(exchange: str, pointer: str, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message[:200]}"
        for e in _validator(exchange, pointer).iter_errors(instance)
    ]


def _message_spec(document: Mapping[str, Any], channel_id: str) -> tuple[dict[str, Any], str]:
    """The channel's one message (resolved) and its JSON pointer in the document."""
    ((name, message),) = document["channels"][channel_id]["messages"].items()
    if "$ref" in message:
        pointer = message["$ref"].removeprefix("#")
        key = pointer.rsplit("/", 1)[1]
        return document["components"]["messages"][key], pointer
    return message, f"/channels/{channel_id.replace('~', '~0').replace('/', '~1')}/messages/{name}"


def check_body(
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    content_type: str | None,
    delivery_mode: int | None,
    message_type: str | None,
    message_id: str | None,
    headers: Mapping[str, Any] | None,
) -> list[str] | None:
    """
    The problems of one message against the document registered for ``exchange``
    (``[]``: none), or ``None`` when no document is registered for it.
    """
    document = _DOCUMENTS.get(exchange)
    if document is None:
        return None
    STATS["checked"] += 1
    channel_id = channel_for(document, exchange, routing_key)
    if channel_id is None:
        return [f"{exchange} {routing_key!r}: no channel of the AsyncAPI document"]
    spec, pointer = _message_spec(document, channel_id)
    problems = []
    if content_type != spec["contentType"]:
        problems.append(f"content_type {content_type!r}, documented {spec['contentType']!r}")
    if delivery_mode != 2:
        problems.append(f"delivery_mode {delivery_mode!r}, documented 2")
    documented_type = spec["bindings"]["amqp"]["messageType"]
    if documented_type != "quarantine":
        documented_type = routing_key
    if message_type != documented_type:
        problems.append(f"AMQP type {message_type!r}, documented {documented_type!r}")
    problems += [f"headers {e}" for e in _errors(exchange, f"{pointer}/headers", headers or {})]
    if spec["contentType"] != "application/cloudevents+json":
        return problems
    STATS["events"] += 1
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return [*problems, f"body is not JSON: {exc}"]
    problems += [f"body {e}" for e in _errors(exchange, f"{pointer}/payload", event)]
    try:
        parsed = from_structured_event(
            RabbitMQMessage(headers={}, content_type=content_type, body=body)
        )
    except CloudEventValidationError as exc:
        return [*problems, f"the CloudEvents SDK refuses the body: {exc}"]
    if parsed.get_id() != message_id:
        problems.append(f"CloudEvents SDK id {parsed.get_id()!r} != message_id {message_id!r}")
    if parsed.get_type() != routing_key:
        problems.append(f"CloudEvents SDK type {parsed.get_type()!r} != routing key")
    return problems


def check(
    message: aio_pika.abc.AbstractIncomingMessage, *, exchange: str | None = None
) -> list[str] | None:
    """
    :func:`check_body` for a received message. ``exchange`` names the document's
    exchange for a message read elsewhere (a replay into a queue): its channel is then
    found by the AMQP ``type``.
    """
    if exchange is None:
        exchange, routing_key = message.exchange or "", message.routing_key or ""
    else:
        routing_key = message.type or ""
    return check_body(
        exchange,
        routing_key,
        message.body,
        content_type=message.content_type,
        delivery_mode=int(message.delivery_mode) if message.delivery_mode is not None else None,
        message_type=message.type,
        message_id=message.message_id,
        headers=dict(message.headers or {}),
    )
