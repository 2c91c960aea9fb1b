"""
A Token Terminal-compatible REST server (CONTRACT §9) for tests, the demo and benchmarks.

::

    async with TokenTerminalSimulator(projects=["aave"], today=date(2026, 11, 24)) as sim:
        GET {sim.url}/v2/projects/aave/metrics?metric_ids=fees,revenue&start=2026-11-17
        sim.restate("aave", "2026-11-20", "fees", "1200.10")   # a past day changes
        sim.rename("aave", "aave-v3")                           # aave now answers 308

It answers ``GET /v2/projects/{id}/metrics?metric_ids=a,b&start=YYYY-MM-DD`` with
``{"data": rows}``: one row per day from ``start`` to today (inclusive) and chain, a
column per known metric. Values are derived from ``(seed, project, day, chain, metric)``
alone, written as JSON numbers with exact digits in varied spellings (``1234.50``,
``0.000123456789``, ``1.5e-7``, ``12345678901234567890.123456789``), sometimes ``null``.
Unknown metric ids leave the others answered and add ``errors``.

Answers: 401 bad key, 402 :meth:`~TokenTerminalSimulator.subscription_invalid`,
403 :meth:`~TokenTerminalSimulator.forbid`, 404 unknown project, 400 for a bad ``start``
or ``metric_ids`` (or :meth:`~TokenTerminalSimulator.bad_params`), 308 for a renamed
project, and the shared faults, rate limit and ledger of :class:`.rest.RestSimulator`.
Token Terminal documents no rate headers, so none are sent unless ``rate_headers`` asks.

The provider side is written from the contract, not from ``handlers/tokenterminal.py``,
so the two check each other.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http import HTTPStatus
from typing import Final

import orjson
from aiohttp import web

from listener.dev.simulators.rest import (
    RateHeaders,
    RestSimulator,
    RetryAfterFormat,
    run_until_cancelled,
)

__all__ = ["DEFAULT_METRICS", "Number", "TokenTerminalSimulator", "run_standalone"]

DEFAULT_METRICS: Final = ("fees", "revenue", "token_incentives", "active_users")
#: A metric value as callers give it; strings must be JSON numbers (``"1234.50"``).
Number = str | int | float | Decimal | None
# RFC 8259 §6 number.
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
# The longest span one request may ask for, so a typo cannot ask for centuries.
_MAX_DAYS: Final = 3660


@dataclass(slots=True)
class _Project:
    key: str  # the first id: data is derived from it, so a rename changes no value
    id: str
    name: str
    chains: tuple[str, ...]


def _number(value: Number) -> str | None:
    """``value`` as JSON number text with its exact digits, or ``None`` for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a metric value is a number or None, not a bool")
    text = repr(value) if isinstance(value, float) else str(value)
    if not _JSON_NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} is not a (finite) JSON number")
    return text


def _generated(
    seed: int, key: str, day: date, chain: str, metric: str, *, nulls: float
) -> str | None:
    """A value of (seed, project, day, chain, metric) alone, in one of six spellings."""
    d = hashlib.blake2b(f"{seed}|{key}|{day}|{chain}|{metric}".encode(), digest_size=16).digest()
    if d[0] < nulls * 256:
        return None
    n = int.from_bytes(d[2:12], "big")
    style = d[1] % 6
    if style == 0:
        return str(n % 10_000_000)  # 1234567
    if style == 1:
        return f"{n % 1_000_000}.{n % 10}0"  # 1234.50: a trailing zero to keep
    if style == 2:
        return f"0.{n % 10**12:012d}"  # 0.000123456789
    if style == 3:
        return f"{1 + n % 9}.{n % 10}e-{1 + n % 9}"  # 1.5e-7
    if style == 4:
        return f"{n % 10**20}.{n % 10**9:09d}"  # 12345678901234567890.123456789
    return f"{n % 100_000}.{1 + n % 9}"  # 1234.5


