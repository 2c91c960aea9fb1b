"""
The webhook transport: one route per webhook source on the public port (CONTRACT §5).

Per request, in this order: shutting down → 503; body over ``http.max_body`` → 413
(from ``Content-Length`` before reading, and while reading for chunked bodies);
signature → 401; journal over its limit → 503 + ``Retry-After``; the provider's
``parse``; the intake step; append to the journal (durable) → 200. The 200 is sent
only after the journal commit.

``Content-Type`` is not checked: the signature covers the raw bytes, and they are
parsed as JSON whatever the header says (a forged body fails the signature first; a
signed body that is not JSON is quarantined), so a provider that labels its JSON
``text/plain`` loses nothing. The body is never read as a form, and a compressed body
(``Content-Encoding``) counts against ``max_body`` as it inflates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from handlers import WebhookProvider
from listener.config import WebhookSourceConfig
from listener.envelope import rfc3339
from listener.exceptions import JournalError, JournalFull, SignatureError, TimestampOutOfRange
from listener.metrics import Metrics
from listener.sources.intake import Intake
from listener.sources.registry import TransportContext
from listener.sources.signatures import Verifier
from listener.web import (
    Handler,
    Held,
    PublicRoutes,
    Reply,
    error_reply,
    error_response,
    ok_reply,
    reply_response,
    send_continue,
)

__all__ = ["WebhookTransport"]

log = structlog.get_logger("listener.webhooks")


class _BodyTooLarge(Exception):
    pass


def _expire(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        transport.close()


class _Endpoint:
    """One webhook source: its verifier, provider, intake and counters."""

    def __init__(
        self,
        source: WebhookSourceConfig,
        provider: WebhookProvider,
        transport: WebhookTransport,
        metrics: Metrics,
    ) -> None:
        self.source = source
        self.name = source.name
        self.provider = provider
        self.verifier = Verifier(source.signature)
        self.intake = Intake(
            source=source.name,
            provider=provider.name,
            metrics=metrics,
            known_types=tuple(provider.data_models),
        )
        self._transport = transport
        self._rejected = metrics.webhook_rejected
        self._skew_said_at = -60.0  # (monotonic) the last skew warning

    def state(self, accepting: bool) -> dict[str, Any]:
        last = self.intake.last_event_at
        return {
            "kind": "webhook",
            "status": "listening" if accepting else "stopped",
            "path": self.source.path,
            "events_received": self.intake.events_received,
            "last_event_at": rfc3339(datetime.fromtimestamp(last, UTC)) if last else None,
        }

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def max_body(self) -> int:
        return self._transport.http.max_body

    @property
    def read_timeout(self) -> float:
        return self._transport.http.read_timeout

    def _unavailable(self, reason: str, message: str, retry_after: str) -> Reply:
        self._rejected.labels(self.name, reason).inc()
        return error_reply(503, "UNAVAILABLE", message, {"Retry-After": retry_after})

    def timed_out(self) -> None:
        """A body not all received within ``read_timeout`` (the fast path closed it)."""
        self._rejected.labels(self.name, "read_timeout").inc()

    async def receive(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's path: read the body within the limits, then :meth:`accept`."""
        transport = self._transport
        if not transport.accepting:
            return reply_response(self._shutting_down())
        try:
            body = await transport.read_body(request)
        except _BodyTooLarge:
            self._rejected.labels(self.name, "too_large").inc()
            return error_response(
                413, "PAYLOAD_TOO_LARGE", f"body over {transport.http.max_body} bytes"
            )
        except TimeoutError:
            self.timed_out()
            return error_response(408, "REQUEST_TIMEOUT", "body not received in time")
        except web.RequestPayloadError:
            # aiohttp could not decode the body (a Content-Encoding it does not match,
            # broken chunking): the client's fault, not a 500.
            self._rejected.labels(self.name, "bad_body").inc()
            return error_response(400, "BAD_REQUEST", "the body could not be decoded")
        answering = transport.held.answering
        answering.add(request.transport)  # (not to be closed to make room meanwhile)
        try:
            return reply_response(await self.accept(request.headers, body))
        finally:
            answering.discard(request.transport)

    def _skewed(self, exc: TimestampOutOfRange) -> None:
        """
        An authentic request out of the tolerance (the signature is checked first): once a
        minute, how far off it was, so an operator sees when it is every sender (our
        clock) and not one.
        """
        if (now := time.monotonic()) - self._skew_said_at >= 60.0:
            self._skew_said_at = now
            log.warning("webhook_timestamp_out_of_range", source=self.name, detail=str(exc))

    def _shutting_down(self) -> Reply:
        retry_after = str(self._transport.http.retry_after)
        return self._unavailable("shutting_down", "shutting down; retry later", retry_after)

    async def accept(self, headers: Mapping[str, str], body: bytes) -> Reply:
        """A request whose body has all come: verify, parse, journal, answer."""
        transport = self._transport
        transport.in_flight += 1
        try:
            return await self._accept(headers, body)
        finally:
            transport.in_flight -= 1

    async def _accept(self, headers: Mapping[str, str], body: bytes) -> Reply:
        transport = self._transport
        if not transport.accepting:  # stopped while the body came: the drain is not waiting
            return self._shutting_down()
        now = time.time()
        try:
            self.verifier.verify(headers, body, now=now)
        except SignatureError as exc:
            self._rejected.labels(self.name, exc.code.lower()).inc()
            if isinstance(exc, TimestampOutOfRange):
                self._skewed(exc)
            return error_reply(401, exc.code, "signature verification failed")
        journal = transport.journal
        if (reason := journal.over_limit()) == "journal_error":  # (a disk error, not a limit)
            return self._unavailable(
                "journal_error", "journal unavailable; retry later", str(transport.http.retry_after)
            )
        if reason is not None:
            return self._unavailable(
                "journal_full",
                f"journal over its limit ({reason}); retry later",
                str(transport.http.retry_after),
            )
        result = self.provider.parse(body, self.source.settings, headers)
        entry = self.intake.build(result, raw=body, received_at=now)
        try:
            (new,) = await journal.append([entry])
        except JournalFull as exc:
            return self._unavailable("journal_full", str(exc), str(exc.retry_after))
        except JournalError as exc:
            # No traceback: on a full disk every request fails alike, and a traceback
            # each would flood the logs (often on that same disk).
            log.warning("journal_append_failed", source=self.name, error=str(exc))
            return self._unavailable(
                "journal_error", "journal unavailable; retry later", str(transport.http.retry_after)
            )
        self.intake.record(entry, new=new)
        data: dict[str, Any] = {"id": entry.event_id, "duplicate": not new}
        if entry.kind == "quarantine":
            data["quarantined"] = True
            data["reason"] = entry.reason
        return ok_reply(data)


