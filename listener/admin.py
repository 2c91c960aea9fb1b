"""
The admin port (CONTRACT §7): ``/healthz``, ``/readyz``, ``/metrics``, and the
Bearer-key guarded ``/v1`` API (see :mod:`listener.adminauth`).

It listens on a private address (``admin.host``, 127.0.0.1 by default), apart from
the public webhook port, so probes and scrapes never queue behind webhook traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from listener.adminapi import AdminApi
from listener.adminauth import ApiAuth, require
from listener.config import AdminConfig, BrokerConfig
from listener.metrics import Metrics
from listener.selection import JournalReader
from listener.webhooks import expect_continue

__all__ = ["AdminApp", "Component"]

# A component reports {"status": ..., ...}; "ok", "listening", "connected" count as healthy.
Component = Callable[[], Mapping[str, Any]]
HEALTHY = frozenset({"ok", "listening", "connected"})


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
        refresh: Callable[[], None] = lambda: None,
        journal: JournalReader | None = None,
        broker: BrokerConfig | None = None,
    ) -> None:
        self._metrics = metrics
        self._components = components
        self._sources = sources
        self._refresh = refresh
        self.auth = ApiAuth(config.api_keys, rate_limit=config.rate_limit)
        self.app = web.Application(middlewares=[self.auth.middleware])
        self.app.router.add_get("/healthz", self._healthz, expect_handler=expect_continue)
        self.app.router.add_get("/readyz", self._readyz, expect_handler=expect_continue)
        self.app.router.add_get("/metrics", self._metrics_handler, expect_handler=expect_continue)
        self.app.router.add_get("/v1/sources", self._v1_sources, expect_handler=expect_continue)
        # Events, quarantine, replays and the OpenAPI document need the journal and the
        # broker settings; without them (tests of the health endpoints) they are absent.
        self.api: AdminApi | None = None
        if journal is not None and broker is not None:
            self.api = AdminApi(journal=journal, broker=broker)
            self.api.register(self.app)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the service is ready, with the status of every component and source."""
        body: dict[str, Any] = {name: dict(fn()) for name, fn in self._components.items()}
        sources = {name: dict(state) for name, state in self._sources().items()}
        body["sources"] = sources
        ready = all(c.get("status") in HEALTHY for k, c in body.items() if k != "sources")
        ready = ready and all(s.get("status") in HEALTHY for s in sources.values())
        body["status"] = "ready" if ready else "not_ready"
        return ready, body

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, body = self.readiness()
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
        data = [{"name": name, **state} for name, state in self._sources().items()]
        return web.Response(
            body=orjson.dumps({"success": True, "data": data}), content_type="application/json"
        )
