"""
The admin API's shapes and its OpenAPI 3.1 document, served at ``/v1/openapi.json``.

The request body of ``POST /v1/replays`` is a pydantic model, so the document's
schema for it and the validation the handler does are the same thing. The rest is
written out once here, beside the handlers in :mod:`listener.admin.api`
(https://spec.openapis.org/oas/v3.1.0).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from listener.journal.queries import MAX_OFFSET
from listener.ops.replay_request import MIN_RATE

__all__ = ["MAX_LIMIT", "ReplayBody", "document"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class ReplayBody(BaseModel):
    """``POST /v1/replays``: the options of ``listener replay``, by their API names."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    since: str = Field(description="ISO-8601, or relative: 15m, 2h, 1d (ago).")
    until: str | None = Field(default=None, description="End (exclusive); default: now.")
    source: str | None = Field(default=None, description="Only events of this source.")
    type: str | None = Field(
        default=None, description="AMQP pattern on the type: <provider>.<type>, * and #"
    )
    from_: Literal["journal", "archive"] = Field(default="journal", alias="from")
    to_queue: str | None = Field(default=None, description="Deliver into this queue only.")
    to_exchange: str | None = Field(default=None, description="Publish here, routed by type.")
    dry_run: StrictBool = Field(default=False, description="Count by type; publish nothing.")
    rate: float | None = Field(
        default=None, ge=MIN_RATE, description=f"At most this many events/s ({MIN_RATE:g} or more)."
    )


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: dict[str, Any], *, paginated: bool = False, status: str = "200") -> dict[str, Any]:
    properties: dict[str, Any] = {"success": {"const": True}, "data": schema}
    if paginated:
        properties["pagination"] = _ref("Pagination")
    return {
        status: {
            "description": "Success.",
            "content": {
                "application/json": {"schema": {"type": "object", "properties": properties}}
            },
        }
    }


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Bad request: the message names the parameter.",
        401: "No valid Bearer key.",
        403: "The key lacks the scope.",
        404: "Not found.",
        409: "Too many replays running, not a poll source, or one another replica polls.",
        429: "Over the rate limit (see Retry-After).",
        503: "The broker is unreachable.",
    }
    error = {"application/json": {"schema": _ref("Error")}}
    return {str(s): {"description": text[s], "content": error} for s in (*statuses, 401, 403, 429)}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_PAGE = [
    _query(
        "limit",
        f"Items per page, 0 to {MAX_LIMIT} (more is cut to {MAX_LIMIT}).",
        {"type": "integer", "minimum": 0, "default": DEFAULT_LIMIT},
    ),
    _query(
        "offset",
        f"Items to skip, at most {MAX_OFFSET}; page further with `after`.",
        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
    ),
]
_AFTER = _query(
    "after",
    "Only events with a seq above this (pagination.next_after of the previous page):"
    " as cheap deep in the journal as at its start.",
    {"type": "integer", "minimum": 0},
)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "success": {"const": False},
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "Pagination": {
        "type": "object",
        "properties": {
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "has_more": {"type": "boolean"},
            "next_after": {
                "type": ["integer", "null"],
                "description": "Pass as `after` for the next page (events only).",
            },
        },
    },
    "Event": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "id": {"type": "string"},
            "source": {"type": "string"},
            "type": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
            "received_at": {"type": "string", "format": "date-time"},
            "status": {"enum": ["pending", "published", "deferred"]},
            "published_at": {"type": ["string", "null"], "format": "date-time"},
            "event": {"type": "object", "description": "The CloudEvent as published."},
        },
    },
    "QuarantinedEvent": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "seq": {"type": "integer"},
            "source": {"type": "string"},
            "reason": {"type": "string"},
            "detail": {"type": "string"},
            "received_at": {"type": "string", "format": "date-time"},
            "status": {"enum": ["pending", "quarantined", "deferred"]},
            "size": {"type": "integer"},
            "payload": {"type": "string", "description": "The raw payload as text (cut)."},
            "payload_truncated": {"type": "boolean"},
        },
    },
    "Replay": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "state": {"enum": ["running", "completed", "failed", "cancelled"]},
            "from": {"enum": ["journal", "archive"]},
            "dry_run": {"type": "boolean"},
            "total": {"type": ["integer", "null"]},
            "matched": {"type": "integer"},
            "published": {"type": "integer"},
            "unroutable": {"type": "integer"},
            "progress": {"type": ["number", "null"]},
            "by_type": {"type": "object", "additionalProperties": {"type": "integer"}},
            "error": {"type": ["string", "null"]},
            "started_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "Source": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["webhook", "websocket", "poll"]},
            "state": {"type": "string"},
            "status": {"type": "string", "description": "The same as state."},
        },
        "required": ["name", "kind", "state", "status"],
        "additionalProperties": True,
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document of the admin port."""
    try:
        release = version("listener")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        release = "0"
    schemas = {**_SCHEMAS, "ReplayRequest": ReplayBody.model_json_schema(by_alias=True)}
    plain: dict[str, Any] = {"security": []}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "listener admin API",
            "version": release,
            "description": "Health, metrics and the /v1 API on the private admin port.",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": {
            "/healthz": {"get": {**plain, "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {
                "get": {
                    **plain,
                    "parameters": [
                        {
                            "name": "for",
                            "in": "query",
                            "description": "intake: only whether webhooks are journaled"
                            " (a load balancer's check; the broker is not asked).",
                            "schema": {"type": "string", "enum": ["intake"]},
                        }
                    ],
                    "responses": {
                        "200": {"description": "Ready."},
                        "400": {"description": "An unknown `for`."},
                        "503": {"description": "Not ready; the body says which part."},
                    },
                }
            },
            "/metrics": {"get": {**plain, "responses": {"200": {"description": "Prometheus."}}}},
            "/v1/sources": {
                "get": {
                    "summary": "Sources and their state (scope: read).",
                    "responses": {**_ok({"type": "array", "items": _ref("Source")}), **_errors()},
                }
            },
            "/v1/sources/{name}/poll": {
                "post": {
                    "summary": "Poll a poll source's resources now (scope: write).",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        **_ok(
                            {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "polling": {"const": True},
                                },
                            },
                            status="202",
                        ),
                        **_errors(404, 409),
                    },
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "Journaled events, oldest first (scope: read).",
                    "parameters": [
                        _query("source", "Only this source."),
                        _query(
                            "type", "AMQP pattern on the type: <provider>.<type>, with * and #."
                        ),
                        _query("since", "CloudEvent time from: ISO-8601 or 15m, 2h, 1d (ago)."),
                        _query("until", "CloudEvent time before (exclusive)."),
                        *_PAGE,
                        _AFTER,
                    ],
                    "responses": {
                        **_ok({"type": "array", "items": _ref("Event")}, paginated=True),
                        **_errors(400),
                    },
                }
            },
            "/v1/quarantine": {
                "get": {
                    "summary": "What is quarantined, with reasons (scope: read).",
                    "parameters": [
                        _query("source", "Only this source."),
                        _query("reason", "Only this reason."),
                        *_PAGE,
                    ],
                    "responses": {
                        **_ok({"type": "array", "items": _ref("QuarantinedEvent")}, paginated=True),
                        **_errors(400),
                    },
                }
            },
            "/v1/replays": {
                "post": {
                    "summary": "Start a replay (scope: write).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ReplayRequest")}},
                    },
                    "responses": {**_ok(_ref("Replay"), status="201"), **_errors(400, 409, 503)},
                }
            },
            "/v1/replays/{id}": {
                "get": {
                    "summary": "A replay's state and counts (scope: read).",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {**_ok(_ref("Replay")), **_errors(404)},
                },
                "delete": {
                    "summary": "Cancel a running replay (scope: write).",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {**_ok(_ref("Replay")), **_errors(404)},
                },
            },
            "/v1/asyncapi.json": {
                "get": {
                    "summary": "The AsyncAPI 3.0 document of what this listener publishes "
                    "(scope: read).",
                    "responses": {"200": {"description": "AsyncAPI 3.0."}, **_errors()},
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document (scope: read).",
                    "responses": {"200": {"description": "OpenAPI 3.1."}, **_errors()},
                }
            },
        },
    }
