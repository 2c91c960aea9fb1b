"""
The poll transport's vocabulary (CONTRACT §9), shared by every REST poll provider.

A poll provider (``handlers/tokenterminal.py``, ``handlers/terrapin.py``) is pure: it
plans the HTTP requests of one configured resource, parses answers into keyed
:class:`Record` s, and reads the provider-specific parts of redirects (a renamed id)
and rejections (a malformed item named in a 422). The runtime
(``listener/sources/poll.py``) owns the HTTP client, the rate budget, retries,
schedules and the poll state; it never names a provider.

Change detection is by content, never by a ``>=`` cursor: a record's ``content`` (the
part that is compared) is hashed canonically (:func:`content_hash`: numbers as exact
decimal strings, key order and whitespace irrelevant). The id of a change event is a
UUIDv5 over the provider, the key, the previous hash and the new hash, and from a key's
third change on the number of changes before it (:func:`change_id`), so polling again
yields nothing new, a value that changes and changes back yields distinct ids, and so
does one that keeps flipping, and a lost poll state re-emits first-sight events with
their old ids.

Pure: no I/O, no logging, no clock (``today`` and ``observed`` are passed in).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel

from handlers import MAX_DEPTH, Event, Quarantine, name_problems, too_deep

__all__ = [
    "NAMESPACE",
    "Page",
    "PollProvider",
    "PollRequest",
    "Record",
    "Rejected",
    "Renamed",
    "canonical",
    "canonical_hash",
    "change_data",
    "change_id",
    "content_hash",
    "loads_exact",
    "one_line",
    "read_answer",
    "schema_violation",
    "uuid5",
]

# Fixed forever: change-event ids are UUIDv5 in this namespace (RFC 9562 §5.5).
NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://listener.invalid/poll#change-id")


@dataclass(frozen=True, slots=True)
class PollRequest:
    """
    One HTTP request of a poll plan.

    ``target`` is the path and query relative to the source's ``url``
    (``/v2/projects/aave/metrics?metric_ids=fees&start=2026-11-24``); ``body`` the JSON
    body of a POST. ``items`` are the configured things it asks for (project ids as
    configured, even after a rename; ISINs): the provider reads them back to key the
    records, and the runtime shows them when a request fails.
    """

    method: Literal["GET", "POST"]
    target: str
    items: tuple[str, ...]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """
    One keyed row of provider content, canonical (numbers as exact decimal strings).

    ``data`` is what the event shows (the whole row); ``content`` the part compared
    between polls (e.g. the metric columns, not the project's display name); ``hash``
    is :func:`content_hash` of ``content``.
    """

    key: str
    data: Mapping[str, Any]
    content: Mapping[str, Any]
    hash: str
    #: Of a record as last seen (the runtime's poll state): the changes of its key seen
    #: since its first sight (:func:`change_id`).
    changes: int = 0


@dataclass(frozen=True, slots=True)
class Page:
    """A successful answer: its records, and problems it reported beside them."""

    records: tuple[Record, ...]
    # Partial errors the provider answered beside the data (an unknown metric id).
    warnings: tuple[str, ...] = ()
    #: Rows of the answer that are not valid (kept together in one quarantine entry,
    #: named by ``rejection``), beside the valid ones (the records). When no row is
    #: valid the whole answer is a Quarantine instead.
    rejected: tuple[Any, ...] = ()
    rejection: Quarantine | None = None


@dataclass(frozen=True, slots=True)
class Renamed:
    """A redirect that names a new id for a configured item; poll ``follow`` instead."""

    item: str
    old_id: str
    new_id: str
    follow: PollRequest


@dataclass(frozen=True, slots=True)
class Rejected:
    """
    A 400/422 that names the items at fault: quarantine those (``invalid_params``) and
    send ``retry`` (the request without them; ``None`` when nothing is left).
    """

    items: tuple[str, ...]
    detail: str
    retry: PollRequest | None = None
    payloads: Mapping[str, bytes] = field(default_factory=dict)


@runtime_checkable
class PollProvider(Protocol):
    """A provider the listener polls over HTTP (see the module docstring)."""

    name: str
    kind: Literal["poll"]
    default_url: str  # the production endpoint: a source's url when it gives none
    #: The source keys only this provider understands (besides ``resources``).
    settings_model: type[BaseModel]
    #: The model of one entry of the source's ``resources:`` list.
    resource_model: type[BaseModel]
    #: The CloudEvent types this provider publishes (routing keys), each → the model of
    #: the ``data`` it builds (the poll contract suite checks every event it builds
    #: against it; the AsyncAPI document shows it).
    data_models: Mapping[str, type[BaseModel]]

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        """Headers that authenticate every request."""
        ...

    def describe(self, resource: BaseModel) -> str:
        """A short stable label of a resource for logs, ``/v1/sources`` and metrics."""
        ...

    def plan(
        self, resource: BaseModel, *, aliases: Mapping[str, str], today: date
    ) -> list[PollRequest]:
        """The requests of one poll of ``resource``; ``aliases`` maps renamed items."""
        ...

    def state_ttl(self, resource: BaseModel) -> float | None:
        """
        Seconds after its last change that a record's poll state may be forgotten,
        because a poll of ``resource`` no longer asks for its key (a day past the
        lookback); ``None``: never (every poll asks for every key).
        """
        ...

    def parse(self, request: PollRequest, body: bytes) -> Page | Quarantine:
        """Turn a 2xx body into records, or a verdict (``invalid_json``/``schema_violation``)."""
        ...

    def redirect(self, request: PollRequest, location: str) -> Renamed | None:
        """Read a 3xx ``Location``: a rename to follow, or ``None`` when it is not one."""
        ...

    def reject(self, request: PollRequest, status: int, body: bytes) -> Rejected | None:
        """Read a 400/422 body: the items at fault, or ``None`` when it names none."""
        ...

    def change_event(self, record: Record, previous: Record | None, *, observed: datetime) -> Event:
        """The event for a record seen first (``previous`` None) or changed."""
        ...

    def rename_event(self, renamed: Renamed, *, observed: datetime) -> Event:
        """The event for a rename."""
        ...


# -- exact numbers and canonical content ------------------------------------------------


def loads_exact(body: bytes | str) -> Any:
    """
    Parse JSON keeping every number's exact digits: numbers become ``Decimal``.

    Stricter than :func:`json.loads` where the result must stay publishable: bytes
    must be UTF-8 (RFC 8259 §8.1: no BOM, no UTF-16/32), and no string may hold a lone
    surrogate (a ``\\ud800`` escape is JSON but not Unicode text, and no encoder can
    write it back). Nesting is the caller's check (:func:`handlers.too_deep`); text
    nested past Python's recursion limit is not JSON this parser can read.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), not UTF-8 (``UnicodeError``),
            a lone surrogate, or nested past the recursion limit.
    """
    # json.loads(bytes) would also take UTF-16/32 and decode with "surrogatepass".
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    if isinstance(body, str):
        text.encode("utf-8")  # a str with a raw lone surrogate is not Unicode text
    try:
        value = json.loads(
            text, parse_float=Decimal, parse_int=Decimal, parse_constant=_no_constant
        )
    except RecursionError as exc:
        raise ValueError("nested too deeply to parse") from exc
    if "\\u" in text:
        _check_strings(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_strings(value: Any) -> None:
    # Only text with \u escapes can hold a lone surrogate: raw text was valid UTF-8.
    # Iterative, so a deep value cannot exhaust the stack here.
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone UTF-16 surrogate escape") from None


def canonical(value: Any) -> Any:
    """``value`` with every ``Decimal`` (and int/float) as its exact decimal string."""
    # Exact types first (the hot path: parsed JSON has only these), ABCs after.
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return value
    if kind is dict:
        return {str(k): canonical(v) for k, v in value.items()}
    if kind is list:
        return [canonical(v) for v in value]
    if isinstance(value, Decimal | int | float):
        return str(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [canonical(v) for v in value]
    return str(value)


def content_hash(content: Mapping[str, Any]) -> str:
    """SHA-256 over canonical JSON (sorted keys, no whitespace) of ``canonical(content)``."""
    return canonical_hash(canonical(content))


def canonical_hash(content: Mapping[str, Any]) -> str:
    """
    :func:`content_hash` of content that is canonical already (from :func:`canonical`).

    The bytes are those of ``json.dumps(content, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)``, written by orjson (the same for canonical values: strings,
    ``None``, booleans, lists and objects), which is several times faster.
    """
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def uuid5(*parts: str) -> str:
    """``uuid5(NAMESPACE, json.dumps(parts))``: no part can make two names collide."""
    return str(uuid.uuid5(NAMESPACE, json.dumps(list(parts), separators=(",", ":"))))


def change_id(provider: str, key: str, previous: Record | None, new_hash: str) -> str:
    """
    The id of a change event (CONTRACT §9): a UUIDv5 of the provider, the key, the
    previous and the new hash; from a key's third change on, also of how many changes
    came before it. A value flapping A→B→A→B gave its fourth change the id of its
    second, and the journal (as a consumer would) dropped it as a duplicate, for the
    whole dedupe window: every later flip was lost. Polling again still yields nothing
    new (the count is part of the poll state, restored with it).
    """
    if previous is None:
        return uuid5(provider, key, "", new_hash)
    if previous.changes < 2:
        return uuid5(provider, key, previous.hash, new_hash)
    return uuid5(provider, key, previous.hash, new_hash, str(previous.changes))


def change_data(record: Record, previous: Record | None, *, field: str) -> dict[str, Any]:
    """
    ``{field: data, "changed": [...], "previous": {...} or None}`` (CONTRACT §9).

    ``changed`` names the compared fields whose values differ (all of them on first
    sight); ``previous`` holds their earlier values, ``None`` on first sight.
    """
    now = record.content
    if previous is None:
        return {field: dict(record.data), "changed": sorted(now), "previous": None}
    before = previous.content
    # A field gone counts as a change even from null: the content (and its hash) differs,
    # and a change event naming no change said nothing.
    changed = sorted(
        k for k in set(now) | set(before) if (k in now) != (k in before) or now[k] != before[k]
    )
    return {
        field: dict(record.data),
        "changed": changed,
        "previous": {k: before.get(k) for k in changed},
    }


def one_line(value: object, limit: int) -> str:
    """``value`` on one line of at most ``limit`` characters (details go to logs and headers)."""
    text = value if isinstance(value, str) else str(canonical(value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_violation(problems: Sequence[str], total: int | None = None) -> Quarantine:
    """A ``schema_violation`` naming the first problems, and how many more there are."""
    return Quarantine("schema_violation", name_problems(problems, total))


# Each value of an answer costs ~200 bytes parsed (a Decimal in a list): a body of
# `[1,1,1,...]` under the 64 MiB read limit took gigabytes and stalled the loop for
# seconds. A comma (or more) separates every two values, so counting them bounds the
# values before anything is parsed; the largest real answers hold a few hundred thousand.
MAX_VALUES = 2_000_000


def read_answer(body: bytes) -> Any:
    """
    A 2xx body parsed with :func:`loads_exact`, or the verdict: ``invalid_json`` (not
    JSON, not UTF-8, not publishable) or ``too_deep``. Never raises.
    """
    if body.count(b",") >= MAX_VALUES:
        return Quarantine("schema_violation", f"(body): more than {MAX_VALUES} values, not read")
    try:
        payload = loads_exact(body)
    except ValueError as exc:
        return Quarantine("invalid_json", f"not JSON: {one_line(str(exc), 200)}")
    if too_deep(payload, raw=body):
        return Quarantine("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    return payload
