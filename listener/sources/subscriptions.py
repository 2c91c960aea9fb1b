"""
The subscriptions of one stream source: found by request id (acks, errors) and by the
server's subscription id (events), with the position of each (CONTRACT §6).

:meth:`Subscriptions.fresh` decides what an event frame is: a resend at or below the
last position handed to the journal (skipped), the next one, or one after a gap (the
server could not resend what is missing: counted and logged with the range).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Iterator, Mapping

import structlog

from handlers import StreamProvider
from handlers.frames import ErrorFrame, EventFrame, Subscribed
from listener.config import SubscriptionConfig
from listener.logs import redact
from listener.metrics import Metrics
from listener.sources.websocket_policy import Outcome, Subscription

__all__ = ["ACK_WAIT", "FORBIDDEN_RETRY", "Subscriptions"]

log = structlog.get_logger("listener.streams")

# A subscription the server refused (FORBIDDEN) is asked for again on every new
# connection, and on a live one this long after: a plan upgraded, or a key rotated by
# SIGHUP (it authenticates the next connection), lets it through without a restart.
FORBIDDEN_RETRY = 600.0
# A subscribe refused with another code (a rate limit, a server error), or a
# subscription the server ends (``unsubscribed``), is asked for again on the live
# connection after RETRY_BASE doubling to RETRY_CAP (or the error's retry_after, if
# longer; an event resets it). A subscribe neither acknowledged nor refused within
# ACK_WAIT ends the connection (the next one subscribes everything again): asking again
# on it could leave the server holding two subscriptions, every event sent twice. Such
# a subscription stayed pending until the connection dropped, maybe days later, and
# what the server held no longer by then was lost.
ACK_WAIT = 30.0
RETRY_BASE, RETRY_CAP = 1.0, 60.0


class Subscriptions:
    """A stream source's subscription table."""

    def __init__(
        self,
        source: str,
        configs: tuple[SubscriptionConfig, ...],
        provider: StreamProvider,
        metrics: Metrics,
    ) -> None:
        self._source = source
        self._metrics = metrics
        self.all = [
            Subscription(
                config=sub,
                key=provider.subscription_key(sub.channel, sub.params),
                request_id=f"sub-{i}",
            )
            for i, sub in enumerate(configs)
        ]
        self._by_request = {s.request_id: s for s in self.all}
        self._by_server: dict[str, Subscription] = {}
        #: The last connection-level error the server sent (its words, for /v1/sources).
        self.last_error: str | None = None
        #: When a refused subscription is next asked for on a live connection.
        self.retry_at = math.inf
        #: When the oldest unanswered subscribe on this connection has waited too long.
        self.answer_by = math.inf

    def __iter__(self) -> Iterator[Subscription]:
        return iter(self.all)

    def load(self, stored: Mapping[str, int]) -> None:
        """Positions from the journal: what is on disk (before each connection)."""
        for sub in self.all:
            sub.last_seq = sub.durable_seq = stored.get(sub.key)

    def to_subscribe(self, *, connecting: bool) -> list[Subscription]:
        """
        What to subscribe now, each set pending: on a new connection (``connecting``)
        all but those refused for their params (the same params fail again until a
        restart applies new ones); on a live one, those refused FORBIDDEN over
        :data:`FORBIDDEN_RETRY` ago, and pending ones due again (after an error, or
        ended by the server).
        """
        now = time.monotonic()
        due = now - FORBIDDEN_RETRY
        chosen = [
            s
            for s in self.all
            if (connecting and s.state != "invalid_params")
            or (s.state == "forbidden" and s.refused_at <= due)
            or (s.state == "pending" and not s.asked and s.retry_due <= now)
        ]
        for sub in chosen:
            sub.state, sub.asked, sub.retry_due = "pending", True, now + ACK_WAIT
        if connecting:  # (refused for its params: not asked again, still refused here)
            for sub in self.all:
                if sub.state == "invalid_params":
                    self._metrics.subscription_failed.labels(self._source, sub.key).set(1)
        self._schedule()
        return chosen

    def _schedule(self) -> None:
        """When :meth:`to_subscribe` next has something on a live connection."""
        refused = [s.refused_at + FORBIDDEN_RETRY for s in self.all if s.state == "forbidden"]
        again = [s.retry_due for s in self.all if s.state == "pending" and not s.asked]
        self.retry_at = min(refused + again, default=math.inf)
        asked = [s.retry_due for s in self.all if s.state == "pending" and s.asked]
        self.answer_by = min(asked, default=math.inf)

    def _again(self, sub: Subscription, at_least: float = 0.0) -> float:
        """Ask for ``sub`` again after a backoff (:data:`RETRY_BASE`...); return it."""
        sub.state, sub.asked, sub.failures = "pending", False, sub.failures + 1
        doubled: float = RETRY_BASE * 2.0 ** min(sub.failures - 1, 16)
        wait = max(min(doubled, RETRY_CAP), at_least)
        sub.retry_due = time.monotonic() + wait
        self._schedule()
        return wait

    def stopped(self) -> None:
        """The source stopped: ``listener_subscription_failed`` no longer holds here."""
        for sub in self.all:
            self._metrics.subscription_failed.labels(self._source, sub.key).set(0)

    def disconnected(self) -> None:
        """The connection ended: active subscriptions are pending again."""
        for sub in self.all:
            if sub.state == "active":
                sub.state = "pending"
            sub.asked = False
        self._by_server.clear()
        self._schedule()

    def unsubscribed(self, server_id: str) -> None:
        """The server ended one subscription: asked for again after a backoff."""
        sub = self._by_server.pop(server_id, None)
        if sub is None:
            return
        sub.server_id = None
        wait = self._again(sub)
        log.warning(
            "stream_unsubscribed",
            source=self._source,
            subscription=sub.key,
            note=f"subscribed again in {wait:g}s, from its last seq",
        )

    async def unread(self, waiting: Awaitable[object]) -> None:
        """Await ``waiting``, the connection not read meanwhile (:meth:`paused`)."""
        began = time.monotonic()
        try:
            await waiting
        finally:
            self.paused(time.monotonic() - began)

    def paused(self, seconds: float) -> None:
        """
        The connection was not read for ``seconds`` (a full journal): what came meanwhile
        waits unread, so neither a subscribe's answer nor an event is late by that much.
        """
        for sub in self.all:
            if sub.asked:
                sub.retry_due += seconds
            sub.last_heard += seconds
        self._schedule()

    def silent_for(self, limit: float) -> float:
        """Seconds until an active subscription has been silent for ``limit``."""
        now = time.monotonic()
        waits = [s.last_heard + limit - now for s in self.all if s.state == "active"]
        return min(waits, default=limit)

    def wait(
        self, now: float, quiet: float, sub_stale: float | None, quiet_for: str
    ) -> tuple[float, str | None]:
        """
        How long a connection waits for its next frame from ``now`` (monotonic), and what
        it means when none came by then: ``quiet_for`` (nothing for ``stale_after``:
        ``quiet`` is what is left of it), an active subscription silent for ``sub_stale``,
        or ``None``: a subscription is due to be asked for again.
        """
        wait, why = quiet, quiet_for
        if sub_stale is not None and (silent := self.silent_for(sub_stale)) < wait:
            wait, why = silent, "a subscription went silent"
        if (late := self.answer_by - now) < wait:
            wait, why = late, f"a subscribe had no answer within {ACK_WAIT:g}s"
        if (due := self.retry_at - now) < wait:
            return max(due, 0.0), None
        return max(wait, 0.0), why

    def active(self) -> list[tuple[str, str]]:
        """The request id and the server's id of each active subscription."""
        return [
            (s.request_id, s.server_id) for s in self.all if s.state == "active" and s.server_id
        ]

    def find(self, frame: EventFrame) -> Subscription | None:
        """The subscription an event frame belongs to (``None``: none by that id)."""
        return self._by_server.get(frame.subscription)

    def fresh(self, sub: Subscription, seq: int) -> bool:
        """
        Whether ``seq`` moves ``sub``'s cursor: above the last position handed to the
        journal. A jump past the next one is a gap (the server could not resend what is
        missing): counted and logged with the range. One at or below it is a resend (the
        journal drops it by its id) or a server numbering again from lower down (a reset,
        or after a wild jump): its event is journaled all the same, and the first such
        frame is logged. Dropping them blinded the subscription for good.
        """
        sub.failures = 0  # (events come: the next failure is asked again after RETRY_BASE)
        last = sub.last_seq
        if last is None:
            return True
        if seq <= last:
            if not sub.behind:
                sub.behind = True
                log.warning(
                    "stream_seq_behind",
                    source=self._source,
                    subscription=sub.key,
                    seq=seq,
                    last_seq=last,
                    note="journaled without moving the cursor; duplicates are dropped by id",
                )
            return False
        sub.behind = False
        if seq > last + 1:
            missing = seq - last - 1
            self._metrics.stream_gaps.labels(self._source, sub.key).inc(missing)
            log.warning(
                "stream_gap",
                source=self._source,
                subscription=sub.key,
                first_missing=last + 1,
                last_missing=seq - 1,
                missing=missing,
            )
        return True

    def subscribed(self, frame: Subscribed) -> None:
        """The server acknowledged a subscribe."""
        sub = self._by_request.get(frame.id)
        if sub is None or (sub.state == "active" and sub.server_id == frame.subscription):
            return  # (an ack again: nothing new)
        if sub.server_id is not None:  # acked under another id: only the last one holds
            self._by_server.pop(sub.server_id, None)
        sub.state = "active"
        sub.server_id = frame.subscription
        sub.last_heard = time.monotonic()
        sub.error, sub.asked, sub.retry_due = None, False, math.inf
        self._schedule()
        self._by_server[frame.subscription] = sub
        self._metrics.subscription_failed.labels(self._source, sub.key).set(0)
        log.info(
            "stream_subscribed",
            source=self._source,
            subscription=sub.key,
            since_seq=sub.last_seq,
        )

    def error(self, frame: ErrorFrame, outcome: Outcome) -> None:
        """An error frame: for one subscription (it fails alone) or for the connection."""
        if frame.retry_after is not None:
            outcome.retry_after = frame.retry_after
        sub = self._by_request.get(frame.id) if frame.id else None
        message = redact(frame.message)[:200]  # (shown on /v1/sources: a key echoed back)
        if sub is None:
            if frame.kind == "unauthorized":
                outcome.unauthorized = True
            self.last_error = f"{frame.code}: {message}"
            log.warning("stream_error", source=self._source, code=frame.code, message=message)
            return
        if frame.kind in ("forbidden", "invalid_params"):
            sub.error, sub.asked = message, False
            sub.state = "forbidden" if frame.kind == "forbidden" else "invalid_params"
            sub.refused_at = time.monotonic()
            self._schedule()
            self._metrics.subscription_failed.labels(self._source, sub.key).set(1)
            log.warning(
                "stream_subscription_failed",
                source=self._source,
                subscription=sub.key,
                code=frame.code,
                message=message,
            )
            return
        if sub.state != "pending":
            return  # (not an answer to a subscribe: nothing to ask again)
        sub.error = message
        wait = self._again(sub, frame.retry_after or 0.0)
        log.warning(
            "stream_subscription_error",
            source=self._source,
            subscription=sub.key,
            code=frame.code,
            message=message,
            note=f"subscribed again in {wait:g}s",
        )
