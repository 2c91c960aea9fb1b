"""
The ``/v1`` admin API beyond ``/v1/sources`` (CONTRACT §7): events, quarantine,
replays and the OpenAPI document. :class:`listener.admin.app.AdminApp` mounts it.

* Lists are ``{"success": true, "data": [...], "pagination": {"total", "limit",
  "offset", "has_more"}}``, oldest first. ``limit`` is 0 to :data:`MAX_LIMIT` (more
  is cut to the maximum, as the ``pagination.limit`` of the answer says; 0 counts
  without listing); an ``offset`` past the end gives an empty page. Events also take
  ``after`` (a seq; ``pagination.next_after``), as cheap deep in the journal as at its
  start; ``offset`` stops at :data:`~listener.journal.queries.MAX_OFFSET`.
* Every read runs on the journal's query thread: never in the publisher's way.
* ``POST /v1/replays`` validates like ``listener replay`` (same engine), checks the
  target on the broker, answers 201 with the replay, and runs it in the daemon. At
  most :data:`MAX_RUNNING` run at once; ``DELETE /v1/replays/{id}`` cancels one; the
  last :data:`KEEP` finished ones are kept.
* Scopes are marked with :func:`listener.admin.auth.require`; the auth middleware
  answers 401/403/429 before a handler runs.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import structlog
from aiohttp import web

from listener.admin.auth import require
from listener.admin.openapi import DEFAULT_LIMIT, MAX_LIMIT, ReplayBody, document
from listener.config import BrokerConfig
from listener.exceptions import ReplayArgumentError, ReplayError
from listener.journal.queries import (
    MAX_OFFSET,
    Reader,
    events_page,
    list_quarantined,
    select_events,
)
from listener.ops.replay import Replay
from listener.ops.replay_request import replay_request
from listener.selection import EventFilter, TopicPattern, parse_time
from listener.web import error_response, expect_continue, ok

__all__ = ["MAX_RUNNING", "AdminApi"]

log = structlog.get_logger("listener.adminapi")

MAX_RUNNING = 2
KEEP = 100


class _BadRequest(Exception):
    """A parameter is wrong; the message names it."""


_NUMBER_MAX = 2**63 - 1  # SQLite's largest integer (a larger one was a 500)


def _number(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    problem = f"{name}: expected a whole number from 0 to {_NUMBER_MAX}"
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise _BadRequest(problem) from None
    if value is not None and not 0 <= value <= _NUMBER_MAX:
        raise _BadRequest(problem)
    return value


def _page(request: web.Request) -> tuple[int, int]:
    limit = _number(request, "limit", DEFAULT_LIMIT) or 0
    offset = _number(request, "offset", 0) or 0
    if offset > MAX_OFFSET:
        raise _BadRequest(
            f"offset: at most {MAX_OFFSET}; page further with after=<pagination.next_after>"
        )
    return min(limit, MAX_LIMIT), offset


def _pagination(total: int, limit: int, offset: int, shown: int) -> dict[str, Any]:
    return {"total": total, "limit": limit, "offset": offset, "has_more": offset + shown < total}


class AdminApi:
    """Handlers for ``/v1/events``, ``/v1/quarantine``, ``/v1/replays``, ``/v1/openapi.json``."""

    def __init__(self, *, journal: Reader, broker: BrokerConfig) -> None:
        self._journal = journal
        self._broker = broker
        self._replays: dict[str, Replay] = {}
        self._opening = 0  # replays past the count, not yet kept (connecting)
        self._tasks: set[asyncio.Task[None]] = set()
        self._document = orjson.dumps(document())

    def register(self, app: web.Application) -> None:
        """Add the routes to ``app`` and stop running replays when it shuts down."""
        app.router.add_get("/v1/events", self.events, expect_handler=expect_continue)
        app.router.add_get("/v1/quarantine", self.quarantine, expect_handler=expect_continue)
        app.router.add_post("/v1/replays", self.start_replay, expect_handler=expect_continue)
        app.router.add_get("/v1/replays/{id}", self.replay, expect_handler=expect_continue)
        app.router.add_delete(
            "/v1/replays/{id}", self.cancel_replay, expect_handler=expect_continue
        )
        app.router.add_get("/v1/openapi.json", self.openapi, expect_handler=expect_continue)
        app.on_cleanup.append(self._stop_replays)

    @require("read")
    async def events(self, request: web.Request) -> web.Response:
        """``GET /v1/events?source=&type=&since=&until=&limit=&offset=``."""
        try:
            limit, offset = _page(request)
            after = _number(request, "after", None)
            selection = self._selection(request)
        except _BadRequest as exc:
            return error_response(400, "BAD_REQUEST", str(exc))
        selected = await select_events(self._journal, selection)
        page = await events_page(self._journal, selected, limit=limit, offset=offset, after=after)
        pagination = _pagination(selected.total, limit, offset, len(page.data))
        if after is not None:
            pagination["has_more"] = page.next_after is not None
        return ok(page.data, pagination={**pagination, "next_after": page.next_after})

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
        return ok(data, pagination=_pagination(total, limit, offset, len(data)))

    @require("write")
    async def start_replay(self, request: web.Request) -> web.Response:
        """``POST /v1/replays``: 201 with the replay; it runs in the background."""
        try:
            body = ReplayBody.model_validate_json(await request.read())
        except pydantic.ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in error["loc"]) or "(body)"
            return error_response(400, "BAD_REQUEST", f"{where}: {error['msg']}")
        # Those still opening count: a request for another arrives while one connects.
        running = self._opening + sum(
            1 for r in self._replays.values() if r.status.state == "running"
        )
        if running >= MAX_RUNNING:
            return error_response(
                409, "TOO_MANY_REPLAYS", f"{running} replays are running; wait for one to end"
            )
        self._opening += 1
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
                exchange=self._broker.exchange,
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
        finally:
            self._opening -= 1
        self._keep(replay)
        task = asyncio.create_task(self._run(replay), name=f"replay:{replay.status.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        response = ok(replay.status.as_dict(), status=201)
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
        return ok(found.status.as_dict())

    @require("write")
    async def cancel_replay(self, request: web.Request) -> web.Response:
        """``DELETE /v1/replays/{id}``: stop a running replay after what is in flight."""
        found = self._replays.get(request.match_info["id"])
        if found is None:
            return error_response(
                404, "NOT_FOUND", f"no replay with this id (the last {KEEP} are kept)"
            )
        if found.status.state == "running":
            found.cancel()
            log.info("replay_cancelled", id=found.status.id)
        return ok(found.status.as_dict())

    @require("read")
    async def openapi(self, _: web.Request) -> web.Response:
        """``GET /v1/openapi.json``."""
        return web.Response(body=self._document, content_type="application/json")
