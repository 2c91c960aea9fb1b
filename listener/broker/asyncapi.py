"""
The AsyncAPI 3.0 document of what a configured listener publishes (CONTRACT §11).

Generated, never written by hand: the channels are the routing keys the configured
sources publish (each provider's ``data_models``, through
:func:`handlers.published_models`), and every payload schema is the CloudEvent envelope
(:mod:`listener.envelope`) around the JSON Schema of the very pydantic model that
validates that type's ``data``. So the document cannot drift from the handlers; the test
suite checks it against the official AsyncAPI 3.0 schema and every message the
integration tests publish against it.

* one channel per routing key on ``<exchange>`` (AMQP 0-9-1 binding: topic, durable),
  with one ``send`` operation (``deliveryMode`` 2, ``mandatory``);
* the quarantine channel (``<exchange>.quarantine``, routing key = the source name)
  with the ``x-quarantine-*`` headers;
* the archive stream (``<exchange>.archive``, when enabled), which holds every event.

Spec: https://www.asyncapi.com/docs/reference/specification/v3.0.0 and the AMQP
bindings 0.3.0 (https://github.com/asyncapi/bindings/tree/master/amqp).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handlers import load_provider, published_models
from listener.broker.topology import QUARANTINE_CONTENT_TYPE, Topology
from listener.config import Config, mask_url
from listener.envelope import APP_ID, CONTENT_TYPE, DATACONTENTTYPE, SPECVERSION

__all__ = ["ASYNCAPI_VERSION", "build_document", "channel_for"]

ASYNCAPI_VERSION = "3.0.0"
_BINDING_VERSION = "0.3.0"
_REF = "#/components/schemas/{model}"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHORTSTR = 255

#: Headers of an event message: none, except on a replay.
EVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "x-replayed": {
            "type": "boolean",
            "const": True,
            "description": "Present (true) only on a message a replay published again; "
            "the body and the message_id are the original's.",
        }
    },
}


def _version() -> str:
    try:
        return metadata.version("listener")
    except metadata.PackageNotFoundError:  # run from a source tree without an install
        return "0.0.0"


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _server(config: Config) -> dict[str, Any]:
    url = config.broker.nodes[0].get_secret_value()
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname  # (IPv6)
    return {
        "host": f"{host}:{port}",
        "protocol": parts.scheme,
        "protocolVersion": "0.9.1",
        "description": f"RabbitMQ at {mask_url(url)} (virtual host {_vhost(url)!r}).",
    }


def _exchange_binding(name: str, vhost: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": name,
                "type": "topic",
                "durable": True,
                "autoDelete": False,
                "vhost": vhost,
            },
            "bindingVersion": _BINDING_VERSION,
        }
    }


def _send(channel_id: str, message_id: str) -> dict[str, Any]:
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
        "bindings": {
            "amqp": {
                "deliveryMode": 2,
                "mandatory": True,
                "timestamp": True,
                "bindingVersion": _BINDING_VERSION,
            }
        },
    }


def _type_schema(address: str) -> dict[str, Any]:
    if not _PLACEHOLDER.search(address):
        return {"type": "string", "const": address}
    # "getstoken.{type}" → ^getstoken\.[...]$: any dot-separated words after the prefix.
    pieces = _PLACEHOLDER.split(address)
    pattern = "".join(
        re.escape(piece) if i % 2 == 0 else r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"
        for i, piece in enumerate(pieces)
    )
    return {"type": "string", "pattern": f"^{pattern}$", "maxLength": _SHORTSTR}


def _envelope(address: str, provider: str, sources: list[str], data_ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A CloudEvents 1.0 event in structured JSON mode.",
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "provider",
            "data",
        ],
        "additionalProperties": False,
        "properties": {
            "specversion": {"type": "string", "const": SPECVERSION},
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": _SHORTSTR,
                "description": "Stable per provider event (retries, reconnects, restarts and "
                "replays give the same id); equal to the AMQP message_id. Deduplicate on it.",
            },
            "source": {
                "type": "string",
                "enum": sources,
                "description": "The configured source the event came from.",
            },
            "type": {
                **_type_schema(address),
                "description": "<provider>.<event type>; also the routing key and the AMQP type.",
            },
            "time": {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339 in UTC: when the provider says the event happened, "
                "else when it was received.",
            },
            "datacontenttype": {"type": "string", "const": DATACONTENTTYPE},
            "provider": {"type": "string", "const": provider},
            "data": {"$ref": data_ref},
        },
    }


def _amqp_properties(message_type: str, content_type: str, message_id: str) -> dict[str, Any]:
    # A specification extension: AsyncAPI has no field for AMQP basic properties.
    return {
        "content_type": content_type,
        "message_id": message_id,
        "type": message_type,
        "delivery_mode": 2,
        "app_id": APP_ID,
        "timestamp": "when the listener received the input (seconds)",
    }


def _summary(model: type[BaseModel], address: str) -> str:
    # The model's first docstring line, its reStructuredText literals as CommonMark code.
    lines = (model.__doc__ or "").strip().splitlines()
    return lines[0].replace("``", "`") if lines else address


def _channel_id(address: str) -> str:
    return _PLACEHOLDER.sub("other", address)


def _published(config: Config) -> dict[str, tuple[str, type[BaseModel], list[str]]]:
    """address → (provider, data model, sources), in configuration order."""
    out: dict[str, tuple[str, type[BaseModel], list[str]]] = {}
    for source in config.sources:
        provider = load_provider(source.provider)
        for address, model in published_models(provider, source.settings).items():
            _, _, names = out.setdefault(address, (provider.name, model, []))
            if source.name not in names:
                names.append(source.name)
    return out


def _quarantine(
    config: Config, topology: Topology, vhost: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    names = [s.name for s in config.sources]
    # An enum needs at least one value: a listener without sources names none.
    named: dict[str, Any] = {"enum": names} if names else {}
    message = {
        "name": "quarantined",
        "title": "Quarantined input",
        "summary": "Input that failed validation, kept raw with the reason.",
        "contentType": QUARANTINE_CONTENT_TYPE,
        "headers": {
            "type": "object",
            "required": ["x-quarantine-reason", "x-quarantine-detail", "x-source"],
            "properties": {
                "x-quarantine-reason": {
                    "type": "string",
                    "description": "A short code: invalid_json, schema_violation, too_deep, "
                    "unrepresentable, environment_mismatch, unknown_type, unknown_channel, "
                    "unknown_subscription, frame_too_large, invalid_params.",
                },
                "x-quarantine-detail": {
                    "type": "string",
                    "maxLength": 1000,
                    "description": "Human readable; a schema violation names fields, never"
                    " their values; an unknown type, channel or environment is quoted (at most"
                    " 245 characters).",
                },
                "x-source": {"type": "string", **named},
            },
        },
        "payload": {
            "type": "string",
            "format": "binary",
            "description": "The input as received (a webhook body, a frame, a record).",
        },
        "bindings": {"amqp": {"messageType": "quarantine", "bindingVersion": _BINDING_VERSION}},
        "x-amqp-properties": _amqp_properties(
            "quarantine", QUARANTINE_CONTENT_TYPE, "q_ + a digest of the payload"
        ),
    }
    channel = {
        "address": "{source}",
        "title": topology.quarantine_exchange,
        "description": f"Routing key = the source name. The listener binds the durable queue "
        f"{topology.quarantine_queue!r} to it with '#'.",
        "parameters": {"source": {**named, "description": "The configured source."}},
        "messages": {"quarantined": message},
        "bindings": _exchange_binding(topology.quarantine_exchange, vhost),
    }
    return channel, _send("quarantine", "quarantined")


def build_document(config: Config) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of what ``config`` publishes (plain JSON data)."""
    topology = Topology(config.broker.exchange)
    vhost = _vhost(config.broker.nodes[0].get_secret_value())
    published = _published(config)
    models = {model for _, model, _ in published.values()}
    refs, definitions = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__qualname__)],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for address, (provider, model, sources) in published.items():
        channel_id = _channel_id(address)
        envelope = f"CloudEvent.{channel_id}"
        schemas[envelope] = _envelope(
            address, provider, sources, refs[(model, "validation")]["$ref"]
        )
        messages[channel_id] = {
            "name": channel_id,
            "title": address,
            "summary": _summary(model, address),
            "contentType": CONTENT_TYPE,
            "headers": EVENT_HEADERS,
            "payload": {"$ref": _REF.format(model=envelope)},
            "bindings": {"amqp": {"messageType": address, "bindingVersion": _BINDING_VERSION}},
            "x-amqp-properties": _amqp_properties(address, CONTENT_TYPE, "the CloudEvent id"),
        }
        channel: dict[str, Any] = {
            "address": address,
            "title": address,
            "description": f"Published by {', '.join(sources)} (provider {provider}).",
            "messages": {channel_id: {"$ref": f"#/components/messages/{channel_id}"}},
            "bindings": _exchange_binding(topology.exchange, vhost),
        }
        if params := _PLACEHOLDER.findall(address):
            channel["parameters"] = {
                p: {"description": "A type outside the provider's table, as it sent it."}
                for p in params
            }
        channels[channel_id] = channel
        operations[f"send.{channel_id}"] = _send(channel_id, channel_id)
    channels["quarantine"], operations["send.quarantine"] = _quarantine(config, topology, vhost)
    if config.broker.archive.enabled:
        channels["archive"] = {
            "address": topology.archive_queue,
            "title": topology.archive_queue,
            "description": "A RabbitMQ stream bound '#' to the events exchange: every event "
            f"above, kept {config.broker.archive.max_age:g} s (x-max-age). Read it with "
            "x-stream-offset; `listener replay --from archive` re-publishes from it. It "
            "also holds the end markers of archive replays: an empty body with the header "
            "x-listener-marker and no content type; skip them.",
            "messages": {
                cid: {"$ref": f"#/components/messages/{cid}"}
                for cid in channels
                if cid not in ("quarantine",)
            },
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": topology.archive_queue,
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": vhost,
                    },
                    "bindingVersion": _BINDING_VERSION,
                }
            },
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"listener events on {topology.exchange!r}",
            "version": _version(),
            "description": "Every event the configured listener publishes, as CloudEvents 1.0 "
            "(structured JSON) on a topic exchange, routing key = the CloudEvent type. "
            "Messages are persistent and published with confirms; a message may arrive "
            "more than once (redelivery, replay): deduplicate on message_id.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {"broker": _server(config)},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def channel_for(document: Mapping[str, Any], exchange: str, routing_key: str) -> str | None:
    """
    The id of the channel of ``document`` a message on ``exchange`` with ``routing_key``
    belongs to: an exact address first, then one with a ``{placeholder}``.
    """
    candidates = []
    for channel_id, channel in document["channels"].items():
        binding = channel.get("bindings", {}).get("amqp", {})
        if binding.get("is") != "routingKey" or binding["exchange"]["name"] != exchange:
            continue
        address = channel["address"]
        if address == routing_key:
            return str(channel_id)
        pieces = _PLACEHOLDER.split(address)
        pattern = "".join(re.escape(p) if i % 2 == 0 else ".+" for i, p in enumerate(pieces))
        if pieces[1:] and re.fullmatch(pattern, routing_key):
            candidates.append(str(channel_id))
    return candidates[0] if candidates else None
