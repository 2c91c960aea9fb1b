"""
A poll source's request budget (CONTRACT §9): ``rate_limit`` requests per window for
the whole source, every request, retry and redirect included, and the pauses the
provider asks for.

* Pacing: an ``aiolimiter.AsyncLimiter`` of one request per ``window / limit`` spreads
  the budget evenly. (A limiter with a bucket of ``limit`` would let a burst of
  ``limit`` through and then ``limit`` more as it drains: up to ``2 * limit - 1`` in one
  window as the provider measures it, which is the failure the contract forbids.)
* A hard cap on top: the send times of the last window are kept, and a request waits
  while ``limit`` of them are younger than ``window``, so no window, wherever it
  starts, ever holds more than ``limit`` requests of ours.
* Pauses: a 429 pauses the whole source until ``Retry-After`` (seconds or an HTTP
  date, RFC 9110 §10.2.3) or the ``RateLimit``/``X-RateLimit`` reset, plus up to 10%
  jitter, never shorter, but at most ``PAUSE_CAP`` (15 minutes) at a time, as a
  stream's ``retry_after`` is (a broken or hostile value must not park the source for
  days; still limited then, the next 429 pauses it again); without either, or when they
  ask for under a second (``Retry-After: 0`` to every request), exponential backoff with
  jitter (from 1 s, growing with each 429 in a row) capped at 15 minutes. A
  ``remaining`` of 0 pauses until the reset; a low one (under a tenth of the limit)
  spreads what is left over the time to the reset, so the source slows down before a
  429 happens.
* Rate headers: the IETF draft's ``RateLimit: limit=100, remaining=42, reset=23``
  (reset in seconds) and ``X-RateLimit-Limit/Remaining/Reset`` (reset a Unix time;
  NOTES: values above 10^9 are times, below are durations).
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from aiolimiter import AsyncLimiter

from handlers import load_provider
from listener.retry import backoff

__all__ = ["PAUSE_CAP", "Budget", "budget_warnings", "retry_after_seconds"]

# The longest pause a provider can ask for (and the cap of the 429 backoff).
PAUSE_CAP = 900.0
_UNIX_TIME = 1e9
# A header's number: ASCII digits only (str.isdigit() takes "²", which float() refuses),
# and not too many of them (int() of 5,000 digits raises; 400 nines are an infinity).
_IETF_PART = re.compile(
    r"\b(limit|remaining|reset)\s*=\s*(\d{1,12}(?:\.\d{1,9})?)(?![\d.])",
    re.IGNORECASE | re.ASCII,
)
_NUMBER = re.compile(r"\d{1,12}(?:\.\d{1,9})?", re.ASCII)
_INTEGER = re.compile(r"\d{1,12}", re.ASCII)


def retry_after_seconds(value: str, *, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date; else None."""
    text = value.strip()
    if not text:
        return None
    if _NUMBER.fullmatch(text):
        return float(text)
    moment = _http_date(text)
    return None if moment is None else max(moment - now, 0.0)


def server_time(headers: Mapping[str, str]) -> float | None:
    """The answer's ``Date`` as Unix time: the provider's clock, for its own Unix times."""
    return _http_date((_header(headers, "Date") or "").strip())


def _http_date(text: str) -> float | None:
    """An HTTP date as Unix time; ``None`` if it is none."""
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _reset_seconds(value: float, now: float) -> float:
    return max(value - now, 0.0) if value > _UNIX_TIME else value


def rate_headers(headers: Mapping[str, str], *, now: float) -> tuple[int | None, float | None]:
    """(remaining, seconds to the reset) from IETF ``RateLimit`` or ``X-RateLimit-*``."""
    ietf = _header(headers, "RateLimit")
    if ietf:
        parts = {k.lower(): float(v) for k, v in _IETF_PART.findall(ietf)}
        if "remaining" in parts:
            reset = parts.get("reset")
            return int(parts["remaining"]), (_reset_seconds(reset, now) if reset else None)
    remaining = _header(headers, "X-RateLimit-Remaining")
    if remaining is not None and _INTEGER.fullmatch(remaining.strip()):
        reset_text = (_header(headers, "X-RateLimit-Reset") or "").strip()
        reset = _reset_seconds(float(reset_text), now) if _NUMBER.fullmatch(reset_text) else None
        return int(remaining), reset
    return None, None


