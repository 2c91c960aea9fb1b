"""
Supervision (STYLE: "supervise sources"; Erlang's one-for-one supervisor): a source
that raises anything is logged with its traceback, counted in
``listener_source_errors_total{source}``, and started again after a jittered backoff
that grows while it keeps failing and starts over once it has run for a while. No
source can end the service's TaskGroup; only cancellation (shutdown) ends it.

Runtimes handle what they expect (a dropped connection, a refused key) themselves;
this is the net under everything else: a bug, a library raising what it never did
before, a provider inventing a new way to fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from listener.metrics import Metrics
from listener.retry import backoff, stop_if_cancelled

__all__ = ["HEALTHY_AFTER", "SourceRuntime", "supervised"]

log = structlog.get_logger("listener.supervisor")

# A run that lasted this long resets the backoff.
HEALTHY_AFTER = 60.0


class SourceRuntime(Protocol):
    """A running source as the service sees it."""

    name: str

    async def run(self) -> None:
        """Hold the source until cancelled."""
        ...

    def state(self) -> Mapping[str, Any]:
        """``{"status": ..., ...}`` for ``/readyz`` and ``/v1/sources``."""
        ...


async def supervised(
    source: SourceRuntime,
    *,
    metrics: Metrics,
    initial: float = 1.0,
    maximum: float = 60.0,
) -> None:
    """Run ``source`` until cancelled, restarting it after any exception."""
    errors = metrics.source_errors.labels(source.name)
    delays = backoff(initial, maximum)
    while True:
        started = time.monotonic()
        try:
            await source.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the supervisor's job: log, count, restart (never silently)
            stop_if_cancelled(exc)
            errors.inc()
            if time.monotonic() - started >= HEALTHY_AFTER:
                delays = backoff(initial, maximum)
            delay = next(delays)
            log.exception("source_crashed", source=source.name, restart_in=round(delay, 3))
        else:
            # A source's run() returns only when it has nothing to do; run it again later.
            delay = next(delays)
            log.warning("source_stopped", source=source.name, restart_in=round(delay, 3))
        await asyncio.sleep(delay)
