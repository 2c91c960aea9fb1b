"""
What the REST provider simulators share (CONTRACT §9): an aiohttp server on 127.0.0.1,
Bearer keys, a request ledger, a server-side sliding-window rate limit with its 429s and
headers, and fault injection. :mod:`.tokenterminal` and :mod:`.terrapin` add their routes
and their error bodies.

Every request passes, in order: the :meth:`~RestSimulator.delay`, the one-shot faults
(:meth:`~RestSimulator.fail_next`, :meth:`~RestSimulator.force_429`), the Bearer key
(401), the server's own rate limit (429 with ``Retry-After``), then the route; a 200 may
then be swapped by :meth:`~RestSimulator.garbage_next` or
:meth:`~RestSimulator.wrong_shape_next`. Every request lands in the
:attr:`~RestSimulator.ledger` on arrival, so tests can check the rate a client keeps
(:meth:`~RestSimulator.max_in_window`), its silence after a 429
(:meth:`~RestSimulator.silence_after`) and pile-ups (:attr:`~RestSimulator.max_concurrent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import math
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import ClassVar, Final, Literal, Self, TypeAlias, TypeVar

from aiohttp import web

from listener.dev.simulators.waiting import Waitable

__all__ = ["Hit", "RateHeaders", "RestSimulator", "RetryAfterFormat", "retry_after_value"]

#: Rate headers a server sends: IETF draft ``RateLimit``/``RateLimit-Policy`` (reset in
#: seconds), ``X-RateLimit-*`` (reset a Unix time), or none.
RateHeaders: TypeAlias = Literal["ietf", "x"] | None
#: ``Retry-After`` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
RetryAfterFormat: TypeAlias = Literal["seconds", "http-date"]
_Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]
_S = TypeVar("_S", bound="RestSimulator")

_GATEWAY_PAGE: Final = b"<html><body><h1>%d %s</h1><p>upstream is redeploying</p></body></html>"
_GARBAGE: Final = b"<html><body><h1>Maintenance</h1>We'll be right back.</body></html>"


@dataclass(slots=True)
class Hit:
    """One request as the server saw it; ``status`` is ``None`` while it is in flight."""

    #: ``time.monotonic()`` and ``time.time()`` on arrival.
    at: float
    wall: float
    method: str
    #: Path and query, as sent.
    target: str
    path: str
    status: int | None = None
    #: ``time.monotonic()`` when the answer was ready.
    answered_at: float | None = None


def retry_after_value(seconds: float, fmt: RetryAfterFormat) -> str:
    """A ``Retry-After`` value at least ``seconds`` away: whole seconds or an HTTP-date."""
    if fmt == "http-date":
        instant = datetime.fromtimestamp(math.ceil(time.time() + max(seconds, 0.0)), UTC)
        return format_datetime(instant, usegmt=True)
    return str(math.ceil(max(seconds, 0.0)))


class RestSimulator(Waitable):
    """
    Base of a REST provider simulator on ``host:port`` (port 0: a free one, see :attr:`url`).

    Args:
        api_keys: Bearer keys that authenticate (the set :attr:`api_keys` may be changed).
        rate_limit: ``(n, window_seconds)``: over ``n`` admitted requests in any sliding
            window is answered 429 with ``Retry-After``; ``None``: no limit.
        rate_headers: rate headers on every answer (:data:`RateHeaders`).
        retry_after_format: how ``Retry-After`` is spelled.
    """

    #: The limit rate headers report when no ``rate_limit`` is set.
    nominal_limit: ClassVar[tuple[int, float]] = (100, 60.0)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] = ("test-key",),
        rate_limit: tuple[int, float] | None = None,
        rate_headers: RateHeaders = None,
        retry_after_format: RetryAfterFormat = "seconds",
    ) -> None:
        self.host = host
        self.port = port
        self.api_keys = set(api_keys)
        self.rate_limit = rate_limit
        self.rate_headers: RateHeaders = rate_headers
        self.retry_after_format: RetryAfterFormat = retry_after_format
        #: Every request, in arrival order.
        self.ledger: list[Hit] = []
        #: Requests being answered now; the most at once, overall and per path.
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_concurrent: dict[str, int] = {}
        self._by_path: dict[str, int] = {}
        self._admitted: deque[float] = deque()
        # One-shot answers (status, Retry-After), and a 429 period (until, Retry-After).
        self._front: deque[tuple[int, float | None]] = deque()
        self._period: tuple[float, float | Literal["auto"] | None] = (0.0, None)
        self._bodies: deque[Literal["garbage", "wrong_shape"]] = deque()
        self._delay = 0.0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- for subclasses ----------------------------------------------------------------

    def _routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def _error(self, status: int, message: str) -> web.Response:
        """The provider's error answer."""
        raise NotImplementedError

    def _wrong_shape(self) -> bytes:
        """A JSON body of the wrong shape for this provider."""
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port``, the source's ``url``, once started."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen on ``host:port``; :attr:`port` is the bound port after this."""
        if self._runner is not None:
            raise RuntimeError("this simulator is already running")
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._routes())
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listening socket and every connection."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- the ledger --------------------------------------------------------------------

    def max_in_window(self, seconds: float, *, path: str | None = None) -> int:
        """The most requests (of ``path``, or all) that arrived within any ``seconds``."""
        times = sorted(hit.at for hit in self.ledger if path is None or hit.path == path)
        most, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= seconds:
                first += 1
            most = max(most, last - first + 1)
        return most

    def silence_after(self, status: int = 429) -> list[float]:
        """For each answer with ``status``: seconds until the next request arrived (inf: none)."""
        gaps = []
        for hit in self.ledger:
            if hit.status == status and hit.answered_at is not None:
                end = hit.answered_at
                later = [h.at for h in self.ledger if h.at > end]
                gaps.append(min(later) - end if later else math.inf)
        return gaps

    def statuses(self, *, path: str | None = None) -> list[int | None]:
        """The status of every request (of ``path``, or all), in arrival order."""
        return [hit.status for hit in self.ledger if path is None or hit.path == path]

    # --- faults ------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 502) -> None:
        """Answer the next ``n`` requests with ``status`` (a gateway's HTML page), before auth."""
        self._front.extend([(status, None)] * n)

    def force_429(
        self,
        n: int = 1,
        *,
        seconds: float | None = None,
        retry_after: float | Literal["auto"] | None = "auto",
    ) -> None:
        """
        Answer 429 to the next ``n`` requests, or to every request for ``seconds``.

        Args:
            retry_after: the ``Retry-After`` (and rate-header reset) in seconds; ``None``
                sends none; ``"auto"``: the time left of ``seconds``, else 1.
        """
        if seconds is not None:
            self._period = (time.monotonic() + seconds, retry_after)
        else:
            self._front.extend([(429, 1.0 if retry_after == "auto" else retry_after)] * n)

    def garbage_next(self, n: int = 1) -> None:
        """Swap the next ``n`` successful answers for a 200 that is not JSON."""
        self._bodies.extend(["garbage"] * n)

    def wrong_shape_next(self, n: int = 1) -> None:
        """Swap the next ``n`` successful answers for JSON of the wrong shape."""
        self._bodies.extend(["wrong_shape"] * n)

    def delay(self, seconds: float) -> None:
        """Hold every answer ``seconds`` (0: answer at once): a slow server."""
        self._delay = seconds

    # --- answering ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        hit = Hit(time.monotonic(), time.time(), request.method, request.path_qs, request.path)
        self.ledger.append(hit)
        self._enter(hit.path)
        try:
            if self._delay > 0:
                await asyncio.sleep(self._delay)
            response = await self._answer(request, handler, hit.at)
        finally:
            self._leave(hit.path)
        if self.rate_headers and response.status != 429:
            now = time.monotonic()
            limit, window = self._limit()
            self._expire(now)
            remaining = limit - len(self._admitted) if self.rate_limit else limit
            reset = self._admitted[0] + window - now if self._admitted else 0.0
            response.headers.update(self._rate_headers(max(remaining, 0), reset))
        hit.status, hit.answered_at = response.status, time.monotonic()
        self._pulse()
        return response

    async def _answer(self, request: web.Request, handler: _Handler, at: float) -> web.Response:
        until, retry = self._period
        front = (429, until - at if retry == "auto" else retry) if at < until else None
        if front is None and self._front:
            front = self._front.popleft()
        if front is not None and front[0] == 429:
            return self._too_many(front[1])
        if front is not None:
            page = _GATEWAY_PAGE % (front[0], _reason(front[0]).encode())
            return web.Response(status=front[0], body=page, content_type="text/html")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key not in self.api_keys:  # RFC 9110 §11.1
            return self._error(401, "missing or invalid API key")
        wait = self._admit(at)
        if wait is not None:
            return self._too_many(wait)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            return self._error(exc.status, exc.reason)
        if not isinstance(response, web.Response):  # pragma: no cover - routes answer Response
            raise TypeError("simulator routes answer web.Response")
        if response.status == 200 and self._bodies:
            if self._bodies.popleft() == "garbage":
                return web.Response(body=_GARBAGE, content_type="text/html")
            return web.Response(body=self._wrong_shape(), content_type="application/json")
        return response

    def _limit(self) -> tuple[int, float]:
        return self.rate_limit or self.nominal_limit

    def _admit(self, at: float) -> float | None:
        """Count a request in the sliding window, or say how long until there is room."""
        if self.rate_limit is None:
            return None
        limit, window = self.rate_limit
        self._expire(at)
        if len(self._admitted) >= limit:
            return self._admitted[0] + window - at
        self._admitted.append(at)
        return None

    def _expire(self, now: float) -> None:
        window = self._limit()[1]
        while self._admitted and self._admitted[0] <= now - window:
            self._admitted.popleft()

    def _too_many(self, retry_after: float | None) -> web.Response:
        response = self._error(429, "rate limit exceeded; slow down")
        if retry_after is not None:
            value = retry_after_value(retry_after, self.retry_after_format)
            response.headers["Retry-After"] = value
        response.headers.update(self._rate_headers(0, retry_after or 0.0))
        return response

    def _rate_headers(self, remaining: int, reset: float) -> dict[str, str]:
        limit, window = self._limit()
        if self.rate_headers == "ietf":
            # draft-ietf-httpapi-ratelimit-headers: reset in seconds.
            return {
                "RateLimit": f"limit={limit}, remaining={remaining}, reset={math.ceil(reset)}",
                "RateLimit-Policy": f"{limit};w={math.ceil(window)}",
            }
        if self.rate_headers == "x":
            # The older convention: reset is a Unix time (NOTES: poll sources).
            return {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(math.ceil(time.time() + reset)),
            }
        return {}

    def _enter(self, path: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        count = self._by_path[path] = self._by_path.get(path, 0) + 1
        self.max_concurrent[path] = max(self.max_concurrent.get(path, 0), count)
        self._pulse()

    def _leave(self, path: str) -> None:
        self.in_flight -= 1
        self._by_path[path] -= 1


def _reason(status: int) -> str:
    return http.client.responses.get(status, "Error")


def run_until_cancelled(
    simulator: _S, on_ready: Callable[[_S], None] | None = None
) -> None:  # pragma: no cover - blocking; exercised by hand and by the CLI
    """Run ``simulator`` in a new event loop until SIGINT or SIGTERM."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None  # always inside asyncio.run
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            async with simulator:
                if on_ready is not None:
                    on_ready(simulator)
                await asyncio.get_running_loop().create_future()  # until cancelled

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
