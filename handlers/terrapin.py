"""
Terrapin bond reference data (CONTRACT §9): the resource model, the poll plan, the
parser, 422 rejections and the events.

One configured resource polls its ISINs in batches of at most ``batch_size``::

    POST /api/v1/bond_reference   {"isins": ["US912810TM09", "US91282CJL55"]}

and every record of the answer ``{"data": [{"isin": ..., ...}], "total": n}`` becomes a
:class:`~handlers.polling.Record` keyed by its ISIN, whose content (and data) is the
whole record with numbers as the provider's exact decimal strings: Terrapin records
carry no ``updated_at``, so change is found by content only. An ISIN that Terrapin
does not know is simply absent. A 422 names malformed ISINs by JSON Pointer
(``/isins/3``, RFC 6901); :meth:`Terrapin.reject` turns it into those ISINs and a
retry of the batch without them.

Quarantine reasons from :meth:`Terrapin.parse`:

* ``invalid_json`` - not JSON (or not UTF-8);
* ``too_deep`` - JSON nested deeper than :data:`handlers.MAX_DEPTH` levels;
* ``schema_violation`` - not ``{"data": [records]}`` with a string ``isin`` per
  record; the detail names the fields, never values.

Pure: no I/O, no logging, no clock (``observed`` is passed in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from handlers import Event, NoSettings, Quarantine
from handlers.base import MAX_PROBLEMS
from handlers.polling import (
    Page,
    PollRequest,
    Record,
    Rejected,
    Renamed,
    canonical,
    canonical_hash,
    change_data,
    change_id,
    loads_exact,
    one_line,
    read_answer,
    schema_violation,
)

__all__ = [
    "MAX_BATCH",
    "NAME",
    "PROVIDER",
    "REFERENCE_TYPE",
    "TARGET",
    "BondChange",
    "BondRecord",
    "BondReference",
    "Terrapin",
    "batch_request",
    "isin_check_digit",
    "isin_valid",
]

NAME: Final = "terrapin"
REFERENCE_TYPE: Final = "terrapin.bond.reference"
TARGET: Final = "/api/v1/bond_reference"
# Terrapin answers at most this many ISINs per request (its docs; NOTES: poll sources).
MAX_BATCH: Final = 1000

# ISO 6166: a 2-letter country prefix, a 9-character national number, a check digit.
# (CONTRACT §9's example ISINs US912810TM06 and US91282CJL54 fail the check digit:
# with it they would be US912810TM09 and US91282CJL55.)
_ISIN: Final = re.compile(r"[A-Z]{2}[A-Z0-9]{9}[0-9]", re.ASCII)
# RFC 6901 array index into the request body's "isins".
_POINTER: Final = re.compile(r"/isins/(0|[1-9][0-9]{0,5})", re.ASCII)
_MAX_DETAIL: Final = 200


def isin_check_digit(prefix: str) -> int:
    """
    The ISO 6166 check digit of the first 11 characters of an ISIN.

    Letters become two digits (A=10 ... Z=35), then the Luhn algorithm runs over the
    digit string: every second digit from the right, starting with the rightmost,
    is doubled (the check digit will sit to its right).

    Raises:
        ValueError: a character that is not an upper-case letter or a digit.
    """
    if not re.fullmatch(r"[A-Z0-9]*", prefix, re.ASCII):
        raise ValueError("an ISIN holds upper-case letters and digits only")
    digits = "".join(str(int(char, 36)) for char in prefix)
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return (10 - total % 10) % 10


def isin_valid(text: object) -> bool:
    """Whether ``text`` is an ISIN: its format and its check digit (ISO 6166)."""
    return (
        isinstance(text, str)
        and _ISIN.fullmatch(text) is not None
        and isin_check_digit(text[:11]) == int(text[11])
    )


def _isin(value: str) -> str:
    shown = value[:24]
    if not _ISIN.fullmatch(value):
        raise ValueError(
            f"{shown!r} is not an ISIN: expected 12 characters, a 2-letter country code, "
            "9 upper-case letters or digits and a check digit (e.g. US912810TM09)"
        )
    expected = isin_check_digit(value[:11])
    if expected != int(value[11]):
        raise ValueError(f"{shown!r} is not a valid ISIN: its check digit should be {expected}")
    return value


Isin = Annotated[str, AfterValidator(_isin)]


class BondRecord(BaseModel):
    """A record as published: every number an exact decimal string (``"4.125"``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    isin: str


class BondChange(BaseModel):
    """``terrapin.bond.reference``: a record first seen or changed, and what changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: BondRecord
    #: The fields whose values differ (all of them on first sight).
    changed: list[str]
    #: Their earlier values (``null`` where a field was absent); ``null`` on first sight.
    previous: dict[str, Any] | None


class BondReference(BaseModel):
    """
    One ``resources:`` entry: ``{endpoint: bond_reference, isins: [US912810TM09, ...],
    batch_size: 1000}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Literal["bond_reference"]
    isins: tuple[Isin, ...]
    batch_size: int = Field(default=MAX_BATCH, ge=1, le=MAX_BATCH)

    @field_validator("isins")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Here rather than min_length, so a list of one bad ISIN gives one error, not two.
        if not value:
            raise ValueError("list at least one ISIN")
        seen: set[str] = set()
        for isin in value:
            if isin in seen:
                raise ValueError(f"{isin!r} is listed twice; list each ISIN once")
            seen.add(isin)
        return value


def batch_request(isins: tuple[str, ...]) -> PollRequest:
    """``POST /api/v1/bond_reference`` with ``{"isins": [...]}``; the ISINs are its items."""
    return PollRequest(
        method="POST", target=TARGET, items=isins, body=orjson.dumps({"isins": list(isins)})
    )


def _resource(resource: BaseModel) -> BondReference:
    if not isinstance(resource, BondReference):
        raise TypeError(f"expected a BondReference resource, got {type(resource).__name__}")
    return resource


class Terrapin:
    """
    The Terrapin poll provider (satisfies :class:`handlers.polling.PollProvider`).

    Stateless; the module-level :data:`PROVIDER` is the one instance.
    """

    name: str = NAME
    kind: Literal["poll"] = "poll"
    default_url: str = "https://terrapinfinance.com"  # (a source's url when it gives none)
    # No source keys of its own: what it polls is in each resource (resource_model).
    settings_model: type[BaseModel] = NoSettings
    resource_model: type[BaseModel] = BondReference
    data_models: Mapping[str, type[BaseModel]] = {REFERENCE_TYPE: BondChange}

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        """``Authorization: Bearer <key>``."""
        return {"Authorization": f"Bearer {api_key}"}

    def describe(self, resource: BaseModel) -> str:
        """``bond_reference:2 isins from US912810TM09`` (count and first ISIN)."""
        isins = _resource(resource).isins
        plural = "" if len(isins) == 1 else "s"
        return f"bond_reference:{len(isins)} isin{plural} from {isins[0]}"

    def state_ttl(self, resource: BaseModel) -> float | None:
        """``None``: every poll asks for every configured ISIN."""
        return None

    def plan(
        self, resource: BaseModel, *, aliases: Mapping[str, str], today: date
    ) -> list[PollRequest]:
        """One POST per batch of at most ``batch_size`` ISINs, in configured order."""
        res = _resource(resource)
        size = res.batch_size
        return [batch_request(res.isins[i : i + size]) for i in range(0, len(res.isins), size)]

    def parse(self, request: PollRequest, body: bytes) -> Page | Quarantine:
        """
        One record per ISIN answered. Never raises.

        ISINs asked for but not answered are simply absent; records for ISINs the
        request did not ask for are left out with a warning.
        """
        payload = read_answer(body)
        if isinstance(payload, Quarantine):
            return payload
        return self._page(request, payload)

    def _page(self, request: PollRequest, payload: Any) -> Page | Quarantine:
        if not isinstance(payload, dict):
            return schema_violation(["(body): expected a JSON object"])
        entries = payload.get("data")
        if not isinstance(entries, list):
            return schema_violation(["data: expected a list of records"])
        problems: list[str] = []
        rejected: list[Any] = []
        good: list[dict[str, Any]] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problem = f"data[{index}]: expected an object"
            elif not isinstance(entry.get("isin"), str) or not entry["isin"]:
                problem = f"data[{index}].isin: expected a non-empty string"
            else:
                good.append(entry)
                continue
            rejected.append(entry)
            if len(problems) < MAX_PROBLEMS:  # (not one string per entry of a bad answer)
                problems.append(problem)
        rejection = schema_violation(problems, len(rejected)) if rejected else None
        if rejection is not None and not good:  # no record valid: not the answer asked for
            return rejection
        asked = set(request.items)
        records: dict[str, Record] = {}
        unasked = 0
        for entry in good:
            isin: str = entry["isin"]
            if asked and isin not in asked:
                unasked += 1
                continue
            record = canonical(entry)
            records[isin] = Record(
                key=isin, data=record, content=record, hash=canonical_hash(record)
            )
        warnings = []
        if rejected:
            warnings.append(f"{len(rejected)} records not valid were quarantined")
        if unasked:
            warnings.append(f"{unasked} records for ISINs not asked for were left out")
        answered = len(good) - unasked
        if len(records) < answered:
            warnings.append(f"{answered - len(records)} records repeat an ISIN; the last is kept")
        return Page(tuple(records.values()), tuple(warnings), tuple(rejected), rejection)

    def redirect(self, request: PollRequest, location: str) -> Renamed | None:
        """Terrapin renames nothing: no redirect is a rename."""
        return None

    def reject(self, request: PollRequest, status: int, body: bytes) -> Rejected | None:
        """
        Read ``{"errors": [{"detail": ..., "source": {"pointer": "/isins/3"}}]}``.

        Returns:
            The ISINs the pointers name (indexes into the request's ISINs, which are
            its items in body order), a retry without them (``None`` when none is
            left) and a quarantine payload per ISIN; ``None`` when the body names no
            ISIN of the request (e.g. a 422 for the batch as a whole).
        """
        try:
            payload = loads_exact(body)
        except ValueError:
            return None
        errors = payload.get("errors") if isinstance(payload, dict) else None
        if not isinstance(errors, list):
            return None
        bad: dict[str, tuple[str, str]] = {}  # ISIN → (pointer, detail)
        for error in errors:
            source = error.get("source") if isinstance(error, dict) else None
            pointer = source.get("pointer") if isinstance(source, dict) else None
            match = _POINTER.fullmatch(pointer) if isinstance(pointer, str) else None
            if match is None or int(match[1]) >= len(request.items):
                continue
            detail = error.get("detail")
            text = (
                one_line(detail, _MAX_DETAIL)
                if isinstance(detail, str) and detail.strip()
                else "rejected"
            )
            bad.setdefault(request.items[int(match[1])], (match[0], text))
        if not bad:
            return None
        left = tuple(isin for isin in request.items if isin not in bad)
        return Rejected(
            items=tuple(bad),
            detail=one_line(
                "; ".join(f"{isin}: {detail}" for isin, (_, detail) in bad.items()), 500
            ),
            retry=batch_request(left) if left else None,
            payloads={
                isin: orjson.dumps(
                    {"isin": isin, "status": status, "pointer": pointer, "detail": detail}
                )
                for isin, (pointer, detail) in bad.items()
            },
        )

    def change_event(self, record: Record, previous: Record | None, *, observed: datetime) -> Event:
        """``terrapin.bond.reference`` with ``{"record", "changed", "previous"}``."""
        return Event(
            id=change_id(NAME, record.key, previous, record.hash),
            type=REFERENCE_TYPE,
            time=observed,
            data=change_data(record, previous, field="record"),
        )

    def rename_event(self, renamed: Renamed, *, observed: datetime) -> Event:
        """
        Never called: :meth:`redirect` never returns a rename.

        Raises:
            ValueError: always; Terrapin has no rename event.
        """
        raise ValueError(
            f"terrapin has no rename event (asked for {renamed.old_id!r} → {renamed.new_id!r}): "
            "its redirect() never reports a rename"
        )


PROVIDER: Final = Terrapin()
