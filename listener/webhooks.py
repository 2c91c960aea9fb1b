"""
The webhook receiver: aiohttp on the public port, one route per webhook source
(CONTRACT §5).

Per request, in this order: shutting down → 503; body over ``http.max_body`` → 413
(from ``Content-Length`` before reading, and while reading for chunked bodies);
signature → 401; journal over its limit → 503 + ``Retry-After``; parse; append to
the journal (durable) → 200. The 200 is sent only after the journal commit.

``Content-Type`` is not checked: the signature covers the raw bytes, and they are
parsed as JSON whatever the header says (a forged body fails the signature first; a
signed body that is not JSON is quarantined), so a provider that labels its JSON
``text/plain`` loses nothing. The body is never read as a form, and a compressed body
(``Content-Encoding``) counts against ``max_body`` as it inflates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from handlers import Event, WebhookProvider, load_provider
from listener.config import HttpConfig, WebhookSourceConfig
from listener.envelope import Entry, event_entry, quarantine_entry
from listener.exceptions import JournalError, JournalFull, SignatureError
from listener.journal import Journal
from listener.metrics import Metrics
from listener.signatures import Verifier

__all__ = ["WebhookApp", "error_response", "expect_continue"]

log = structlog.get_logger("listener.webhooks")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(
    status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The contract's error body: ``{"success": false, "error": {"code", "message"}}``."""
    return _json(status, {"success": False, "error": {"code": code, "message": message}}, headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405, ...) with the contract's JSON error body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
            exc.status, "BAD_REQUEST"
        )
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, headers)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """
    ``Expect: 100-continue`` as aiohttp does it; any other expectation is 417 with the
    JSON error body. (aiohttp's default handler echoes the header into its 417 text and
    answers 500 when that holds a byte that is not UTF-8; it runs before middlewares.)
    """
    if request.version != aiohttp.HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response
        return None
    return error_response(417, "EXPECTATION_FAILED", "only Expect: 100-continue is supported")


async def _not_found(_: web.Request) -> web.StreamResponse:
    return error_response(404, "NOT_FOUND", "Not Found")


async def _post_only(_: web.Request) -> web.StreamResponse:
    return error_response(405, "METHOD_NOT_ALLOWED", "Method Not Allowed", {"Allow": "POST"})


class _BodyTooLarge(Exception):
    pass


