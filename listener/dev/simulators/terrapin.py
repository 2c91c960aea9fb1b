"""
A Terrapin-compatible REST server (CONTRACT §9) for tests, the demo and benchmarks.

::

    async with TerrapinSimulator(monthly_quota=10_000) as sim:
        isins = sim.generate(5_000)                    # registered, with valid check digits
        POST {sim.url}/api/v1/bond_reference  {"isins": isins[:1000]}
        changed = sim.change_fraction(0.10, seed=1)    # 10% of the records change

It answers ``POST /api/v1/bond_reference`` with ``{"isins": [...]}`` (at most
``max_batch``) with ``{"data": [records], "total": n}``: a record for each registered
ISIN asked for (:meth:`~TerrapinSimulator.add_isins`, :meth:`~TerrapinSimulator.generate`);
other valid ISINs are simply absent. Records are derived from ``(seed, ISIN)`` and written
with exact JSON numbers (coupon ``4.125``, a price like ``99.5000``, an amount outstanding
beyond 64 bits); :meth:`~TerrapinSimulator.change` and
:meth:`~TerrapinSimulator.change_fraction` mutate them.

Answers: 422 ``{"errors": [{"detail", "source": {"pointer": "/isins/i"}}]}`` naming each
malformed ISIN (format or ISO 6166 check digit), or ``/isins`` for an empty or too long
list; 400 for a body that is not ``{"isins": [...]}``; 401
``{"errors": [{"detail": ...}]}``; 403 for ISINs outside the ``tier`` or past the
``monthly_quota`` (distinct ISINs per month; repeats are free); and the shared faults,
rate limit (default 100 per minute) and ledger of :class:`.rest.RestSimulator`, with IETF
``RateLimit`` / ``RateLimit-Policy`` headers on every answer.

The provider side is written from the contract and ISO 6166, not from
``handlers/terrapin.py``, so the two check each other.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Collection, Iterable
from datetime import date
from decimal import Decimal
from typing import Any, Final

import orjson
from aiohttp import web

from listener.dev.simulators.rest import (
    RateHeaders,
    RestSimulator,
    RetryAfterFormat,
    run_until_cancelled,
)

__all__ = ["TerrapinSimulator", "check_digit", "generate_isins", "is_isin", "run_standalone"]

_SHAPE: Final = re.compile(r"[A-Z]{2}[A-Z0-9]{9}[0-9]", re.ASCII)
_ALNUM: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CURRENCIES: Final = {"US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "JP": "JPY"}
_ISSUERS: Final = ("Acme Capital", "Northwind Energy", "Contoso Rail", "Globex Finance")
_DAY_COUNTS: Final = ("ACT/ACT", "30/360", "ACT/360", "ACT/365")
_RATINGS: Final = ("AAA", "AA+", "AA", "A-", "BBB", "BB+", None)


def check_digit(prefix: str) -> int:
    """
    The ISO 6166 check digit of an ISIN's first 11 characters: letters become 10-35,
    then Luhn over the digits, doubling from the rightmost one.
    """
    digits = [int(d) for char in prefix for d in str(_ALNUM.index(char))]
    total = 0
    for i, digit in enumerate(reversed(digits)):
        doubled = digit * 2 if i % 2 == 0 else digit
        total += doubled // 10 + doubled % 10
    return -total % 10


def is_isin(value: object) -> bool:
    """An ISIN: its shape and its check digit."""
    return (
        isinstance(value, str)
        and _SHAPE.fullmatch(value) is not None
        and check_digit(value[:11]) == int(value[11])
    )


def generate_isins(n: int, *, country: str = "US", seed: int = 0) -> list[str]:
    """``n`` distinct valid ISINs of ``country``, the same for the same seed."""
    found: dict[str, None] = {}
    counter = 0
    while len(found) < n:
        d = hashlib.blake2b(f"{seed}|{country}|{counter}".encode(), digest_size=16).digest()
        counter += 1
        body = country + "".join(_ALNUM[b % 36] for b in d[:8]) + str(d[8] % 10)
        found[body + str(check_digit(body))] = None
    return list(found)


def _json(value: Any) -> bytes:
    """A field value as JSON text; Decimals and ints keep their exact digits."""
    if isinstance(value, Decimal) and value.is_finite():
        return str(value).encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    return orjson.dumps(value)


def _record(seed: int, isin: str) -> dict[str, bytes]:
    """The reference fields of an ISIN, from (seed, ISIN) alone, as JSON texts."""
    d = hashlib.blake2b(f"{seed}|{isin}".encode(), digest_size=32).digest()
    country = isin[:2]
    government = d[0] % 3 == 0
    issued = date(2000 + d[4] % 26, 1 + d[5] % 12, 15)
    places = 2 + d[18] % 5
    price = f"{90 + d[16] % 20}.{int.from_bytes(d[19:22], 'big') % 10**places:0{places}d}"
    fields: dict[str, Any] = {
        "isin": isin,
        "issuer": f"{country} Treasury" if government else _ISSUERS[d[1] % len(_ISSUERS)],
        "issuer_country": country,
        "currency": _CURRENCIES.get(country, "USD"),
        "security_type": "government" if government else "corporate",
        "coupon": Decimal(f"{d[2] % 8}.{(d[3] % 8) * 125:03d}"),  # 4.125, 0.500, ...
        "coupon_frequency": (1, 2, 4)[d[6] % 3],
        "day_count": _DAY_COUNTS[d[7] % len(_DAY_COUNTS)],
        "issue_date": issued.isoformat(),
        "maturity_date": issued.replace(year=issued.year + (2, 5, 10, 30)[d[9] % 4]).isoformat(),
        "amount_outstanding": int.from_bytes(d[10:18], "big") * 1000,  # often past 2**64
        "face_value": (100, 1000)[d[22] % 2],
        "price": Decimal(price),
        "callable": bool(d[23] % 2),
        "rating": _RATINGS[d[24] % len(_RATINGS)],
    }
    return {name: _json(value) for name, value in fields.items()}


class TerrapinSimulator(RestSimulator):
    """
    A Terrapin server (see the module docstring).

    Args:
        isins: ISINs that have records (more with :meth:`add_isins`, :meth:`generate`).
        tier: the country codes or ISINs the key's tier includes (``None``: all);
            asking for others is 403.
        monthly_quota: distinct ISINs the key may ask for per month (``None``: no quota).
        max_batch: the most ISINs per request.
        seed: varies every generated record.
        rate_limit, rate_headers, retry_after_format, api_keys: see
            :class:`.rest.RestSimulator`.
    """

    nominal_limit = (100, 60.0)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] = ("test-key",),
        isins: Iterable[str] = (),
        tier: Collection[str] | None = None,
        monthly_quota: int | None = None,
        max_batch: int = 1000,
        rate_limit: tuple[int, float] | None = (100, 60.0),
        rate_headers: RateHeaders = "ietf",
        retry_after_format: RetryAfterFormat = "seconds",
        seed: int = 0,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            api_keys=api_keys,
            rate_limit=rate_limit,
            rate_headers=rate_headers,
            retry_after_format=retry_after_format,
        )
        self.tier = None if tier is None else frozenset(tier)
        self.monthly_quota = monthly_quota
        self.max_batch = max_batch
        self.seed = seed
        self._records: dict[str, dict[str, bytes]] = {}
        self._quota_seen: set[str] = set()
        self.add_isins(isins)

    # --- data --------------------------------------------------------------------------

    def add_isins(self, isins: Iterable[str]) -> None:
        """Give these ISINs records (kept if they have one already)."""
        for isin in isins:
            if not is_isin(isin):
                raise ValueError(f"{isin!r} is not a valid ISIN")
            if isin not in self._records:
                self._records[isin] = _record(self.seed, isin)

    def generate(self, n: int, *, country: str = "US", seed: int | None = None) -> list[str]:
        """Register ``n`` valid ISINs (:func:`generate_isins`) and return them."""
        isins = generate_isins(n, country=country, seed=self.seed if seed is None else seed)
        self.add_isins(isins)
        return isins

    @property
    def isins(self) -> list[str]:
        """The ISINs that have records, in registration order."""
        return list(self._records)

    def record(self, isin: str) -> dict[str, Any]:
        """The record served now, parsed with exact numbers (Decimal)."""
        record: dict[str, Any] = json.loads(
            self._record_json(isin), parse_float=Decimal, parse_int=Decimal
        )
        return record

    def change(self, isin: str, field: str, value: Any) -> None:
        """Set one field of a record (a new field too); Decimals keep their digits."""
        self._records[isin][field] = _json(value)

    def change_fraction(self, fraction: float, seed: int = 0) -> list[str]:
        """
        Change ``fraction`` of the records (their amount outstanding grows); returns the
        ISINs changed, the same ones for the same seed and registered ISINs.
        """
        count = round(len(self._records) * fraction)
        chosen = sorted(random.Random(seed).sample(sorted(self._records), count))  # noqa: S311 - test data
        for isin in chosen:
            fields = self._records[isin]
            current = fields.get("amount_outstanding", b"0")
            amount = int(current) if current.isdigit() else 0
            fields["amount_outstanding"] = str(amount + 1_000_000).encode()
        return chosen

    @property
    def quota_used(self) -> int:
        """Distinct ISINs asked for this month (of ``monthly_quota``)."""
        return len(self._quota_seen)

    def reset_quota(self) -> None:
        """Start a new month of quota."""
        self._quota_seen.clear()

    def _record_json(self, isin: str) -> bytes:
        fields = self._records[isin]
        return b"{" + b",".join(orjson.dumps(k) + b":" + v for k, v in fields.items()) + b"}"

    def _in_tier(self, isin: str) -> bool:
        return self.tier is None or isin in self.tier or isin[:2] in self.tier

    # --- answering ---------------------------------------------------------------------

    def _routes(self) -> list[web.RouteDef]:
        return [web.post("/api/v1/bond_reference", self._bond_reference)]

    def _error(self, status: int, message: str) -> web.Response:
        return self._errors(status, [{"detail": message}])

    @staticmethod
    def _errors(status: int, errors: list[dict[str, Any]]) -> web.Response:
        body = orjson.dumps({"errors": errors})
        return web.Response(status=status, body=body, content_type="application/json")

    def _wrong_shape(self) -> bytes:
        return b'{"data": "not a list", "total": "n/a"}'

    async def _bond_reference(self, request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            payload = None
        isins = payload.get("isins") if isinstance(payload, dict) else None
        if not isinstance(isins, list):
            return self._error(400, 'the body must be {"isins": [...]}')
        if not 1 <= len(isins) <= self.max_batch:
            detail = f"isins must hold 1 to {self.max_batch} ISINs, not {len(isins)}"
            return self._errors(422, [{"detail": detail, "source": {"pointer": "/isins"}}])
        malformed = [
            {"detail": f"{_shown(isin)} is not a valid ISIN", "source": {"pointer": f"/isins/{i}"}}
            for i, isin in enumerate(isins)
            if not is_isin(isin)
        ]
        if malformed:
            return self._errors(422, malformed)
        outside = [isin for isin in isins if not self._in_tier(isin)]
        if outside:
            return self._error(403, f"not included in your tier: {', '.join(outside[:10])}")
        new = set(isins) - self._quota_seen
        quota = self.monthly_quota
        if quota is not None and len(self._quota_seen) + len(new) > quota:
            return self._error(403, f"monthly ISIN quota used up ({self.quota_used} of {quota})")
        self._quota_seen |= new
        answered = [self._record_json(i) for i in dict.fromkeys(isins) if i in self._records]
        body = b'{"data":[' + b",".join(answered) + b'],"total":%d}' % len(answered)
        return web.Response(body=body, content_type="application/json")


def _shown(value: object) -> str:
    return repr(value[:24]) if isinstance(value, str) else "a non-string"


def run_standalone(
    host: str,
    port: int,
    api_keys: Iterable[str],
    on_ready: Callable[[TerrapinSimulator], None] | None = None,
) -> None:
    """Serve 1,000 generated ISINs at Terrapin's 100 requests/minute until Ctrl-C."""
    simulator = TerrapinSimulator(host=host, port=port, api_keys=api_keys)
    simulator.generate(1000)
    run_until_cancelled(simulator, on_ready)
