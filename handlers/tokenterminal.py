"""
Token Terminal project metrics (CONTRACT §9): the resource model, the poll plan, the
parser and the events.

One configured resource polls each project once::

    GET /v2/projects/{project_id}/metrics?metric_ids=fees,revenue&start=2026-11-17

and every answer row (one per day and chain, a column per metric) becomes a
:class:`~handlers.polling.Record` keyed ``<configured project>|<YYYY-MM-DD>|<chain>``.
Its ``content`` is the requested metric columns only, so a display-name change or a
rename is not a change; its ``data`` is the whole row with numbers as the provider's
exact decimal strings. A renamed project answers 308 to its new id (:meth:`redirect`);
the key keeps the configured name, so history continues across the rename.

Quarantine reasons from :meth:`TokenTerminal.parse`:

* ``invalid_json`` - not JSON (or not UTF-8);
* ``too_deep`` - JSON nested deeper than :data:`handlers.MAX_DEPTH` levels;
* ``schema_violation`` - not ``{"data": [rows]}`` with a timestamp, a chain and
  number-or-null metric columns per row; the detail names the fields, never values.

Pure: no I/O, no logging, no clock (``today`` and ``observed`` are passed in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode, urljoin, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, field_validator

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
    one_line,
    read_answer,
    schema_violation,
    uuid5,
)

__all__ = [
    "METRICS_TYPE",
    "NAME",
    "PROVIDER",
    "RENAMED_TYPE",
    "MetricsChange",
    "MetricsRow",
    "ProjectMetrics",
    "ProjectRenamed",
    "TokenTerminal",
    "metrics_target",
    "parse_lookback",
]

NAME: Final = "tokenterminal"
METRICS_TYPE: Final = "tokenterminal.project.metrics"
RENAMED_TYPE: Final = "tokenterminal.project.renamed"

# Token Terminal's project and metric ids: lower-case slugs ("aave", "arbitrum-one",
# "active_users"). Checked on config and on every id a 308 names, so a Location can
# never smuggle a path or query into the next request.
_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]*", re.ASCII)
_MAX_ID: Final = 100
_LOOKBACK: Final = re.compile(r"(\d{1,6})\s*([dh])", re.ASCII)
_MAX_LOOKBACK_DAYS: Final = 365
# A row's day: RFC 3339 full-date, optionally followed by the time the provider adds
# ("2026-11-20T00:00:00.000Z"). The key uses the date as written.
_TIMESTAMP: Final = re.compile(
    r"(\d{4}-\d{2}-\d{2})(?:[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?)?",
    re.ASCII,
)
# The path of the metrics endpoint, under whatever base path the source URL has.
_METRICS_PATH: Final = re.compile(r"(?:^|/)v2/projects/([^/]+)/metrics\Z")
_MAX_WARNINGS: Final = 20


def _id(value: str) -> str:
    if len(value) > _MAX_ID or not _ID.fullmatch(value):
        raise ValueError(
            f"{value[:_MAX_ID]!r} is not an id: use lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit (at most 100 characters)"
        )
    return value


def parse_lookback(value: object) -> int:
    """
    A lookback in whole days: ``"7d"``, ``"48h"`` (a multiple of 24h) or an int of days.

    Raises:
        ValueError: another spelling, hours that are not whole days, or outside
            1 to 365 days.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a lookback such as 7d or 48h, or a number of days")
    if isinstance(value, int):
        days = value
    elif match := _LOOKBACK.fullmatch(value.strip()):
        amount, unit = int(match[1]), match[2]
        if unit == "h" and amount % 24:
            raise ValueError(
                "lookback must be whole days: the API is asked from a date, "
                "so use a multiple of 24h or days such as 7d"
            )
        days = amount // 24 if unit == "h" else amount
    else:
        raise ValueError("expected a lookback such as 7d or 48h, or a number of days")
    if not 1 <= days <= _MAX_LOOKBACK_DAYS:
        raise ValueError("lookback must be from 1 day (1d, 24h) to 365 days (365d)")
    return days


Id = Annotated[str, AfterValidator(_id)]
Lookback = Annotated[int, BeforeValidator(parse_lookback)]


class MetricsRow(BaseModel):
    """
    A row as published: a column per metric (an exact decimal string such as
    ``"12.50"``, or ``null``) and whatever else the provider sent, numbers as strings.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    timestamp: str
    chain: str


class MetricsChange(BaseModel):
    """``tokenterminal.project.metrics``: a row first seen or changed, and what changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row: MetricsRow
    #: The metrics whose values differ (all of them on first sight).
    changed: list[str]
    #: Their earlier values; ``null`` on first sight.
    previous: dict[str, str | None] | None


