"""
Settling what the broker answered, a mixin of :class:`listener.broker.publisher.Publisher`:
confirmed messages are marked published in batches, returned or nacked ones set aside
as deferred (retried with backoff away from the head), failures counted and logged.
A journal that cannot write keeps them for the next flush.
"""

from __future__ import annotations

import time

import structlog

from listener.broker.confirms import Outcome, Sent
from listener.broker.inflight import Kept
from listener.exceptions import JournalError, PublishNacked
from listener.journal import Journal
from listener.metrics import Metrics

__all__ = ["DEFERRED_LOG_EVERY", "DEFER_BASE", "DEFER_CAP", "Settling"]

log = structlog.get_logger("listener.publisher")

# Deferred (returned or nacked) messages: first retry after this long, doubling, capped.
DEFER_BASE, DEFER_CAP = 1.0, 60.0
DEFERRED_LOG_EVERY = 10.0  # seconds: one publish_deferred line at most, with the count
DEFER_AGAIN = 1.0  # seconds before a defer the journal failed is tried again


class Settling:
    """The publisher's settled messages (its state, declared here)."""

    _journal: Journal
    _metrics: Metrics
    _confirmed: list[Kept]
    _returned: list[tuple[Kept, str]]
    _confirmed_any: bool
    _last_error: str | None
    _blocked: bool
    _unlogged: int
    _log_deferred_at: float
    _defer_again_at = 0.0  # (monotonic) a failed defer is not tried again before then

    def _settled(self, sent: Sent, outcome: Outcome, seconds: float) -> None:
        kept: Kept = sent.token
        if outcome is None:
            self._confirmed_any = True
            self._confirmed.append(kept)
            self._metrics.publish_seconds.observe(seconds)
            self._metrics.event_lag_seconds.observe(max(time.time() - kept.received_at, 0.0))
            return
        reason = "nacked" if isinstance(outcome, PublishNacked) else "returned"
        self._metrics.publish_failures.labels(reason).inc()
        self._returned.append((kept, f"{reason}: {outcome}"))

    async def _flush_returned(self) -> None:
        if not self._returned or time.monotonic() < self._defer_again_at:
            return
        # Once each: a row a new session sent again while its defer failed came back twice.
        returned = list({k.seq: (k, why) for k, why in self._returned}.values())
        self._returned = []
        try:
            await self._journal.defer(
                [k.seq for k, _ in returned], error=returned[0][1], base=DEFER_BASE, cap=DEFER_CAP
            )
        except JournalError as exc:
            # Not recorded: kept to set aside at the next flush (they stayed pending, and
            # the session's backlog had gone past them: pending until the next session).
            # Tried again in a second, not at each pass of the drain loop.
            self._returned = returned + self._returned
            self._defer_again_at = time.monotonic() + DEFER_AGAIN
            log.warning("journal_defer_failed", error=str(exc), count=len(self._returned))
            return
        self._last_error = returned[0][1]
        self._metrics.journal_deferred.set(self._journal.deferred_count)
        self._unlogged += len(returned)
        if (now := time.monotonic()) < self._log_deferred_at:
            return  # (a line per flush was one per event for an unbound routing key)
        self._log_deferred_at = now + DEFERRED_LOG_EVERY
        log.warning(
            "publish_deferred",
            count=self._unlogged,  # since the last line
            first_id=returned[0][0].event_id,
            routing_keys=sorted({k.routing_key for k, _ in returned})[:10],
            error=returned[0][1],
            note="retried with backoff; the others go on",
        )
        self._unlogged = 0

    async def _flush_confirmed(self, *, wait: bool) -> None:
        if not self._confirmed:
            return
        confirmed, self._confirmed = self._confirmed, []
        fresh = [k.seq for k in confirmed if not k.retried]
        retried = [k.seq for k in confirmed if k.retried]
        try:
            await self._journal.mark_published(fresh, wait=wait)
            await self._journal.mark_published(retried, wait=True, deferred=True)
        except JournalError as exc:
            # The journal cannot write (disk full, I/O error): keep them to mark at the next
            # flush instead of ending the publisher, and with it the service. They stay
            # pending on disk meanwhile (a restart before then publishes them again).
            self._confirmed = confirmed + self._confirmed
            log.warning("journal_mark_failed", error=str(exc), confirmed=len(self._confirmed))
            return
        for kept in confirmed:
            if kept.event:
                self._metrics.published(kept.source, kept.routing_key).inc()
        if retried:
            # A deferred message went through: its routing key is routable again, so its
            # fellows need not wait out their backoff.
            keys = sorted({k.routing_key for k in confirmed if k.retried})
            try:
                await self._journal.retry_now(keys)
            except JournalError as exc:
                log.warning("journal_retry_now_failed", error=str(exc))
        self._metrics.journal_pending.set(self._journal.pending_count)
        self._metrics.journal_deferred.set(self._journal.deferred_count)

    def _record_failure(self, reason: str, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._blocked |= reason == "blocked"  # (until ready() again, or a new connection)
        self._metrics.publish_failures.labels(reason).inc()
        log.warning(
            "publish_failed",
            reason=reason,
            error=self._last_error,
            message_id=getattr(exc, "message_id", None),
            pending=self._journal.pending_count,
        )