def _expire(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        transport.close()


class WebhookApp:
    """The public aiohttp application; one instance per service."""

    def __init__(
        self,
        *,
        http: HttpConfig,
        sources: tuple[WebhookSourceConfig, ...],
        journal: Journal,
        metrics: Metrics,
    ) -> None:
        self._http = http
        self._journal = journal
        self._metrics = metrics
        self.accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received: dict[str, list[float]] = {s.name: [0, 0.0] for s in sources}
        self.app = web.Application(
            client_max_size=http.max_body, middlewares=[_json_errors], handler_args={}
        )
        for source in sources:
            provider = load_provider(source.provider)
            assert isinstance(provider, WebhookProvider)  # checked when the config loaded
            self.app.router.add_post(
                source.path, self._endpoint(source, provider), expect_handler=expect_continue
            )
            self.app.router.add_route("*", source.path, _post_only, expect_handler=expect_continue)
        # Every other request too gets a route of ours rather than aiohttp's system route
        # for 404/405, whose Expect handling cannot be replaced (see expect_continue).
        self.app.router.add_route("*", "/{tail:.*}", _not_found, expect_handler=expect_continue)

    def _endpoint(self, source: WebhookSourceConfig, provider: WebhookProvider) -> Handler:
        verifier = Verifier(source.signature)
        retry_after = str(self._http.retry_after)
        name = source.name
        rejected = self._metrics.webhook_rejected
        quarantined = self._metrics.events_quarantined

        async def receive(request: web.Request) -> web.StreamResponse:
            if not self.accepting:
                rejected.labels(name, "shutting_down").inc()
                return error_response(
                    503, "UNAVAILABLE", "shutting down; retry later", {"Retry-After": retry_after}
                )
            try:
                body = await self._read_body(request)
            except _BodyTooLarge:
                rejected.labels(name, "too_large").inc()
                return error_response(
                    413, "PAYLOAD_TOO_LARGE", f"body over {self._http.max_body} bytes"
                )
            except TimeoutError:
                rejected.labels(name, "read_timeout").inc()
                return error_response(408, "REQUEST_TIMEOUT", "body not received in time")
            except web.RequestPayloadError:
                # aiohttp could not decode the body (a Content-Encoding it does not
                # match, broken chunking): the client's fault, not a 500.
                rejected.labels(name, "bad_body").inc()
                return error_response(400, "BAD_REQUEST", "the body could not be decoded")
            now = time.time()
            try:
                verifier.verify(request.headers, body, now=now)
            except SignatureError as exc:
                rejected.labels(name, exc.code.lower()).inc()
                return error_response(401, exc.code, "signature verification failed")
            if (reason := self._journal.over_limit()) is not None:
                rejected.labels(name, "journal_full").inc()
                return error_response(
                    503,
                    "UNAVAILABLE",
                    f"journal over its limit ({reason}); retry later",
                    {"Retry-After": retry_after},
                )
            result = provider.parse(
                body, environment=source.environment, unknown_types=source.unknown_types
            )
            entry: Entry
            if isinstance(result, Event):
                entry = event_entry(
                    source=name, provider=provider.name, event=result, received_at=now
                )
            else:
                entry = quarantine_entry(source=name, payload=body, verdict=result, received_at=now)
            try:
                (new,) = await self._journal.append([entry])
            except JournalFull as exc:
                rejected.labels(name, "journal_full").inc()
                return error_response(
                    503, "UNAVAILABLE", str(exc), {"Retry-After": str(exc.retry_after)}
                )
            except JournalError as exc:
                rejected.labels(name, "journal_error").inc()
                # No traceback: on a full disk every request fails alike, and a traceback
                # each would flood the logs (often on that same disk).
                log.warning("journal_append_failed", source=name, error=str(exc))
                return error_response(
                    503,
                    "UNAVAILABLE",
                    "journal unavailable; retry later",
                    {"Retry-After": retry_after},
                )
            data: dict[str, Any] = {"id": entry.event_id, "duplicate": not new}
            if entry.kind == "quarantine":
                data["quarantined"] = True
                data["reason"] = entry.reason
                if new:
                    quarantined.labels(name, entry.reason).inc()
                    log.info(
                        "webhook_quarantined",
                        source=name,
                        reason=entry.reason,
                        detail=entry.detail,
                        id=entry.event_id,
                    )
            elif new:
                self._metrics.received(name, entry.routing_key).inc()
                counts = self._received[name]
                counts[0] += 1
                counts[1] = now
            else:
                self._metrics.events_duplicate.labels(name).inc()
            return _json(200, {"success": True, "data": data})

        return receive

    def stats(self, source: str) -> tuple[int, float | None]:
        """Events received by ``source`` and the Unix time of the last one."""
        count, last = self._received.get(source, [0, 0.0])
        return int(count), last or None

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._http.max_body
        if request.content_length is not None and request.content_length > limit:
            raise _BodyTooLarge
        # A slow drip is cut by closing the connection when read_timeout passes: one
        # timer handle per request, cheaper on this hot path than asyncio.timeout().
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        transport = request.transport
        expiry = loop.call_later(self._http.read_timeout, _expire, transport)
        body = bytearray()
        try:
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise _BodyTooLarge
        except (ConnectionError, aiohttp.ClientError) as exc:
            if transport is None or transport.is_closing():
                raise TimeoutError from exc
            raise
        finally:
            expiry.cancel()
        return bytes(body)
