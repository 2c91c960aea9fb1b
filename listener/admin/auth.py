"""
Bearer-key auth and rate limiting for the admin API (``/v1/*``, CONTRACT §7).

* ``Authorization: Bearer <key>``; keys carry scopes ``read``, ``write``, ``admin``
  (``admin`` implies the others). No or unknown key → 401; a key without the
  route's scope → 403; both with the contract's error body.
* Keys are compared in constant time: the presented key's SHA-256 is compared with
  every configured key's SHA-256 with :func:`hmac.compare_digest`, without stopping at
  the first match, so timing says nothing about which key (or how much of one) matched.
* A fixed one-minute window per key (per client address before auth) gives
  ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (Unix
  seconds) on every response, and 429 past the limit.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from listener.config import ApiKeyConfig
from listener.web import error_response, json_errors

__all__ = ["SCOPE_KEY", "ApiAuth", "require"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_F = TypeVar("_F", bound=Callable[..., Any])
SCOPE_KEY = "listener.scope"
WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    scopes: frozenset[str]
    label: str


def require(scope: str) -> Callable[[_F], _F]:
    """Mark a ``/v1`` handler as needing ``scope`` (checked by :class:`ApiAuth`)."""

    def mark(handler: _F) -> _F:
        setattr(handler, SCOPE_KEY, scope)
        return handler

    return mark


class ApiAuth:
    """The aiohttp middleware guarding ``/v1``."""

    def __init__(self, keys: Iterable[ApiKeyConfig], *, rate_limit: int) -> None:
        self._keys: list[_Key] = []
        self.use_keys(keys)
        self._limit = rate_limit
        self._windows: dict[str, tuple[float, int]] = {}

    def use_keys(self, keys: Iterable[ApiKeyConfig]) -> None:
        """Authenticate with these keys from now on (SIGHUP); the next request sees them."""
        self._keys = [
            _Key(
                digest=hashlib.sha256(k.key.get_secret_value().encode()).digest(),
                scopes=frozenset(k.scopes) | ({"read", "write"} if "admin" in k.scopes else set()),
                label=f"key{i}",
            )
            for i, k in enumerate(keys)
        ]

    def _identify(self, request: web.Request) -> _Key | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        # aiohttp keeps a header's undecodable bytes as surrogates: hash the bytes sent
        # (a key is ASCII, so such a token simply matches none) instead of failing.
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found: _Key | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    def _count(self, who: str) -> tuple[int, int, float]:
        """The limit, what is left of it, and the seconds until the window resets."""
        now = time.monotonic()  # (a wall clock stepped back held a window open for hours)
        start, used = self._windows.get(who, (now, 0))
        if now - start >= WINDOW:
            start, used = now, 0
        used += 1
        self._windows[who] = (start, used)
        if len(self._windows) > 10_000:  # bound memory against address churn
            self._windows = {k: v for k, v in self._windows.items() if now - v[0] < WINDOW}
        return self._limit, max(self._limit - used, 0), start + WINDOW - now

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate, authorise and rate-limit every ``/v1`` request."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        key = self._identify(request)
        who = key.label if key else f"ip:{request.remote}"
        limit, remaining, reset_in = self._count(who)
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(int(time.time() + reset_in)),  # (Unix time)
        }
        response: web.StreamResponse
        if self._windows[who][1] > limit:
            retry = max(math.ceil(reset_in), 1)
            response = error_response(
                429,
                "RATE_LIMITED",
                f"over {limit} requests per minute",
                {"Retry-After": str(retry)},
            )
        elif key is None:
            response = error_response(401, "UNAUTHORIZED", "a valid Bearer key is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="listener"'
        elif (missing := request.match_info.http_exception) is not None:
            code = "NOT_FOUND" if missing.status == 404 else "METHOD_NOT_ALLOWED"
            allow = {"Allow": missing.headers["Allow"]} if "Allow" in missing.headers else None
            response = error_response(missing.status, code, missing.reason, allow)
        else:
            route_handler = request.match_info.handler
            scope = getattr(route_handler, SCOPE_KEY, "admin")
            if scope not in key.scopes:
                response = error_response(403, "FORBIDDEN", f"this key lacks the {scope!r} scope")
            else:
                # An error the handler raises (a 413, a 500) becomes its JSON answer
                # here, so that it carries the rate headers too.
                response = await json_errors(request, handler)
        response.headers.update(headers)
        return response
