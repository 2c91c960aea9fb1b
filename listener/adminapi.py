"""
The ``/v1`` admin API beyond ``/v1/sources`` (CONTRACT §7): events, quarantine,
replays and the OpenAPI document. :class:`listener.admin.AdminApp` mounts it.

* Lists are ``{"success": true, "data": [...], "pagination": {"total", "limit",
  "offset", "has_more"}}``, oldest first. ``limit`` is 0 to :data:`MAX_LIMIT` (more
  is cut to the maximum, as the ``pagination.limit`` of the answer says; 0 counts
  without listing); an ``offset`` past the end gives an empty page.
* ``POST /v1/replays`` validates like ``listener replay`` (same engine), checks the
  target on the broker, answers 201 with the replay, and runs it in the daemon. A
  replay has its own broker connection and reads the journal through the daemon's
  reader, so it never holds up ingestion or the publisher. At most
  :data:`MAX_RUNNING` run at once; the last :data:`KEEP` finished ones are kept.
* Scopes are marked with :func:`listener.adminauth.require`; the auth middleware
  answers 401/403/429 before a handler runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import structlog
from aiohttp import web

from listener.adminauth import require
from listener.config import BrokerConfig
from listener.envelope import rfc3339
from listener.openapi import DEFAULT_LIMIT, MAX_LIMIT, ReplayBody, document
from listener.quarantine import list_quarantined
from listener.replay import replay_request
from listener.replayer import Replay, ReplayArgumentError, ReplayError
from listener.selection import (
    EVENT_COLUMNS,
    EventFilter,
    JournalReader,
    TopicPattern,
    parse_time,
    select_events,
)
from listener.webhooks import error_response, expect_continue

__all__ = ["MAX_RUNNING", "AdminApi"]

log = structlog.get_logger("listener.adminapi")

MAX_RUNNING = 2
KEEP = 100
_STATUS = {0: "pending", 1: "published"}


class _BadRequest(Exception):
    """A parameter is wrong; the message names it."""


def _ok(data: Any, status: int = 200, **extra: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"success": True, "data": data, **extra}),
        content_type="application/json",
    )


def _iso(moment: float | None) -> str | None:
    return rfc3339(datetime.fromtimestamp(moment, UTC)) if moment is not None else None


def _page(request: web.Request) -> tuple[int, int]:
    values = []
    for name, default in (("limit", DEFAULT_LIMIT), ("offset", 0)):
        raw = request.query.get(name)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            raise _BadRequest(f"{name}: expected a whole number from 0") from None
        if value < 0:
            raise _BadRequest(f"{name}: expected a whole number from 0")
        values.append(value)
    return min(values[0], MAX_LIMIT), values[1]


def _pagination(total: int, limit: int, offset: int, shown: int) -> dict[str, Any]:
    return {"total": total, "limit": limit, "offset": offset, "has_more": offset + shown < total}


def _event_view(row: Sequence[Any]) -> dict[str, Any]:
    seq, source, event_id, _, routing_key, body, moment, received_at, _, _, status, published = row
    return {
        "seq": seq,
        "id": event_id,
        "source": source,
        "type": routing_key,
        "time": _iso(moment),
        "received_at": _iso(received_at),
        "status": _STATUS.get(status, str(status)),
        "published_at": _iso(published),
        # The stored body is the CloudEvent exactly as published: embed it unparsed.
        "event": orjson.Fragment(bytes(body)),
    }


class AdminApi:
    """Handlers for ``/v1/events``, ``/v1/quarantine``, ``/v1/replays``, ``/v1/openapi.json``."""

    def __init__(self, *, journal: JournalReader, broker: BrokerConfig) -> None:
        self._journal = journal
        self._broker = broker
        self._replays: dict[str, Replay] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._document = orjson.dumps(document())

    def register(self, app: web.Application) -> None:
        """Add the routes to ``app`` and stop running replays when it shuts down."""
        app.router.add_get("/v1/events", self.events, expect_handler=expect_continue)
        app.router.add_get("/v1/quarantine", self.quarantine, expect_handler=expect_continue)
        app.router.add_post("/v1/replays", self.start_replay, expect_handler=expect_continue)
        app.router.add_get("/v1/replays/{id}", self.replay, expect_handler=expect_continue)
        app.router.add_get("/v1/openapi.json", self.openapi, expect_handler=expect_continue)
        app.on_cleanup.append(self._stop_replays)

    @require("read")
    async def events(self, request: web.Request) -> web.Response:
        """``GET /v1/events?source=&type=&since=&until=&limit=&offset=``."""
        try:
            limit, offset = _page(request)
            selection = self._selection(request)
        except _BadRequest as exc:
            return error_response(400, "BAD_REQUEST", str(exc))
        selected = await select_events(self._journal, selection)
        rows: list[tuple[Any, ...]] = []
        if limit and offset < selected.total:
            rows = await self._journal.query(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE {selected.where}"  # noqa: S608 - constant fragments, ? arguments
                " ORDER BY seq LIMIT ? OFFSET ?",
                (*selected.args, limit, offset),
            )
        data = [_event_view(row) for row in rows]
        return _ok(data, pagination=_pagination(selected.total, limit, offset, len(data)))

    @staticmethod
    def _selection(request: web.Request) -> EventFilter:
        query, now = request.query, datetime.now(UTC).timestamp()
        times: dict[str, float | None] = {}
        for name in ("since", "until"):
            raw = query.get(name)
            try:
                times[name] = parse_time(raw, now=now) if raw else None
            except ValueError as exc:
                raise _BadRequest(f"{name}: {exc}") from None
        try:
            types = TopicPattern(query["type"]) if query.get("type") else None
        except ValueError as exc:
            raise _BadRequest(f"type: {exc}") from None
        return EventFilter(
            source=query.get("source") or None,
            types=types,
            since=times["since"],
            until=times["until"],
        )

    @require("read")
    async def quarantine(self, request: web.Request) -> web.Response:
        """``GET /v1/quarantine?source=&reason=&limit=&offset=``."""
        try:
            limit, offset = _page(request)
        except _BadRequest as exc:
            return error_response(400, "BAD_REQUEST", str(exc))
        rows, total = await list_quarantined(
            self._journal,
            limit=limit,
            offset=offset,
            reason=request.query.get("reason") or None,
            source=request.query.get("source") or None,
        )
        data = [row.as_dict() for row in rows]
        return _ok(data, pagination=_pagination(total, limit, offset, len(data)))

    @require("write")
    async def start_replay(self, request: web.Request) -> web.Response:
        """``POST /v1/replays``: 201 with the replay; it runs in the background."""
        try:
            body = ReplayBody.model_validate_json(await request.read())
        except pydantic.ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in error["loc"]) or "(body)"
            return error_response(400, "BAD_REQUEST", f"{where}: {error['msg']}")
        running = sum(1 for r in self._replays.values() if r.status.state == "running")
        if running >= MAX_RUNNING:
            return error_response(
                409, "TOO_MANY_REPLAYS", f"{running} replays are running; wait for one to end"
            )
        try:
            replay_args = replay_request(
                since=body.since,
                until=body.until,
                source=body.source,
                type_=body.type,
                origin=body.from_,
                to_queue=body.to_queue,
                to_exchange=body.to_exchange,
                dry_run=body.dry_run,
                rate=body.rate,
                archive_enabled=self._broker.archive.enabled,
            )
            replay = Replay(
                replay_args,
                broker=self._broker,
                journal=self._journal if replay_args.origin == "journal" else None,
            )
            await replay.open()
        except ReplayArgumentError as exc:
            return error_response(400, "BAD_REQUEST", str(exc))
        except ReplayError as exc:
            return error_response(503, "UNAVAILABLE", str(exc), {"Retry-After": "5"})
        self._keep(replay)
        task = asyncio.create_task(self._run(replay), name=f"replay:{replay.status.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        response = _ok(replay.status.as_dict(), status=201)
        response.headers["Location"] = f"/v1/replays/{replay.status.id}"
        return response

    def _keep(self, replay: Replay) -> None:
        self._replays[replay.status.id] = replay
        finished = [k for k, r in self._replays.items() if r.status.state != "running"]
        for key in finished[: max(len(self._replays) - KEEP, 0)]:
            del self._replays[key]

    async def _run(self, replay: Replay) -> None:
        status = replay.status
        log.info("replay_started", id=status.id, origin=status.origin, dry_run=status.dry_run)
        try:
            await replay.run()
        except asyncio.CancelledError:
            status.error = "stopped: the listener is shutting down"
            raise
        except Exception as exc:  # the status says failed; the daemon carries on
            log.warning("replay_failed", id=status.id, error=str(exc), published=status.published)
        else:
            log.info(
                "replay_completed", id=status.id, matched=status.matched, published=status.published
            )
        finally:
            await replay.close()

    async def _stop_replays(self, _: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @require("read")
    async def replay(self, request: web.Request) -> web.Response:
        """``GET /v1/replays/{id}``."""
        found = self._replays.get(request.match_info["id"])
        if found is None:
            return error_response(
                404, "NOT_FOUND", f"no replay with this id (the last {KEEP} are kept)"
            )
        return _ok(found.status.as_dict())

    @require("read")
    async def openapi(self, _: web.Request) -> web.Response:
        """``GET /v1/openapi.json``."""
        return web.Response(body=self._document, content_type="application/json")