class WebhookTransport:
    """Every webhook source of the service, mounted on the public application."""

    kind = "webhook"

    def __init__(
        self,
        sources: Sequence[tuple[WebhookSourceConfig, WebhookProvider]],
        *,
        context: TransportContext,
    ) -> None:
        self.http = context.http
        self.journal = context.journal
        metrics = context.metrics
        self.accepting = True
        #: Requests between their body and their answer (the soak tells them from leaks).
        self.in_flight = 0
        #: The public port's budget of unfinished requests (the routes', once mounted).
        self.held = Held()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._endpoints = [_Endpoint(s, p, self, metrics) for s, p in sources]
        for endpoint in self._endpoints:
            metrics.source_connected.labels(endpoint.name).set(1)
        self.runtimes: tuple[()] = ()

    def mount(self, routes: PublicRoutes) -> None:
        """Add one POST route per source (its other methods are 405)."""
        self.held = routes.held
        for endpoint in self._endpoints:
            routes.add_post(endpoint.source.path, endpoint.receive, fast=endpoint)

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """Each source's state, by name."""
        return {e.name: e.state(self.accepting) for e in self._endpoints}

    def stop_intake(self) -> None:
        """Shutdown step 1: answer 503 from now on."""
        self.accepting = False

    def use_secrets(self, sources: Mapping[str, Any]) -> None:
        """New signing secrets: each request verifies with the verifier it started with."""
        for endpoint in self._endpoints:
            if (source := sources.get(endpoint.name)) is not None:
                endpoint.verifier = Verifier(source.signature)
                endpoint.source = source

    def handler(self, name: str) -> Handler:
        """The route handler of source ``name`` (tests, benchmarks)."""
        return next(e.receive for e in self._endpoints if e.name == name)

    async def read_body(self, request: web.BaseRequest) -> bytes:
        """The body, within ``max_body`` and ``read_timeout`` (a slow drip is cut)."""
        limit = self.http.max_body
        if request.content_length is not None and request.content_length > limit:
            raise _BodyTooLarge
        await send_continue(request)  # (only now: not before a 404, a 413 or a 503)
        content = request.content
        if content.is_eof():
            # The whole body came with the headers (the common case): nothing to wait for.
            whole = content.read_nowait(-1)
            if len(whole) > limit:
                raise _BodyTooLarge
            return whole
        # A slow drip is cut by closing the connection when read_timeout passes: one
        # timer handle per request, cheaper on this hot path than asyncio.timeout().
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        transport = request.transport
        expiry = loop.call_later(self.http.read_timeout, _expire, transport)
        body, held = bytearray(), self.held
        try:
            while chunk := await content.readany():
                body += chunk
                if len(body) > limit:
                    raise _BodyTooLarge
                held.set(transport, len(body))  # (over the port's budget: the biggest closes)
        except (ConnectionError, aiohttp.ClientError) as exc:
            if transport is None or transport.is_closing():
                raise TimeoutError from exc
            raise
        finally:
            expiry.cancel()
            held.set(transport, 0)
        return bytes(body)
