"""
The stream runtime: one authenticated WebSocket per stream source (CONTRACT §6).

Built on websockets' own reconnect loop (``async for ws in connect(...)``); this
module decides what a close means and how long to wait before the next connection:

* 4001 → ``unauthorized``, backoff growing to ``reconnect.max`` (never a hot loop);
* 4003 → ``forbidden``, the same;
* 4029 → wait the ``retry_after`` of the preceding error frame, when given;
* anything else → exponential backoff with jitter, reset after ``healthy_after``.

Gapless resume: every subscription resubscribes with ``since_seq`` = the last seq
*journaled* for it. The cursor is written in the same transaction as its event, so
it advances only once the event is on disk, and survives restarts. Appends are
pipelined (up to ``journal_window`` in flight) so one fsync covers many frames;
before every reconnect they are settled and the cursors re-read from the journal.

Backpressure: when the journal is over its limit the socket is not read (websockets'
bounded ``max_queue`` pushes back to TCP); if the server drops us meanwhile, the
next connection resumes with ``since_seq``. There is no unbounded queue here.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from handlers import Event, Quarantine, StreamProvider, load_provider
from handlers.frames import (
    AuthOk,
    ErrorFrame,
    EventFrame,
    Ping,
    Subscribed,
    Unparseable,
    Unsubscribed,
)
from listener.config import StreamSourceConfig, SubscriptionConfig
from listener.envelope import Entry, event_entry, quarantine_entry, rfc3339
from listener.exceptions import JournalError
from listener.journal import Cursor, Journal
from listener.metrics import Metrics
from listener.retry import backoff

__all__ = ["StreamSource", "close_policy"]

log = structlog.get_logger("listener.streams")

CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4029
CLOSE_TOO_BIG = 1009

SourceStatus = Literal[
    "starting", "connected", "reconnecting", "unauthorized", "forbidden", "stopped"
]
SubState = Literal["pending", "active", "forbidden", "invalid_params"]


@dataclass(slots=True)
class _Subscription:
    config: SubscriptionConfig
    key: str
    request_id: str
    state: SubState = "pending"
    server_id: str | None = None
    last_seq: int | None = None
    last_event_at: float | None = None
    # Monotonic clock of the last event (or of the subscribe ack), for staleness.
    last_heard: float = 0.0
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "channel": self.config.channel,
            "params": dict(self.config.params),
            "state": self.state,
            "last_seq": self.last_seq,
            "last_event_at": _iso(self.last_event_at),
            **({"error": self.error} if self.error else {}),
        }


@dataclass(slots=True)
class _Outcome:
    """How a connection ended, for :func:`close_policy`."""

    code: int | None = None
    reason: str = ""
    retry_after: float | None = None
    unauthorized: bool = False
    lasted: float = 0.0
    stale: bool = False


@dataclass(slots=True)
class _Delays:
    """The backoff generators, kept between connections and reset when healthy."""

    initial: float
    maximum: float
    general: Iterator[float] = field(init=False)
    auth: Iterator[float] = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.general = backoff(self.initial, self.maximum)
        self.auth = backoff(max(self.initial, 1.0), self.maximum)


def close_policy(
    outcome: _Outcome, delays: _Delays, *, healthy_after: float
) -> tuple[SourceStatus, float]:
    """
    Decide the source's state and the wait before reconnecting (pure; CONTRACT §6).

    Returns:
        The status to show while waiting, and the delay in seconds.
    """
    if outcome.unauthorized or outcome.code == CLOSE_UNAUTHORIZED:
        return "unauthorized", next(delays.auth)
    if outcome.code == CLOSE_FORBIDDEN:
        return "forbidden", next(delays.auth)
    delays.auth = backoff(max(delays.initial, 1.0), delays.maximum)
    if outcome.lasted >= healthy_after:
        delays.general = backoff(delays.initial, delays.maximum)
    if outcome.code == CLOSE_RATE_LIMITED and outcome.retry_after is not None:
        return "reconnecting", max(outcome.retry_after, next(delays.general))
    return "reconnecting", next(delays.general)


def _iso(moment: float | None) -> str | None:
    return rfc3339(datetime.fromtimestamp(moment, UTC)) if moment is not None else None


class _Stale(Exception):
    """Nothing arrived for ``stale_after`` (or one subscription went silent)."""


class _Unauthorized(Exception):
    """The server refused the API key."""


class StreamSource:
    """Holds one stream source's connection, forever; see the module docstring."""

    def __init__(self, *, config: StreamSourceConfig, journal: Journal, metrics: Metrics) -> None:
        self.name = config.name
        self._config = config
        self._journal = journal
        self._metrics = metrics
        provider = load_provider(config.provider)
        assert isinstance(provider, StreamProvider)  # checked when the config loaded
        self._provider = provider
        self._subs = [
            _Subscription(
                config=sub,
                key=provider.subscription_key(sub.channel, sub.params),
                request_id=f"sub-{i}",
            )
            for i, sub in enumerate(config.subscriptions)
        ]
        self._by_request = {s.request_id: s for s in self._subs}
        self._by_server: dict[str, _Subscription] = {}
        self.status: SourceStatus = "starting"
        self.events_received = 0
        self.last_event_at: float | None = None
        self.connections = 0
        self._in_flight: collections.deque[asyncio.Future[list[bool]]] = collections.deque()
        self._last_error: str | None = None

    # -- state ------------------------------------------------------------------------

    def state(self) -> Mapping[str, Any]:
        """For ``/readyz`` and ``/v1/sources``."""
        return {
            "kind": "websocket",
            "status": self.status,
            "events_received": self.events_received,
            "last_event_at": _iso(self.last_event_at),
            "subscriptions": [s.view() for s in self._subs],
            **({"last_error": self._last_error} if self._last_error else {}),
        }

    def _set_status(self, status: SourceStatus) -> None:
        if status != self.status:
            log.info("stream_state", source=self.name, state=status)
        self.status = status
        self._metrics.source_connected.labels(self.name).set(1 if status == "connected" else 0)

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and journal events until cancelled."""
        cfg = self._config
        delays = _Delays(cfg.reconnect.initial, cfg.reconnect.max)
        try:
            await self._load_cursors()
            async for ws in connect(
                cfg.url,
                open_timeout=cfg.open_timeout,
                ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_timeout,
                close_timeout=2,
                max_size=cfg.max_size,
                # Compression halves throughput on small frames and a compressed frame can
                # inflate far past max_size's intent (NOTES: websockets traps).
                compression=None,
                process_exception=self._process_exception,
                reconnect_delays=lambda: backoff(cfg.reconnect.initial, cfg.reconnect.max),
            ):
                self.connections += 1
                if self.connections > 1:
                    self._metrics.source_reconnects.labels(self.name).inc()
                outcome = await self._connection(ws)
                await self._settle()
                await self._load_cursors()
                status, delay = close_policy(
                    outcome, delays, healthy_after=cfg.reconnect.healthy_after
                )
                self._set_status(status)
                log.warning(
                    "stream_disconnected",
                    source=self.name,
                    code=outcome.code,
                    reason=outcome.reason[:200],
                    stale=outcome.stale,
                    lasted=round(outcome.lasted, 3),
                    reconnect_in=round(delay, 3),
                )
                await asyncio.sleep(delay)
        finally:
            self._set_status("stopped")

    def _process_exception(self, exc: Exception) -> Exception | None:
        # Decide retry-or-fatal for a failed connection attempt (websockets' hook): the
        # network, handshake and HTTP status errors are all retried with backoff; a 401
        # or 403 at the HTTP level also marks the source unauthorized.
        self._last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
            self._set_status("unauthorized")
        else:
            self._set_status("reconnecting")
        if isinstance(exc, OSError | TimeoutError | InvalidHandshake | ConnectionClosed):
            return None
        return exc

    async def _load_cursors(self) -> None:
        stored = await self._journal.cursors(self.name)
        for sub in self._subs:
            sub.last_seq = stored.get(sub.key)

    async def _settle(self) -> None:
        """Wait for every in-flight append; a failed one only means its cursor did not move."""
        while self._in_flight:
            future = self._in_flight.popleft()
            try:
                await future
            except JournalError as exc:
                self._last_error = str(exc)

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, ws: ClientConnection) -> _Outcome:
        started = time.monotonic()
        outcome = _Outcome()
        try:
            await self._handshake(ws)
            self._set_status("connected")
            self._last_error = None
            await self._receive(ws, outcome)
        except _Unauthorized:
            outcome.unauthorized = True
            self._set_status("unauthorized")
            await ws.close()
        except _Stale as exc:
            outcome.stale = True
            outcome.reason = str(exc)
            await ws.close(1000, "stale")
        except ConnectionClosed as exc:
            received = exc.rcvd
            outcome.code = received.code if received else None
            outcome.reason = received.reason if received else str(exc)
            sent = exc.sent
            if sent is not None and sent.code == CLOSE_TOO_BIG:
                outcome.code = CLOSE_TOO_BIG
                self._quarantine_oversize()
        except JournalError as exc:
            outcome.reason = f"journal: {exc}"
            await ws.close(1000, "journal full")
        except asyncio.CancelledError:
            await self._goodbye(ws)
            raise
        finally:
            outcome.lasted = time.monotonic() - started
            for sub in self._subs:
                if sub.state == "active":
                    sub.state = "pending"
            self._by_server.clear()
        if outcome.code is None and ws.close_code is not None:
            outcome.code = ws.close_code
        return outcome

    async def _handshake(self, ws: ClientConnection) -> None:
        await ws.send(self._provider.auth_frame(self._config.api_key.get_secret_value()))
        async with asyncio.timeout(self._config.open_timeout):
            while True:
                frame = self._provider.parse_frame(await ws.recv())
                if isinstance(frame, AuthOk):
                    break
                if isinstance(frame, ErrorFrame) and frame.code == "UNAUTHORIZED":
                    self._last_error = f"UNAUTHORIZED: {frame.message[:200]}"
                    raise _Unauthorized
                if isinstance(frame, Ping):
                    await ws.send(self._provider.pong_frame(frame.ts))
        for sub in self._subs:
            if sub.state in ("forbidden", "invalid_params"):
                continue
            sub.state = "pending"
            await ws.send(
                self._provider.subscribe_frame(
                    sub.request_id, sub.config.channel, sub.config.params, sub.last_seq
                )
            )

    async def _receive(self, ws: ClientConnection, outcome: _Outcome) -> None:
        stale_after = self._config.stale_after
        sub_stale = self._config.subscription_stale_after
        window = self._config.journal_window
        journal = self._journal
        while True:
            if journal.over_limit() is not None:
                # Backpressure: stop reading; TCP pushes back on the server (CONTRACT §8).
                await self._settle()
                await journal.wait_for_capacity()
            deadline = stale_after
            if sub_stale is not None:
                deadline = min(deadline, self._subscription_deadline(sub_stale))
            try:
                async with asyncio.timeout(max(deadline, 0.0)):
                    raw = await ws.recv()
            except TimeoutError:
                if deadline < stale_after:
                    raise _Stale("a subscription went silent") from None
                raise _Stale(f"nothing received for {stale_after}s") from None
            frame = self._provider.parse_frame(raw)
            if isinstance(frame, EventFrame):
                self._on_event(frame, raw)
                if len(self._in_flight) >= window:
                    await self._settle_some(window // 2)
            elif isinstance(frame, Ping):
                await ws.send(self._provider.pong_frame(frame.ts))
            elif isinstance(frame, Subscribed):
                self._on_subscribed(frame)
            elif isinstance(frame, ErrorFrame):
                self._on_error(frame, outcome)
            elif isinstance(frame, Unsubscribed):
                sub = self._by_server.pop(frame.subscription, None)
                if sub is not None:
                    sub.state = "pending"
            elif isinstance(frame, Unparseable):
                self._keep_quarantined(raw, frame.verdict)
            # AuthOk again: harmless, ignored.

    def _subscription_deadline(self, limit: float) -> float:
        now = time.monotonic()
        waits = [s.last_heard + limit - now for s in self._subs if s.state == "active"]
        return min(waits, default=limit)

    async def _settle_some(self, count: int) -> None:
        for _ in range(min(count, len(self._in_flight))):
            future = self._in_flight.popleft()
            await future  # a JournalError ends the connection; cursors reload after

    def _on_event(self, frame: EventFrame, raw: str | bytes) -> None:
        sub = self._by_server.get(frame.subscription)
        if sub is None:
            self._keep_quarantined(
                raw,
                Quarantine("unknown_subscription", f"no subscription {frame.subscription[:64]!r}"),
            )
            return
        last = sub.last_seq
        if last is not None:
            if frame.seq <= last:
                return  # already journaled (a resend after since_seq)
            if frame.seq > last + 1:
                missing = frame.seq - last - 1
                self._metrics.stream_gaps.labels(self.name, sub.key).inc(missing)
                log.warning(
                    "stream_gap",
                    source=self.name,
                    subscription=sub.key,
                    first_missing=last + 1,
                    last_missing=frame.seq - 1,
                    missing=missing,
                )
        now = time.time()
        result = frame.result
        entry: Entry
        if isinstance(result, Event):
            entry = event_entry(
                source=self.name, provider=self._provider.name, event=result, received_at=now
            )
            self._metrics.received(self.name, entry.routing_key).inc()
        else:
            entry = self._quarantine_entry(raw, result, now)
        sub.last_seq = frame.seq
        sub.last_event_at = now
        sub.last_heard = time.monotonic()
        self.events_received += 1
        self.last_event_at = now
        self._in_flight.append(
            self._journal.submit([entry], cursors=[Cursor(self.name, sub.key, frame.seq)])
        )

    def _quarantine_entry(self, raw: str | bytes, verdict: Quarantine, now: float) -> Entry:
        payload = raw.encode() if isinstance(raw, str) else raw
        self._metrics.events_quarantined.labels(self.name, verdict.reason).inc()
        log.info(
            "stream_quarantined", source=self.name, reason=verdict.reason, detail=verdict.detail
        )
        return quarantine_entry(source=self.name, payload=payload, verdict=verdict, received_at=now)

    def _keep_quarantined(self, raw: str | bytes, verdict: Quarantine) -> None:
        entry = self._quarantine_entry(raw, verdict, time.time())
        self._in_flight.append(self._journal.submit([entry]))

    def _quarantine_oversize(self) -> None:
        # The frame itself never reached us (websockets refuses it past max_size and
        # closes 1009): keep a record of the loss of that frame; since_seq recovers
        # nothing for it, so operators must see it.
        now = time.time()
        detail = f"a frame over max_size ({self._config.max_size} bytes) was refused"
        payload = (
            f'{{"error": "frame_too_large", "max_size": {self._config.max_size}, "at": {now}}}'
        )
        entry = self._quarantine_entry(payload, Quarantine("frame_too_large", detail), now)
        try:
            self._in_flight.append(self._journal.submit([entry]))
        except JournalError as exc:
            log.warning("stream_quarantine_failed", source=self.name, error=str(exc))

    def _on_subscribed(self, frame: Subscribed) -> None:
        sub = self._by_request.get(frame.id)
        if sub is None:
            return
        sub.state = "active"
        sub.server_id = frame.subscription
        sub.last_heard = time.monotonic()
        sub.error = None
        self._by_server[frame.subscription] = sub
        self._metrics.subscription_failed.labels(self.name, sub.key).set(0)
        log.info(
            "stream_subscribed", source=self.name, subscription=sub.key, since_seq=sub.last_seq
        )

    def _on_error(self, frame: ErrorFrame, outcome: _Outcome) -> None:
        if frame.retry_after is not None:
            outcome.retry_after = frame.retry_after
        sub = self._by_request.get(frame.id) if frame.id else None
        if sub is None:
            if frame.code == "UNAUTHORIZED":
                outcome.unauthorized = True
            self._last_error = f"{frame.code}: {frame.message[:200]}"
            log.warning(
                "stream_error", source=self.name, code=frame.code, message=frame.message[:200]
            )
            return
        if frame.code in ("FORBIDDEN", "INVALID_PARAMS"):
            sub.state = "forbidden" if frame.code == "FORBIDDEN" else "invalid_params"
            sub.error = frame.message[:200]
            self._metrics.subscription_failed.labels(self.name, sub.key).set(1)
            log.warning(
                "stream_subscription_failed",
                source=self.name,
                subscription=sub.key,
                code=frame.code,
                message=frame.message[:200],
            )

    async def _goodbye(self, ws: ClientConnection) -> None:
        """On shutdown: unsubscribe and close, briefly (CONTRACT §8)."""
        try:
            async with asyncio.timeout(2):
                for sub in self._subs:
                    if sub.state == "active" and sub.server_id:
                        await ws.send(
                            self._provider.unsubscribe_frame(sub.request_id, sub.server_id)
                        )
                await ws.close(1001, "listener shutting down")
        except (TimeoutError, ConnectionClosed, OSError):
            pass