class TokenTerminalSimulator(RestSimulator):
    """
    A Token Terminal server (see the module docstring).

    Args:
        projects: project ids, or ids mapped to display names.
        metrics: the metric ids it knows; others are answered as ``NOT_FOUND`` errors.
        chains: the chains of every project, or per project id.
        seed: varies every generated value.
        today: the server's today (``None``: the UTC date when asked); rows end there.
        null_share: the share of generated values that are null.
        rate_limit, rate_headers, retry_after_format, api_keys: see
            :class:`.rest.RestSimulator`.
    """

    # "1000 requests per minute" (NOTES: poll sources), reported when no limit is set.
    nominal_limit = (1000, 60.0)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] = ("test-key",),
        projects: Iterable[str] | Mapping[str, str] = ("aave", "uniswap"),
        metrics: Iterable[str] = DEFAULT_METRICS,
        chains: Iterable[str] | Mapping[str, Iterable[str]] = ("ethereum", "arbitrum"),
        rate_limit: tuple[int, float] | None = None,
        rate_headers: RateHeaders = None,
        retry_after_format: RetryAfterFormat = "seconds",
        seed: int = 0,
        today: date | None = None,
        null_share: float = 0.05,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            api_keys=api_keys,
            rate_limit=rate_limit,
            rate_headers=rate_headers,
            retry_after_format=retry_after_format,
        )
        names = projects if isinstance(projects, Mapping) else {p: p.title() for p in projects}
        self.metrics = tuple(metrics)
        self.seed = seed
        self.today = today
        self.null_share = null_share
        #: Send 308 Locations as absolute URLs instead of paths.
        self.absolute_redirects = False
        self._projects: dict[str, _Project] = {}
        for pid, name in names.items():
            own = chains.get(pid, ()) if isinstance(chains, Mapping) else chains
            self._projects[pid] = _Project(pid, pid, name, tuple(own))
        self._moved: dict[str, _Project] = {}
        self._values: dict[tuple[str, date, str, str], str | None] = {}
        self._forbidden: set[str] = set()
        self._subscription_invalid = False
        self._bad_params = False

    # --- data --------------------------------------------------------------------------

    def current_day(self) -> date:
        """The last day rows are answered for: :attr:`today`, else the UTC date now."""
        return self.today or datetime.now(UTC).date()

    def project_id(self, project: str) -> str:
        """The current id of a project named by any id it had."""
        return self._project(project).id

    def value(self, project: str, day: date | str, chain: str, metric: str) -> str | None:
        """The value served now, as JSON number text (``None``: null)."""
        p, when = self._project(project), _day(day)
        key = (p.key, when, chain, metric)
        if key in self._values:
            return self._values[key]
        return _generated(self.seed, p.key, when, chain, metric, nulls=self.null_share)

    def set_value(
        self, project: str, day: date | str, chain: str, metric: str, value: Number
    ) -> None:
        """Serve ``value`` (exact digits: pass ``"1234.50"`` or a Decimal) from now on."""
        p = self._project(project)
        if chain not in p.chains:
            raise ValueError(f"{p.id} has no chain {chain!r}; it has {list(p.chains)}")
        if metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}; known: {list(self.metrics)}")
        self._values[(p.key, _day(day), chain, metric)] = _number(value)

    def restate(
        self, project: str, day: date | str, metric: str, value: Number, *, chain: str | None = None
    ) -> None:
        """Change a past day's value (on one chain, or every chain of the project)."""
        when = _day(day)
        if when >= self.current_day():
            raise ValueError(f"{when} is not a past day; use set_value for today")
        for each in (chain,) if chain else self._project(project).chains:
            self.set_value(project, when, each, metric, value)

    def rename(self, old: str, new: str) -> None:
        """The project ``old`` is ``new`` from now on; ``old`` answers 308 to it."""
        project = self._projects.get(old)
        if project is None:
            raise KeyError(f"no project is called {old!r} now")
        if new in self._projects:
            raise ValueError(f"{new!r} is already a project")
        del self._projects[old]
        project.id = new
        self._projects[new] = project
        self._moved.pop(new, None)
        self._moved[old] = project

    def forbid(self, project: str, forbidden: bool = True) -> None:
        """Answer 403 for this project (not in the plan), or stop doing so."""
        key = self._project(project).key
        if forbidden:
            self._forbidden.add(key)
        else:
            self._forbidden.discard(key)

    def subscription_invalid(self, invalid: bool = True) -> None:
        """Answer 402 to every authenticated request, or stop doing so."""
        self._subscription_invalid = invalid

    def bad_params(self, on: bool = True) -> None:
        """Answer 400 to every metrics request (as for a bad ``start``), or stop doing so."""
        self._bad_params = on

    def _project(self, ref: str) -> _Project:
        for project in self._projects.values():
            if ref in (project.id, project.key):
                return project
        if ref in self._moved:
            return self._moved[ref]
        raise KeyError(f"no project {ref!r}; known: {sorted(self._projects)}")

    # --- answering ---------------------------------------------------------------------

    def _routes(self) -> list[web.RouteDef]:
        return [web.get("/v2/projects/{project_id}/metrics", self._metrics, allow_head=False)]

    def _error(self, status: int, message: str) -> web.Response:
        body = {"code": HTTPStatus(status).name, "message": message}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    def _wrong_shape(self) -> bytes:
        return b'{"data": {"rows": "not a list"}, "errors": null}'

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._subscription_invalid:
            return self._error(402, "subscription not valid")
        pid = request.match_info["project_id"]
        moved = self._moved.get(pid)
        if moved is not None:
            query = f"?{request.query_string}" if request.query_string else ""
            location = f"/v2/projects/{moved.id}/metrics{query}"
            response = self._error(308, f"project {pid!r} is now {moved.id!r}")
            response.headers["Location"] = (
                self.url + location if self.absolute_redirects else location
            )
            return response
        project = self._projects.get(pid)
        if project is None:
            return self._error(404, f"no project {pid!r}")
        if project.key in self._forbidden:
            return self._error(403, "invalid access: the project is not in your plan")
        metric_ids = list(
            dict.fromkeys(m for m in request.query.get("metric_ids", "").split(",") if m)
        )
        start = _start(request.query.get("start", ""))
        today = self.current_day()
        if self._bad_params or start is None or not 0 <= (today - start).days <= _MAX_DAYS:
            return self._error(
                400, f"start must be a date YYYY-MM-DD from {_MAX_DAYS} days ago to today"
            )
        if not metric_ids:
            return self._error(400, "metric_ids is required: a comma-separated list")
        known = [m for m in metric_ids if m in self.metrics]
        unknown = [m for m in metric_ids if m not in self.metrics]
        return web.Response(
            body=self._body(project, known, unknown, start, today), content_type="application/json"
        )

    def _body(
        self, project: _Project, known: list[str], unknown: list[str], start: date, today: date
    ) -> bytes:
        # Written by hand: the numbers go out with exactly the digits chosen for them.
        head = (
            b'"project_id":'
            + orjson.dumps(project.id)
            + b',"project_name":'
            + orjson.dumps(project.name)
        )
        columns = [(metric, b"," + orjson.dumps(metric) + b":") for metric in known]
        rows = []
        for offset in range((today - start).days + 1):
            day = start + timedelta(days=offset)
            stamp = b'{"timestamp":"' + day.isoformat().encode() + b'T00:00:00.000Z",'
            for chain in project.chains:
                row = [stamp, head, b',"chain":', orjson.dumps(chain)]
                for metric, prefix in columns:
                    value = self.value(project.key, day, chain, metric)
                    row += [prefix, b"null" if value is None else value.encode()]
                rows.append(b"".join(row) + b"}")
        body = b'{"data":[' + b",".join(rows) + b"]"
        if unknown:
            errors = [{"code": "NOT_FOUND", "field": "metric_ids", "value": m} for m in unknown]
            body += b',"errors":' + orjson.dumps(errors)
        return body + b"}"


def _day(day: date | str) -> date:
    return day if isinstance(day, date) else date.fromisoformat(day)


def _start(text: str) -> date | None:
    # Only YYYY-MM-DD: date.fromisoformat would also take 20261117 and 2026-W47-2.
    if not _DATE.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def run_standalone(
    host: str,
    port: int,
    api_keys: Iterable[str],
    on_ready: Callable[[TokenTerminalSimulator], None] | None = None,
) -> None:
    """Serve a few projects at Token Terminal's documented 1000 requests/minute until Ctrl-C."""
    simulator = TokenTerminalSimulator(
        host=host,
        port=port,
        api_keys=api_keys,
        projects=("aave", "uniswap", "lido", "maker"),
        rate_limit=(1000, 60.0),
    )
    run_until_cancelled(simulator, on_ready)
