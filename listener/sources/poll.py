"""
The poll transport (CONTRACT §9): one runtime per poll source, asking a REST provider
on a schedule and turning what changed into events. It names no provider: the
handler (:class:`handlers.polling.PollProvider`) plans requests, parses answers and
reads redirects and rejections; this module owns HTTP, budget, schedule and state.

* One ``aiohttp.ClientSession`` per source; one :class:`~listener.sources.poll_budget.Budget`
  shared by every request, retry and redirect of the source.
* Each resource runs its own loop, so one poll of a resource at a time (a slow one
  never piles up); the next starts ``interval`` (±10%) after the last started, or at
  once when that has passed. ``POST /v1/sources/{name}/poll`` wakes them all.
* 5xx, 502 and network errors are retried within the poll (``retries`` times, with
  jittered backoff); a 429 pauses the whole source and the request waits it out.
* 308 → the rename is followed (the configured key kept), and the alias, the rename
  event and the events of the followed answer are written together.
* 401 → source ``unauthorized``; 402 → ``subscription_invalid``; 403 → the resource
  ``forbidden``; 400/422 → ``invalid_params`` (items the provider names are
  quarantined and the request retried without them). Each backs off to ``interval``;
  the other resources go on. A body that is not the expected JSON is quarantined and
  the resource backs off (30 s, doubling up to ``interval``).
* Change is found by content (:mod:`listener.sources.poll_changes`): the state and the
  events of each answer are written in one journal transaction, so a crash loses
  nothing, duplicates nothing, and a failed poll advances nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import structlog

from handlers import Quarantine
from handlers.polling import PollProvider, PollRequest, Renamed
from listener.config import PollSourceConfig
from listener.exceptions import JournalError
from listener.journal import Journal
from listener.journal.writes import PollWrite
from listener.logs import redact
from listener.metrics import Metrics
from listener.retry import backoff
from listener.sources.intake import Intake
from listener.sources.poll_budget import Budget, utc_now
from listener.sources.poll_changes import Resource, commit_page, quarantine
from listener.sources.registry import RuntimeTransport, TransportContext
from listener.sources.websocket_policy import iso

__all__ = ["PollSource", "PollTransport"]

log = structlog.get_logger("listener.poll")

# Largest answer read; more is an error of the provider's, not a reason to run out of memory.
MAX_ANSWER = 64 * 2**20
# An answer larger than this is parsed (records and their hashes made) on a worker
# thread: ~160 µs of CPU a KiB, so a 10,000-row answer (1 MiB) held the event loop, and
# every webhook's answer and stream read with it, for 170 ms; 64 MiB for seconds.
PARSE_INLINE = 32 * 1024
MAX_REDIRECTS = 3
ERROR_BACKOFF = 30.0


class PollStop(Exception):
    """A poll of one resource ends in ``state`` (forbidden, invalid_params, error)."""

    def __init__(self, state: str, detail: str) -> None:
        self.state = state
        self.detail = detail
        super().__init__(detail)


class SourceStop(PollStop):
    """The whole source is refused (unauthorized, subscription_invalid)."""


class PollSource:
    """Polls one source's resources, forever (a supervised runtime)."""

    def __init__(
        self,
        *,
        config: PollSourceConfig,
        provider: PollProvider,
        journal: Journal,
        metrics: Metrics,
    ) -> None:
        self.name = config.name
        self.config = config
        self.provider = provider
        self.journal = journal
        self.metrics = metrics
        self.intake = Intake(
            source=config.name,
            provider=provider.name,
            metrics=metrics,
            known_types=tuple(provider.data_models),
        )
        metrics.poll_interval.labels(config.name).set(config.interval)
        self.budget = Budget(*config.rate_limit)
        self.resources = [Resource(provider.describe(r), r) for r in config.resources]
        self.status = "starting"
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # -- state --------------------------------------------------------------------------

    def state(self) -> Mapping[str, Any]:
        """For ``/readyz`` and ``/v1/sources``: the source, its budget, each resource."""
        status = self.status
        if status == "polling" and any(
            r.state in {"forbidden", "invalid_params", "error"} for r in self.resources
        ):
            status = "degraded"
        return {
            "kind": "poll",
            "status": status,
            "events_received": self.intake.events_received,
            "last_event_at": iso(self.intake.last_event_at),
            "budget": {
                "limit": self.budget.limit,
                "window_s": self.budget.window,
                "left": self.budget.left(),
                "paused_for_s": round(self.budget.paused_for, 3),
            },
            "resources": [r.view() for r in self.resources],
        }

    def poll_now(self) -> None:
        """Start a poll of every resource now (``POST /v1/sources/{name}/poll``)."""
        for resource in self.resources:
            resource.wake.set()

    def use_config(self, config: PollSourceConfig) -> None:
        """SIGHUP: a new API key goes with the next request; one it had refused polls now."""
        rotated = config.api_key != self.config.api_key
        self.config = config
        if rotated and self.status in {"unauthorized", "subscription_invalid"}:
            self.poll_now()

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll every resource on its schedule until cancelled."""
        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
        polled = await self.journal.poll_primed(self.name)
        for resource in self.resources:
            resource.primed = resource.label in polled
            resource.last_poll = polled.get(resource.label)
        if known := [at for at in polled.values() if at is not None]:
            # (the start of the last whole poll: a success's time within its duration)
            self.metrics.poll_last_success.labels(self.name).set(max(known))
        async with aiohttp.ClientSession(
            base_url=cfg.url.rstrip("/") + "/", timeout=timeout
        ) as session:
            self._session = session
            self.status = "polling"
            try:
                async with asyncio.TaskGroup() as tasks:
                    for index, resource in enumerate(self.resources):
                        tasks.create_task(
                            self._loop(resource, index), name=f"poll:{self.name}:{index}"
                        )
            finally:
                self._session = None
                self.status = "stopped"

    async def _loop(self, resource: Resource, index: int) -> None:
        interval = self.config.interval
        # Spread the first polls a little, so resources do not all start at once.
        first = min(interval * 0.1, 2.0) * index / max(len(self.resources), 1)
        resource.next_poll = time.time() + first
        if resource.last_poll is not None:  # by an earlier run, or the replica before
            jitter = random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security
            # (not after now: a clock since stepped back, or a replica's ahead, would
            # hold the next poll back by the step)
            last = min(resource.last_poll, time.time())
            resource.next_poll = max(resource.next_poll, last + interval * jitter)
        errors = backoff(ERROR_BACKOFF, interval)
        while True:
            await resource.sleep_until_due()
            began = time.monotonic()  # (the wall clock may step while it polls)
            delay = interval * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security
            try:
                await self._poll(resource)
            except SourceStop as stop:
                self.status = stop.state
                resource.fail(stop.state, stop.detail)
                log.warning(
                    "poll_source_refused", source=self.name, state=stop.state, detail=stop.detail
                )
            except JournalError as exc:
                # Full or failing: nothing of this poll was written; ask again later.
                resource.fail("error", f"journal: {exc}")
                delay = next(errors)
                log.warning("poll_not_journaled", source=self.name, error=str(exc))
            except PollStop as stop:
                resource.fail(stop.state, stop.detail)
                if stop.state == "error":
                    delay = next(errors)
                log.warning(
                    "poll_failed",
                    source=self.name,
                    resource=resource.label,
                    state=stop.state,
                    detail=stop.detail,
                    retry_in=round(delay, 1),
                )
            else:
                errors = backoff(ERROR_BACKOFF, interval)
                self.status = "polling"
                self.metrics.poll_last_success.labels(self.name).set(resource.last_success or 0)
            resource.next_poll = time.time() + max(delay - (time.monotonic() - began), 0.0)

    async def _poll(self, resource: Resource) -> None:
        resource.last_poll = started = time.time()
        aliases = await self.journal.poll_aliases(self.name)
        today = utc_now().date()
        for request in self.provider.plan(resource.model, aliases=aliases, today=today):
            await self._request(resource, request)
        # A whole poll is done: from now on first sight is a change, and the next is
        # due an interval after this one's start, after a restart too. What no poll
        # asks for any more is forgotten (the state would grow every day).
        ttl = self._state_ttl()
        forget = None if ttl is None else time.time() - ttl
        write = PollWrite(self.name, polled=(resource.label, started), forget_before=forget)
        await self.journal.append([], poll=write)
        resource.succeeded()

    def _state_ttl(self) -> float | None:
        """The longest of the resources' state TTLs; ``None`` if one keeps its state."""
        ttls = [self.provider.state_ttl(r.model) for r in self.resources]
        return None if None in ttls else max(t for t in ttls if t is not None)

    async def _request(self, resource: Resource, request: PollRequest) -> None:
        """One planned request, through redirects and rejections, to its committed answer."""
        renames: list[Renamed] = []
        current: PollRequest | None = request
        while current is not None:
            status, headers, body = await self._fetch(current)
            if status in (301, 302, 303, 307, 308):
                renamed = self.provider.redirect(current, headers.get("Location", ""))
                if renamed is None or len(renames) >= MAX_REDIRECTS:
                    raise PollStop(
                        "error", f"a {status} redirect the provider's handler cannot follow"
                    )
                renames.append(renamed)
                current = renamed.follow
                continue
            if status == 401:
                raise SourceStop("unauthorized", "the provider refused the API key (401)")
            if status == 402:
                raise SourceStop(
                    "subscription_invalid", "the provider says the subscription is not valid (402)"
                )
            if status == 403:
                raise PollStop("forbidden", "not in the plan or tier, or the quota is spent (403)")
            if status in (400, 422):
                rejected = self.provider.reject(current, status, body)
                if rejected is None:
                    raise PollStop("invalid_params", f"the provider refused the request ({status})")
                for item in rejected.items:
                    payload = rejected.payloads.get(item) or item.encode()
                    await quarantine(self, payload, Quarantine("invalid_params", rejected.detail))
                current = rejected.retry
                continue
            if not 200 <= status < 300:
                raise PollStop("error", f"unexpected answer {status}")
            if len(body) <= PARSE_INLINE:
                page = self.provider.parse(current, body)
            else:  # (the loop gets the interpreter back every few ms meanwhile)
                page = await asyncio.to_thread(self.provider.parse, current, body)
            if isinstance(page, Quarantine):
                await quarantine(self, body, page)
                raise PollStop("error", f"{page.reason}: {redact(page.detail)[:200]}")
            for warning in page.warnings:
                log.warning(
                    "poll_partial_answer", source=self.name, resource=resource.label, detail=warning
                )
            await commit_page(self, resource, page, renames)
            return

    async def _fetch(self, request: PollRequest) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request within the budget; retry 5xx and network errors; wait out 429s."""
        assert self._session is not None  # inside run()
        delays = backoff(1.0, max(self.config.interval / 4, 1.0))
        failures = 0
        while True:
            await self.budget.acquire()
            try:
                async with self._session.request(
                    request.method,
                    request.target.lstrip("/"),
                    data=request.body,
                    # Read per request: a SIGHUP's new key goes with the next one.
                    headers={
                        **self.provider.auth_headers(self.config.api_key.get_secret_value()),
                        **({"Content-Type": "application/json"} if request.body else {}),
                    },
                    allow_redirects=False,
                ) as response:
                    status, headers = response.status, response.headers
                    body = await _read(response)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.metrics.poll_requests.labels(self.name, "error").inc()
                detail = f"{type(exc).__name__}: {exc}"
            else:
                self.metrics.poll_requests.labels(self.name, str(status)).inc()
                self.budget.observe(status, headers)
                if status == 429:
                    log.info(
                        "poll_rate_limited",
                        source=self.name,
                        paused_for=round(self.budget.paused_for, 2),
                    )
                    continue  # the budget waits out the pause; a rate limit never fails a poll
                if status < 500:
                    return status, headers, body
                detail = f"answer {status}"
            failures += 1
            if failures > self.config.retries:
                raise PollStop("error", f"{detail}, {failures} times")
            await asyncio.sleep(next(delays))


async def _read(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, at most :data:`MAX_ANSWER` bytes."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(2**16):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise PollStop("error", f"an answer over {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class PollTransport(RuntimeTransport):
    """Every poll source of the service: one supervised runtime each."""

    kind = "poll"

    def __init__(
        self, sources: Sequence[tuple[PollSourceConfig, PollProvider]], *, context: TransportContext
    ) -> None:
        self.runtimes = tuple(
            PollSource(config=c, provider=p, journal=context.journal, metrics=context.metrics)
            for c, p in sources
        )