class ProjectRenamed(BaseModel):
    """``tokenterminal.project.renamed``: a 308 moved a project to a new id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    old_project_id: str
    new_project_id: str


class ProjectMetrics(BaseModel):
    """
    One ``resources:`` entry: ``{endpoint: project_metrics, projects: [aave, uniswap],
    metrics: [fees, revenue], lookback: 7d}``. ``lookback`` is held in days.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Literal["project_metrics"]
    projects: tuple[Id, ...]
    metrics: tuple[Id, ...]
    lookback: Lookback = 7

    @field_validator("projects", "metrics")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Here rather than min_length, so a list of one bad id gives one error, not two.
        if not value:
            raise ValueError("list at least one id")
        seen: set[str] = set()
        for item in value:
            if item in seen:
                raise ValueError(f"{item!r} is listed twice; list each id once")
            seen.add(item)
        return value


def metrics_target(project_id: str, metrics: tuple[str, ...] | list[str], start: date) -> str:
    """``/v2/projects/{project_id}/metrics?metric_ids=a,b&start=YYYY-MM-DD``."""
    # The comma stays literal, as in the provider's docs; ids are slugs anyway.
    query = urlencode({"metric_ids": ",".join(metrics), "start": start.isoformat()}, safe=",")
    return f"/v2/projects/{quote(project_id, safe='')}/metrics?{query}"


def _resource(resource: BaseModel) -> ProjectMetrics:
    if not isinstance(resource, ProjectMetrics):
        raise TypeError(f"expected a ProjectMetrics resource, got {type(resource).__name__}")
    return resource


def _requested(request: PollRequest) -> tuple[str | None, list[str]]:
    """The project id in the request's path and the metric ids of its query."""
    split = urlsplit(request.target)
    match = _METRICS_PATH.search(split.path)
    project = unquote(match[1]) if match else None
    values = parse_qs(split.query).get("metric_ids", [])
    metrics = [m for value in values for m in value.split(",") if m]
    return project, list(dict.fromkeys(metrics))


def _item(request: PollRequest, fallback: str | None) -> str:
    # The configured project, kept across renames; plan() always sets it.
    return request.items[0] if request.items else fallback or ""


def _row_problems(index: int, row: object, metrics: list[str]) -> list[str]:
    where = f"data[{index}]"
    if not isinstance(row, dict):
        return [f"{where}: expected an object"]
    problems: list[str] = []
    timestamp = row.get("timestamp")
    match = _TIMESTAMP.fullmatch(timestamp) if isinstance(timestamp, str) else None
    if match is None or not _is_date(match[1]):
        problems.append(f"{where}.timestamp: expected an RFC 3339 date or date-time")
    chain = row.get("chain")
    if not isinstance(chain, str) or not chain:
        problems.append(f"{where}.chain: expected a non-empty string")
    for metric in metrics:
        value = row.get(metric)
        if value is not None and not isinstance(value, Decimal):
            problems.append(f"{where}.{metric}: expected a number or null")
    return problems


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _warnings(errors: object) -> tuple[list[str], list[str]]:
    """(warnings, problems) from the answer's ``errors`` array of partial failures."""
    if errors is None:
        return [], []
    if not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors):
        return [], ["errors: expected a list of objects"]
    warnings = []
    for entry in errors[:_MAX_WARNINGS]:
        parts = [one_line(entry.get(k), 64) for k in ("code", "field", "value") if k in entry]
        warnings.append(" ".join(parts) or "an error without code, field or value")
    if len(errors) > _MAX_WARNINGS:
        warnings.append(f"and {len(errors) - _MAX_WARNINGS} more errors")
    return warnings, []


