"""
The admin port (CONTRACT §7): ``/healthz``, ``/readyz``, ``/metrics``, and the
Bearer-key guarded ``/v1`` API (see :mod:`listener.admin.auth`).

``/readyz`` is unauthenticated: it says which part is not ready, never in a provider's
or the broker's own words (those are on ``/v1/sources``, behind a key). A publisher
that defers messages (the broker returned them) or archives with another retention
is ``degraded``: still ready (200), because taking the replica out of a load balancer
would not help, but visible; so is a stream with a subscription its provider refused.

``/readyz?for=intake`` asks only whether webhooks are taken into the journal (the
journal writable, the webhook endpoints not shut down): a load balancer's question.
The broker away is no reason to turn webhooks away (they wait in the journal,
CONTRACT §8), and with every replica's full ``/readyz`` at 503 a load balancer had
no replica left to send them to.

It listens on a private address (``admin.host``, 127.0.0.1 by default), apart from
the public webhook port, so probes and scrapes never queue behind webhook traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from listener.admin.api import AdminApi
from listener.admin.auth import ApiAuth, require
from listener.config import AdminConfig, BrokerConfig
from listener.journal.queries import Reader
from listener.metrics import Metrics
from listener.web import error_response, expect_continue, json_errors, ok

__all__ = ["AdminApp", "Component"]

# A component reports {"status": ..., ...}; "ok", "listening", "connected" count as healthy,
# "degraded" as ready but worth a look.
Component = Callable[[], Mapping[str, Any]]
HEALTHY = frozenset({"ok", "listening", "connected", "polling", "standby"})
READY = HEALTHY | {"degraded", "blocked"}  # (blocked: connected, CONTRACT §7; not healthy)
# Keys whose values may hold a peer's own words: kept off the unauthenticated /readyz.
_PRIVATE = frozenset({"last_error", "error", "conflicts", "mismatches"})


def public(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without what a provider or the broker wrote (nested lists too)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _PRIVATE:
            continue
        if isinstance(value, Mapping):
            out[key] = public(value)
        elif isinstance(value, list):
            out[key] = [public(v) if isinstance(v, Mapping) else v for v in value]
        else:
            out[key] = value
    return out


def _refused(part: Mapping[str, Any]) -> bool:
    """A stream with a subscription the provider refused: connected, but degraded."""
    subscriptions = part.get("subscriptions", ())
    return any(s.get("state") in ("forbidden", "invalid_params") for s in subscriptions)


class AdminApp:
    """
    Health, readiness and metrics; the ``/v1`` API (:mod:`listener.adminapi`) mounts on
    ``self.app`` too.
    """

    def __init__(
        self,
        *,
        config: AdminConfig,
        metrics: Metrics,
        components: Mapping[str, Component],
        sources: Callable[[], Mapping[str, Mapping[str, Any]]],
        poll_now: Callable[[str], str] = lambda _: "not_found",
        refresh: Callable[[], None] = lambda: None,
        journal: Reader | None = None,
        broker: BrokerConfig | None = None,
        asyncapi: Callable[[], bytes] | None = None,
    ) -> None:
        self._metrics = metrics
        self._components = components
        self._sources = sources
        self._poll_now = poll_now
        self._refresh = refresh
        self._asyncapi = asyncapi
        self.auth = ApiAuth(config.api_keys, rate_limit=config.rate_limit)
        self.app = web.Application(middlewares=[json_errors, self.auth.middleware])
        self.app.router.add_get("/healthz", self._healthz, expect_handler=expect_continue)
        self.app.router.add_get("/readyz", self._readyz, expect_handler=expect_continue)
        self.app.router.add_get("/metrics", self._metrics_handler, expect_handler=expect_continue)
        self.app.router.add_get("/v1/sources", self._v1_sources, expect_handler=expect_continue)
        self.app.router.add_post(
            "/v1/sources/{name}/poll", self._v1_poll, expect_handler=expect_continue
        )
        if asyncapi is not None:
            self.app.router.add_get(
                "/v1/asyncapi.json", self._v1_asyncapi, expect_handler=expect_continue
            )
        # Events, quarantine, replays and the OpenAPI document need the journal and the
        # broker settings; without them (tests of the health endpoints) they are absent.
        self.api: AdminApi | None = None
        if journal is not None and broker is not None:
            self.api = AdminApi(journal=journal, broker=broker)
            self.api.register(self.app)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def readiness(self, *, intake: bool = False) -> tuple[bool, dict[str, Any]]:
        """
        Whether the service is ready, with the status of every component and source;
        ``intake``: whether it takes webhooks (the journal and the webhook sources).
        """
        body: dict[str, Any] = {name: dict(fn()) for name, fn in self._components.items()}
        sources = {name: dict(state) for name, state in self._sources().items()}
        body["sources"] = sources
        parts = [c for k, c in body.items() if k != "sources"] + list(sources.values())
        gate = parts
        if intake:
            webhooks = [s for s in sources.values() if s.get("kind") == "webhook"]
            gate = [body.get("journal", {}), *webhooks]
        ready = all(p.get("status") in READY for p in gate)
        healthy = all(p.get("status") in HEALTHY and not _refused(p) for p in parts)
        body["status"] = "ready" if healthy else "degraded" if ready else "not_ready"
        return ready, body

    async def _readyz(self, request: web.Request) -> web.Response:
        scope = request.query.get("for")
        if scope not in (None, "intake"):
            return error_response(400, "BAD_REQUEST", "for: only 'intake' is known")
        ready, body = self.readiness(intake=scope == "intake")
        body = public(body)
        return web.Response(
            status=200 if ready else 503,
            body=orjson.dumps(body),
            content_type="application/json",
        )

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        self._refresh()
        response = web.Response(body=self._metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    @require("read")
    async def _v1_sources(self, _: web.Request) -> web.Response:
        # "state" is the contract's name (CONTRACT §7); "status", the same value, is
        # what /readyz shows and what earlier releases had here.
        return ok(
            [
                {"name": name, "state": state["status"], **state}
                for name, state in self._sources().items()
            ]
        )

    @require("read")
    async def _v1_asyncapi(self, _: web.Request) -> web.Response:
        """``GET /v1/asyncapi.json``: what this listener publishes (CONTRACT §11)."""
        assert self._asyncapi is not None  # the route exists only with a document
        return web.Response(body=self._asyncapi(), content_type="application/json")

    @require("write")
    async def _v1_poll(self, request: web.Request) -> web.Response:
        """``POST /v1/sources/{name}/poll``: poll a poll source's resources now (202)."""
        name = request.match_info["name"]
        outcome = self._poll_now(name)
        if outcome == "not_found":
            return error_response(404, "NOT_FOUND", f"no source named {name[:100]!r}")
        if outcome == "not_poll":
            return error_response(409, "NOT_A_POLL_SOURCE", f"{name[:100]!r} is not a poll source")
        if outcome == "not_held":
            return error_response(
                409, "NOT_HELD_HERE", f"another replica polls {name[:100]!r} (see /v1/sources)"
            )
        return ok({"name": name, "polling": True}, status=202)