class Budget:
    """The request budget of one source, shared by all its resources."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._pacer = AsyncLimiter(1, window / limit)
        self._sent: collections.deque[float] = collections.deque()
        self._paused_until = 0.0  # monotonic
        self._delays = backoff(1.0, PAUSE_CAP)
        #: What the provider last said is left, when it says.
        self.provider_remaining: int | None = None

    @property
    def paused_for(self) -> float:
        """Seconds the source is paused for from now (0: not paused)."""
        return max(self._paused_until - time.monotonic(), 0.0)

    def left(self) -> int:
        """Requests left in the current window (the provider's figure when it gives one)."""
        self._forget(time.monotonic())
        ours = self.limit - len(self._sent)
        if self.provider_remaining is not None:
            return min(ours, self.provider_remaining)
        return ours

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()

    async def acquire(self) -> None:
        """Wait for the right to send one request (pauses, pacing, the hard cap)."""
        while True:
            if (pause := self.paused_for) > 0:
                await asyncio.sleep(pause)
                continue
            await self._pacer.acquire()
            now = time.monotonic()
            self._forget(now)
            if len(self._sent) >= self.limit:
                # Wait for the oldest send to leave the window (a hair later: the
                # provider's clock measures arrival).
                await asyncio.sleep(self._sent[0] + self.window - now + 0.01)
                continue
            if self.paused_for > 0:
                continue  # a pause arrived while we waited
            self._sent.append(now)
            return

    def pause(self, seconds: float) -> None:
        """Pause the whole source for ``seconds`` (+ up to 10% jitter); never shortens one."""
        seconds = min(max(seconds, 0.0), PAUSE_CAP)
        # Not cryptographic: only spreads clients apart.
        until = time.monotonic() + seconds * (1.0 + 0.1 * random.random())  # noqa: S311
        self._paused_until = max(self._paused_until, until)

    def observe(self, status: int, headers: Mapping[str, str], *, now: float | None = None) -> None:
        """
        Read an answer's rate headers (and a 429's ``Retry-After``); pause as asked. A
        reset or retry given as a time is read against the answer's ``Date`` when it
        has one: on a local clock two hours behind, a reset 30 s away read as 7,230 s
        (a 15-minute pause, the cap, at every low answer).
        """
        wall = (server_time(headers) or time.time()) if now is None else now
        remaining, reset = rate_headers(headers, now=wall)
        self.provider_remaining = remaining
        if status == 429:
            asked = retry_after_seconds(_header(headers, "Retry-After") or "", now=wall)
            wait = max(asked or 0.0, reset or 0.0)
            if wait < 1.0:  # nothing said, or `Retry-After: 0` to every request (which
                # had the source spend its whole budget on 429s): a growing backoff
                wait = max(wait, next(self._delays))
            self.pause(wait)
            return
        self._delays = backoff(1.0, PAUSE_CAP)
        if remaining is None or reset is None:
            return
        if remaining <= 0:
            self.pause(reset)
        elif remaining < max(self.limit // 10, 1):
            # Spread what is left over the time to the reset: slow down before a 429.
            self.pause(reset / (remaining + 1))


def utc_now() -> datetime:
    """The current time, UTC (the poll runtime's one clock read for event times)."""
    return datetime.now(UTC)


def budget_warnings(sources: Sequence[Any]) -> list[str]:
    """
    For ``check-config``: each poll source whose budget cannot cover one poll of every
    resource per ``interval`` (the polls would fall behind), with the figures.
    """
    warnings = []
    today = utc_now().date()
    for index, source in enumerate(sources):
        if source.kind != "poll":
            continue
        provider = load_provider(source.provider)
        requests = sum(len(provider.plan(r, aliases={}, today=today)) for r in source.resources)
        limit, window = source.rate_limit
        allowed = int(limit * source.interval / window)
        if requests > allowed:
            warnings.append(
                f"sources[{index}].rate_limit: one poll of every resource takes {requests}"
                f" requests, but {limit} per {window:g}s allows {allowed} per interval"
                f" ({source.interval:g}s): polls will fall behind; raise rate_limit or interval"
            )
    return warnings
