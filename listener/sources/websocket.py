"""
The websocket transport: one authenticated WebSocket per stream source (CONTRACT §6).

Built on websockets' own reconnect loop (``async for ws in connect(...)``); what a
close means and how long to wait before the next connection is
:mod:`listener.sources.websocket_policy`, fed by what the provider says its codes mean.

Gapless resume: every subscription resubscribes with ``since_seq`` = the last seq
*on disk* for it. The cursor is written in the same transaction as its event, as a
compare-and-set on the previous position, so it advances only once the event is
durable and never past one whose append failed; an append that fails ends the
connection at once, and the cursors are re-read from the journal before the next.
Appends are pipelined (``journal_window`` in flight) so one fsync covers many frames.

A frame over ``max_size`` closes the connection (1009): a record of it is
quarantined, and the next connections take frames up to 4, 16, ... times the limit
(at most 64) until one is taken, so a retained event the server sends first after
every reconnect is received once, quarantined with its head as ``frame_too_large``,
and passed; the limit is then ``max_size`` again. Nothing kept is over ``max_size``.

Backpressure: over the journal's limit the socket is not read (websockets' bounded
``max_queue`` pushes back to TCP); a drop meanwhile resumes with ``since_seq``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from handlers import Quarantine, StreamProvider
from handlers.frames import (
    AuthOk,
    ErrorFrame,
    EventFrame,
    Ping,
    ServerFrame,
    Subscribed,
    Unparseable,
    Unsubscribed,
)
from listener.config import StreamSourceConfig
from listener.exceptions import JournalError
from listener.journal import Journal
from listener.logs import redact
from listener.metrics import Metrics
from listener.retry import backoff
from listener.sources.appends import Appends
from listener.sources.intake import Intake
from listener.sources.registry import RuntimeTransport, TransportContext
from listener.sources.subscriptions import Subscriptions
from listener.sources.websocket_connect import SameOriginConnect
from listener.sources.websocket_policy import (
    Delays,
    Outcome,
    SourceStatus,
    close_policy,
    iso,
)

__all__ = ["StreamSource", "StreamTransport"]

log = structlog.get_logger("listener.streams")

# RFC 6455 §7.4.1: "message too big".
CLOSE_TOO_BIG = 1009
# After a frame over max_size, the next connections take frames up to this many times
# max_size (growing by 4 each time it happens again), to receive the frame and
# quarantine it instead of being sent it first on every reconnect, forever.
OVERSIZE_GROWTH = 4
OVERSIZE_CAP_FACTOR = 64


class _Stale(Exception):
    """Nothing arrived for ``stale_after`` (or one subscription went silent)."""


class _Unauthorized(Exception):
    """The server refused the API key."""


class StreamSource:
    """Holds one stream source's connection, forever; see the module docstring."""

    def __init__(
        self,
        *,
        config: StreamSourceConfig,
        provider: StreamProvider,
        journal: Journal,
        metrics: Metrics,
    ) -> None:
        self.name = config.name
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._provider = provider
        self._subs = Subscriptions(config.name, config.subscriptions, provider, metrics)
        self.status: SourceStatus = "starting"
        self.connections = 0
        self._intake = Intake(
            source=config.name,
            provider=provider.name,
            metrics=metrics,
            known_types=tuple(provider.data_models),
        )
        self._appends = Appends(source=config.name, journal=journal, intake=self._intake)
        self._last_error: str | None = None
        self._max_size = config.max_size  # frames taken up to (raised after a 1009)

    @property
    def unit_key(self) -> str | None:
        """A source of one subscription is a cluster unit with that cursor."""
        subs = self._subs.all
        return subs[0].key if len(subs) == 1 else None

    @property
    def events_received(self) -> int:
        """Events journaled (new, not duplicates) since the source started."""
        return self._intake.events_received

    @property
    def last_event_at(self) -> float | None:
        """Unix time of the last event journaled."""
        return self._intake.last_event_at

    # -- state ------------------------------------------------------------------------

    def state(self) -> Mapping[str, Any]:
        """For ``/readyz`` and ``/v1/sources``."""
        error = self._last_error or self._subs.last_error
        return {
            "kind": "websocket",
            "status": self.status,
            "events_received": self.events_received,
            "last_event_at": iso(self.last_event_at),
            "subscriptions": [s.view() for s in self._subs],
            **({"last_error": error} if error else {}),
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
        delays = Delays(cfg.reconnect.initial, cfg.reconnect.max)
        try:
            await self._load_cursors()
            while True:
                size = self._max_size
                async for ws in SameOriginConnect(
                    cfg.url,
                    open_timeout=cfg.open_timeout,
                    ping_interval=cfg.ping_interval,
                    ping_timeout=cfg.ping_timeout,
                    close_timeout=2,
                    max_size=size,
                    # No compression (NOTES: halves small-frame throughput, inflates past max_size).
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
                        outcome,
                        delays,
                        healthy_after=cfg.reconnect.healthy_after,
                        kind=self._provider.close_kind(outcome.code),
                    )
                    if outcome.code == CLOSE_TOO_BIG:
                        self._grow_max_size()
                    elif outcome.lasted >= cfg.reconnect.healthy_after:
                        self._max_size = cfg.max_size
                    self._set_status(status)
                    log.warning(
                        "stream_disconnected",
                        source=self.name,
                        code=outcome.code,
                        reason=redact(outcome.reason)[:200],
                        stale=outcome.stale,
                        lasted=round(outcome.lasted, 3),
                        reconnect_in=round(delay, 3),
                    )
                    await asyncio.sleep(delay)
                    if self._max_size != size:
                        break  # connect again with the new frame size limit
        finally:
            self._set_status("stopped")
            self._subs.stopped()  # (a unit that moved away: its refusals are not ours now)

    def use_config(self, config: StreamSourceConfig) -> None:
        """SIGHUP: the same source with new secrets, used from the next connect on."""
        # (a cluster unit keeps its one subscription)
        self._config = config.model_copy(update={"subscriptions": self._config.subscriptions})

    def _grow_max_size(self) -> None:
        # Whatever comes next, a frame was refused: keep a record of it for operators (the
        # frame never reached us; a retained event comes again after since_seq).
        self._appends.refused(self._max_size, self._config.max_size)
        cap = self._config.max_size * OVERSIZE_CAP_FACTOR
        grown = min(self._max_size * OVERSIZE_GROWTH, cap)
        if grown == self._max_size:
            return  # past the cap: the frame stays refused; the records show it
        log.warning(
            "stream_frame_too_large",
            source=self.name,
            max_size=self._config.max_size,
            receive_up_to=grown,
            note="the next connection takes the frame to quarantine it",
        )
        self._max_size = grown

    def _process_exception(self, exc: Exception) -> Exception | None:
        # websockets' hook for a failed attempt: network, handshake and HTTP status errors
        # are retried with backoff (a 401 or 403 also marks the source unauthorized).
        self._last_error = redact(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
            self._set_status("unauthorized")
        else:
            self._set_status("reconnecting")
        if isinstance(exc, OSError | TimeoutError | InvalidHandshake | ConnectionClosed):
            return None
        return exc

    async def _load_cursors(self) -> None:
        self._subs.load(await self._journal.cursors(self.name))
        self._appends.reset()

    async def _settle(self) -> None:
        """Wait for every in-flight append; a failed one only means its cursor did not move."""
        failed = await self._appends.settle()
        if failed is not None:
            self._last_error = failed

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, ws: ClientConnection) -> Outcome:
        started = time.monotonic()
        outcome = Outcome()
        try:
            await self._handshake(ws, outcome)
            self._set_status("connected")
            self._last_error = self._subs.last_error = None
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
        except JournalError as exc:
            outcome.reason = f"journal: {exc}"
            await ws.close(1000, "journal full")
        except TimeoutError:
            # The server took the upgrade but did not answer auth within open_timeout.
            outcome.reason = f"no answer to auth within {self._config.open_timeout}s"
            await ws.close(1000, "no answer to auth")
        except asyncio.CancelledError:
            await self._goodbye(ws)
            raise
        finally:
            outcome.lasted = time.monotonic() - started
            self._subs.disconnected()
        if outcome.code is None and ws.close_code is not None:
            outcome.code = ws.close_code
        return outcome

    async def _handshake(self, ws: ClientConnection, outcome: Outcome) -> None:
        try:
            await ws.send(self._provider.auth_frame(self._config.api_key.get_secret_value()))
        except ConnectionClosed:
            pass  # closed at once (a rate limit at connect): what it said first is read below
        async with asyncio.timeout(self._config.open_timeout):
            while True:
                raw = await ws.recv()
                frame = self._provider.parse_frame(raw)
                if isinstance(frame, AuthOk):
                    break
                if isinstance(frame, ErrorFrame) and frame.kind == "unauthorized":
                    self._last_error = f"UNAUTHORIZED: {redact(frame.message)[:200]}"
                    raise _Unauthorized
                await self._on_frame(ws, raw, frame, outcome)
        await self._subscribe(ws, connecting=True)

    async def _subscribe(self, ws: ClientConnection, *, connecting: bool) -> None:
        for sub in self._subs.to_subscribe(connecting=connecting):
            frame = self._provider.subscribe_frame(
                sub.request_id, sub.config.channel, sub.config.params, sub.last_seq
            )
            await ws.send(frame)

    async def _receive(self, ws: ClientConnection, outcome: Outcome) -> None:
        stale_after = self._config.stale_after
        sub_stale = self._config.subscription_stale_after
        heard_at, quiet_for = time.monotonic(), f"nothing received for {stale_after}s"
        while True:
            if self._appends.error is not None:
                # An append failed: end this connection now, so nothing after it is
                # taken on a position that is not on disk; the cursors reload.
                raise JournalError(f"an append failed: {self._appends.error}")
            if self._subs.retry_at <= (now := time.monotonic()):  # refused ones, now and then
                await self._subscribe(ws, connecting=False)
            wait, why = self._subs.wait(now, heard_at + stale_after - now, sub_stale, quiet_for)
            try:
                async with asyncio.timeout(wait):
                    raw = await ws.recv()
            except TimeoutError:
                if why is None:
                    continue  # (a subscription to ask for again, above)
                raise _Stale(why) from None
            await self._on_frame(ws, raw, self._provider.parse_frame(raw), outcome)
            heard_at = time.monotonic()  # (after any wait for room: frames waited unread)
            if self._max_size > self._config.max_size and _size(raw) > self._config.max_size:
                # taken on a raised limit: once is enough
                self._max_size = ws.protocol.max_message_size = self._config.max_size

    async def _on_frame(
        self, ws: ClientConnection, raw: str | bytes, frame: ServerFrame, outcome: Outcome
    ) -> None:
        if self._journal.over_limit() is not None:
            # Backpressure: read no more (TCP pushes back, CONTRACT §8). Here, no await
            # before the append: before the read, a journal filled meanwhile refused it.
            await self._subs.unread(self._settle())
            await self._subs.unread(self._journal.wait_for_capacity())
        if isinstance(frame, EventFrame):
            self._on_event(frame, raw)
        elif isinstance(frame, Ping):
            await ws.send(self._provider.pong_frame(frame.ts))
        elif isinstance(frame, Subscribed):
            self._subs.subscribed(frame)
        elif isinstance(frame, ErrorFrame):
            # (before auth_ok too: its retry_after holds the next attempt back, CONTRACT §6)
            self._subs.error(frame, outcome)
        elif isinstance(frame, Unsubscribed):
            self._subs.unsubscribed(frame.subscription)
        elif isinstance(frame, Unparseable):
            self._keep_quarantined(raw, frame.verdict)
        # AuthOk again: harmless, ignored. Quarantined input counts in the window too:
        # a flood of junk frames queued appends without end (2 GB in 45 s).
        if len(self._appends) >= (window := self._config.journal_window):
            await self._subs.unread(self._appends.settle_some(max(window // 2, 1)))

    def _on_event(self, frame: EventFrame, raw: str | bytes) -> None:
        sub = self._subs.find(frame)
        if sub is None:
            self._keep_quarantined(
                raw,
                Quarantine("unknown_subscription", f"no subscription {frame.subscription[:64]!r}"),
            )
            return
        seq = frame.seq if self._subs.fresh(sub, frame.seq) else None  # (None: behind)
        now = time.time()
        payload = raw.encode() if isinstance(raw, str) else raw
        result = frame.result
        if len(payload) > self._config.max_size:
            # Taken by a connection with a raised limit (after a 1009): keep its head
            # and let the cursor move past it.
            result = Quarantine(
                "frame_too_large",
                f"a frame of {len(payload)} bytes, over max_size ({self._config.max_size});"
                " the payload kept is cut to max_size",
            )
            payload = payload[: self._config.max_size]
        sub.last_event_at = now
        sub.last_heard = time.monotonic()
        self._appends.event(sub, seq, result, payload, now)

    def _keep_quarantined(self, raw: str | bytes, verdict: Quarantine) -> None:
        payload = raw.encode() if isinstance(raw, str) else raw
        self._appends.quarantine(payload, verdict, keep=self._config.max_size)

    async def _goodbye(self, ws: ClientConnection) -> None:
        """On shutdown: unsubscribe and close, briefly (CONTRACT §8)."""
        try:
            async with asyncio.timeout(2):
                for request_id, server_id in self._subs.active():
                    await ws.send(self._provider.unsubscribe_frame(request_id, server_id))
                await ws.close(1001, "listener shutting down")
        except (TimeoutError, ConnectionClosed, OSError):
            pass


class StreamTransport(RuntimeTransport):
    """
    Every websocket source of the service: one supervised runtime each. Stopping intake
    is the service cancelling them (each unsubscribes and closes).
    """

    kind = "websocket"

    def __init__(
        self,
        sources: Sequence[tuple[StreamSourceConfig, StreamProvider]],
        *,
        context: TransportContext,
    ) -> None:
        if context.units:  # a runtime per subscription: each is a unit (CONTRACT §10)
            sources = [
                (c.model_copy(update={"subscriptions": (sub,)}), p)
                for c, p in sources
                for sub in c.subscriptions
            ]
        self.runtimes = tuple(
            StreamSource(config=c, provider=p, journal=context.journal, metrics=context.metrics)
            for c, p in sources
        )
        if context.units:  # a source is connected while any of its units' connections is
            for name in {r.name for r in self.runtimes}:
                mine = tuple(r for r in self.runtimes if r.name == name)
                gauge = context.metrics.source_connected.labels(name)
                gauge.set_function(functools.partial(_any_connected, mine))


def _size(raw: str | bytes) -> int:
    """A frame's size as websockets' ``max_size`` counts it (bytes, not characters)."""
    return len(raw.encode()) if isinstance(raw, str) else len(raw)


def _any_connected(runtimes: tuple[StreamSource, ...]) -> float:
    return float(any(r.status == "connected" for r in runtimes))