class TokenTerminal:
    """
    The Token Terminal poll provider (satisfies :class:`handlers.polling.PollProvider`).

    Stateless; the module-level :data:`PROVIDER` is the one instance.
    """

    name: str = NAME
    kind: Literal["poll"] = "poll"
    default_url: str = "https://api.tokenterminal.com"  # (a source's url when it gives none)
    # No source keys of its own: what it polls is in each resource (resource_model).
    settings_model: type[BaseModel] = NoSettings
    resource_model: type[BaseModel] = ProjectMetrics
    data_models: Mapping[str, type[BaseModel]] = {
        METRICS_TYPE: MetricsChange,
        RENAMED_TYPE: ProjectRenamed,
    }

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        """``Authorization: Bearer <key>``."""
        return {"Authorization": f"Bearer {api_key}"}

    def describe(self, resource: BaseModel) -> str:
        """``project_metrics:aave,uniswap``."""
        return f"project_metrics:{','.join(_resource(resource).projects)}"

    def state_ttl(self, resource: BaseModel) -> float | None:
        """
        ``lookback`` and two days: a row is first seen on or after its day, and its day
        leaves what a poll asks for ``lookback`` days later (one more for time zones).
        """
        return (_resource(resource).lookback + 2) * 86400.0

    def plan(
        self, resource: BaseModel, *, aliases: Mapping[str, str], today: date
    ) -> list[PollRequest]:
        """
        One GET per configured project, from ``today - lookback`` on.

        ``aliases`` maps a configured project to the id it was renamed to; the request
        keeps the configured project as its item.
        """
        res = _resource(resource)
        start = today - timedelta(days=res.lookback)
        return [
            PollRequest(
                method="GET",
                target=metrics_target(aliases.get(project, project), res.metrics, start),
                items=(project,),
            )
            for project in res.projects
        ]

    def parse(self, request: PollRequest, body: bytes) -> Page | Quarantine:
        """
        One record per row, keyed ``<configured project>|<day>|<chain>``. Never raises.

        The answer's ``errors`` (e.g. an unknown metric id) become ``Page.warnings``.
        """
        payload = read_answer(body)
        if isinstance(payload, Quarantine):
            return payload
        return self._page(request, payload)

    def _page(self, request: PollRequest, payload: Any) -> Page | Quarantine:
        if not isinstance(payload, dict):
            return schema_violation(["(body): expected a JSON object"])
        rows = payload.get("data")
        if not isinstance(rows, list):
            return schema_violation(["data: expected a list of rows"])
        requested, metrics = _requested(request)
        warnings, problems = _warnings(payload.get("errors"))
        warnings.extend(problems)  # (a malformed partial error is no reason to drop rows)
        rejected: list[Any] = []
        good: list[dict[str, Any]] = []
        named: list[str] = []
        total = 0
        for index, row in enumerate(rows):
            found = _row_problems(index, row, metrics)
            if not found:
                good.append(row)
                continue
            rejected.append(row)
            total += len(found)
            if len(named) < MAX_PROBLEMS:  # (not one string per row of a bad answer)
                named.extend(found)
        rejection = schema_violation(named[:MAX_PROBLEMS], total) if rejected else None
        if rejection is not None and not good:  # no row valid: not the answer asked for
            return rejection
        if rejected:
            warnings.append(f"{len(rejected)} rows not valid were quarantined")
        project = _item(request, requested)
        records: dict[str, Record] = {}
        for row in good:
            day = str(row["timestamp"])[:10]
            key = f"{project}|{day}|{row['chain']}"
            content = {metric: canonical(row.get(metric)) for metric in metrics}
            records[key] = Record(
                key=key, data=canonical(row), content=content, hash=canonical_hash(content)
            )
        if len(records) < len(good):
            warnings.append(
                f"{len(good) - len(records)} rows repeat a (day, chain); the last one is kept"
            )
        return Page(tuple(records.values()), tuple(warnings), tuple(rejected), rejection)

    def redirect(self, request: PollRequest, location: str) -> Renamed | None:
        """
        A 308 to ``/v2/projects/{new_id}/metrics`` (relative or absolute) is a rename.

        The follow-up keeps the request's own query and items; the Location's host is
        ignored (requests always go to the source's URL, with its key).
        """
        old_id, _ = _requested(request)
        try:
            path = urlsplit(urljoin(request.target, location.strip())).path
        except ValueError:
            return None
        match = _METRICS_PATH.search(path)
        if old_id is None or match is None:
            return None
        new_id = unquote(match[1])
        if new_id == old_id or len(new_id) > _MAX_ID or not _ID.fullmatch(new_id):
            return None
        query = urlsplit(request.target).query
        target = f"/v2/projects/{quote(new_id, safe='')}/metrics" + (f"?{query}" if query else "")
        return Renamed(
            item=_item(request, old_id),
            old_id=old_id,
            new_id=new_id,
            follow=PollRequest(method=request.method, target=target, items=request.items),
        )

    def reject(self, request: PollRequest, status: int, body: bytes) -> Rejected | None:
        """Token Terminal's 400 names no single item: the whole resource is at fault."""
        return None

    def change_event(self, record: Record, previous: Record | None, *, observed: datetime) -> Event:
        """``tokenterminal.project.metrics`` with ``{"row", "changed", "previous"}``."""
        return Event(
            id=change_id(NAME, record.key, previous, record.hash),
            type=METRICS_TYPE,
            time=observed,
            data=change_data(record, previous, field="row"),
        )

    def rename_event(self, renamed: Renamed, *, observed: datetime) -> Event:
        """``tokenterminal.project.renamed`` with the old and the new project id."""
        return Event(
            id=uuid5(NAME, "renamed", renamed.old_id, renamed.new_id),
            type=RENAMED_TYPE,
            time=observed,
            data={"old_project_id": renamed.old_id, "new_project_id": renamed.new_id},
        )


PROVIDER: Final = TokenTerminal()
