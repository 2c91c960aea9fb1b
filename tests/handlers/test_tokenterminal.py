"""
Tests for handlers/tokenterminal.py: the resource model, the plan, recorded answers of
CONTRACT §9, change detection by content, renames, and pinned ids. Offline: no sockets.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import ValidationError

from handlers import Quarantine
from handlers.polling import Page, PollProvider, PollRequest, Record, Renamed, content_hash
from handlers.terrapin import BondReference
from handlers.tokenterminal import PROVIDER, ProjectMetrics, TokenTerminal, parse_lookback
from tests.handlers.poll_contract import OBSERVED, PollProviderContract, dumps

TODAY = date(2026, 11, 24)
RESOURCE: dict[str, Any] = {
    "endpoint": "project_metrics",
    "projects": ["aave", "uniswap"],
    "metrics": ["fees", "revenue"],
    "lookback": "7d",
}
AAVE_TARGET = "/v2/projects/aave/metrics?metric_ids=fees,revenue&start=2026-11-17"
AAVE = PollRequest(method="GET", target=AAVE_TARGET, items=("aave",))


def row(day: str = "2026-11-20", chain: str = "ethereum", **metrics: Any) -> dict[str, Any]:
    return {
        "timestamp": f"{day}T00:00:00.000Z",
        "project_id": "aave",
        "project_name": "Aave",
        "chain": chain,
        **metrics,
    }


# Recorded-style answers: exact decimals, nulls, a metric column not asked for.
SAMPLE = (
    b'{"data": ['
    b'{"timestamp": "2026-11-20T00:00:00.000Z", "project_id": "aave", "project_name": "Aave",'
    b' "chain": "ethereum", "fees": 1234.50, "revenue": null, "tvl": 12345678901234567890.123456789},'
    b'{"timestamp": "2026-11-20T00:00:00.000Z", "project_id": "aave", "project_name": "Aave",'
    b' "chain": "arbitrum", "fees": 0.1, "revenue": 1e-7},'
    b'{"timestamp": "2026-11-21T00:00:00.000Z", "project_id": "aave", "project_name": "Aave",'
    b' "chain": "ethereum", "fees": 12345678901234567890.123456789, "revenue": 0}'
    b"]}"
)
PARTIAL = (
    b'{"data": [{"timestamp": "2026-11-22T00:00:00.000Z", "project_id": "aave",'
    b' "project_name": "Aave", "chain": "ethereum", "fees": 17}],'
    b' "errors": [{"code": "NOT_FOUND", "field": "metric_ids", "value": "revenue"}]}'
)
# Pinned answers: if these change, every id already published changes with them.
FIRST_SIGHT_ID = "9f813131-4efa-548b-a0a5-06fb6b02c937"
CHANGE_ID = "f417f51c-7bd4-530a-acc7-20351a4b1b70"
RENAME_ID = "e6676a50-7a56-5ccc-a20b-9986bd626de3"


class TestTokenTerminalContract(PollProviderContract):
    """The shared poll provider contract, with Token Terminal samples."""

    provider: ClassVar[PollProvider] = PROVIDER
    resource = RESOURCE
    today = TODAY
    valid_bodies = (SAMPLE, PARTIAL)
    invalid_bodies = (
        b"[]",
        b'"data"',
        b"{}",
        b'{"data": {"rows": []}}',
        b'{"data": [1, 2]}',
        dumps({"data": [row(fees="1234.5")]}),
        dumps({"data": [row(fees=True)]}),
        dumps({"data": [{**row(), "timestamp": "yesterday"}]}),
    )
    invalid_resources = (
        {**RESOURCE, "endpoint": "project_fees"},
        {**RESOURCE, "projects": []},
        {**RESOURCE, "metrics": ["fees", "fees"]},
        {**RESOURCE, "lookback": "0d"},
    )


def parse(body: bytes, request: PollRequest = AAVE) -> Page:
    result = PROVIDER.parse(request, body)
    assert isinstance(result, Page), result
    return result


def violation(body: bytes) -> Quarantine:
    result = PROVIDER.parse(AAVE, body)
    assert isinstance(result, Quarantine), result
    assert result.reason == "schema_violation"
    return result


def only(body: bytes) -> Record:
    (record,) = parse(body).records
    return record


def model(**changes: Any) -> ProjectMetrics:
    return ProjectMetrics.model_validate({**RESOURCE, **changes})


# --- the resource model ----------------------------------------------------------------


def test_resource_defaults_to_seven_days() -> None:
    """lookback defaults to 7 days; ids are kept in configured order."""
    resource = ProjectMetrics.model_validate({k: v for k, v in RESOURCE.items() if k != "lookback"})
    assert resource.lookback == 7
    assert resource.projects == ("aave", "uniswap")


@pytest.mark.parametrize(
    ("spelling", "days"),
    [("7d", 7), ("48h", 2), ("24h", 1), (" 30d ", 30), ("365d", 365), (30, 30), (1, 1)],
)
def test_lookback_spellings(spelling: object, days: int) -> None:
    """lookback takes whole days as Nd, a multiple of 24 hours as Nh, or an int of days."""
    assert parse_lookback(spelling) == days
    assert model(lookback=spelling).lookback == days


@pytest.mark.parametrize(
    "spelling", ["0d", "366d", "36h", "1h", "7w", "1.5d", "7", "", "d", 0, -1, 366, True, None, 7.0]
)
def test_bad_lookbacks_are_errors_at_their_key(spelling: object) -> None:
    """A lookback outside 1-365 whole days, or in another spelling, is an error at lookback."""
    with pytest.raises(ValidationError) as caught:
        model(lookback=spelling)
    (error,) = caught.value.errors()
    assert error["loc"] == ("lookback",)
    assert "lookback" in error["msg"]


@pytest.mark.parametrize("bad", ["Aave", "-aave", "aa ve", "", "a/b", "a?b=1", "é", "x" * 101, 5])
def test_bad_project_ids_are_named_at_their_index(bad: object) -> None:
    """A project id that is not a lower-case slug is an error at projects.<index>."""
    with pytest.raises(ValidationError) as caught:
        model(projects=["aave", bad])
    (error,) = caught.value.errors()
    assert error["loc"] == ("projects", 1)


def test_duplicates_and_empty_lists_are_errors() -> None:
    """Projects and metrics are non-empty and list each id once; the message names it."""
    with pytest.raises(ValidationError) as caught:
        model(projects=["aave", "uniswap", "aave"], metrics=[])
    errors = {error["loc"]: error["msg"] for error in caught.value.errors()}
    assert set(errors) == {("projects",), ("metrics",)}
    assert "'aave' is listed twice" in errors[("projects",)]


# --- the plan ---------------------------------------------------------------------------


def test_plan_is_one_get_per_project() -> None:
    """plan asks each project for the metrics from today - lookback, items = the project."""
    assert PROVIDER.plan(model(), aliases={}, today=TODAY) == [
        AAVE,
        PollRequest(
            method="GET",
            target="/v2/projects/uniswap/metrics?metric_ids=fees,revenue&start=2026-11-17",
            items=("uniswap",),
        ),
    ]


def test_plan_start_follows_lookback() -> None:
    """start is today minus lookback days (48h: two days)."""
    (request, _) = PROVIDER.plan(model(lookback="48h"), aliases={}, today=date(2026, 3, 1))
    assert request.target.endswith("&start=2026-02-27")


def test_plan_asks_renamed_projects_by_their_new_id() -> None:
    """A renamed project is asked by its current id and keeps its configured item."""
    (aave, uniswap) = PROVIDER.plan(model(), aliases={"aave": "aave-v3"}, today=TODAY)
    assert aave.target.startswith("/v2/projects/aave-v3/metrics?")
    assert aave.items == ("aave",)
    assert uniswap.items == ("uniswap",)


def test_plan_refuses_another_resource_type() -> None:
    """plan and describe take only this provider's resource model."""
    other = BondReference(endpoint="bond_reference", isins=("US0378331005",))
    with pytest.raises(TypeError):
        PROVIDER.plan(other, aliases={}, today=TODAY)
    with pytest.raises(TypeError):
        PROVIDER.describe(other)


def test_describe_and_auth_headers() -> None:
    """describe names the endpoint and projects; auth is a Bearer key."""
    assert PROVIDER.describe(model()) == "project_metrics:aave,uniswap"
    assert PROVIDER.auth_headers("k-1") == {"Authorization": "Bearer k-1"}
    assert (PROVIDER.name, PROVIDER.kind) == ("tokenterminal", "poll")
    assert isinstance(PROVIDER, TokenTerminal)


# --- answers ----------------------------------------------------------------------------


def test_rows_become_records_keyed_by_project_day_and_chain() -> None:
    """One record per row, keyed <configured project>|<day>|<chain>."""
    keys = [record.key for record in parse(SAMPLE).records]
    assert keys == [
        "aave|2026-11-20|ethereum",
        "aave|2026-11-20|arbitrum",
        "aave|2026-11-21|ethereum",
    ]


def test_exact_decimals_survive() -> None:
    """Numbers keep the provider's exact digits, as strings, in data and content."""
    first, second, third = parse(SAMPLE).records
    assert first.content == {"fees": "1234.50", "revenue": None}
    assert first.data["tvl"] == "12345678901234567890.123456789"
    assert second.content["fees"] == "0.1"
    assert Decimal(second.content["revenue"]) == Decimal("1e-7")
    assert third.content == {"fees": "12345678901234567890.123456789", "revenue": "0"}


def test_data_is_the_whole_row_and_content_the_requested_metrics() -> None:
    """data is the whole row (canonical); content only the metric ids asked for."""
    first = parse(SAMPLE).records[0]
    assert dict(first.data) == {
        "timestamp": "2026-11-20T00:00:00.000Z",
        "project_id": "aave",
        "project_name": "Aave",
        "chain": "ethereum",
        "fees": "1234.50",
        "revenue": None,
        "tvl": "12345678901234567890.123456789",
    }
    assert first.hash == content_hash({"fees": "1234.50", "revenue": None})


def test_a_missing_metric_column_is_none() -> None:
    """A requested metric without a column counts as null."""
    assert only(PARTIAL).content == {"fees": "17", "revenue": None}


def test_partial_errors_become_warnings() -> None:
    """An unknown metric id leaves the rows and becomes a warning naming it."""
    assert parse(PARTIAL).warnings == ("NOT_FOUND metric_ids revenue",)


def test_display_name_rename_and_extra_columns_are_not_changes() -> None:
    """Only the requested metric values are compared: names, ids and other columns are not."""
    base = only(dumps({"data": [row(fees=Decimal("1.5"), revenue=None)]}))
    other = only(
        dumps(
            {
                "data": [
                    {
                        **row(fees=Decimal("1.5"), revenue=None, tvl=Decimal(9)),
                        "project_id": "aave-v3",
                        "project_name": "Aave V3",
                    }
                ]
            }
        )
    )
    assert (other.key, other.hash) == (base.key, base.hash)
    assert other.data != base.data


def test_a_renamed_project_keeps_its_configured_key() -> None:
    """Rows answered for a renamed id are keyed by the configured project."""
    request = PollRequest("GET", AAVE_TARGET.replace("/aave/", "/aave-v3/"), ("aave",))
    body = dumps({"data": [{**row(fees=Decimal(1)), "project_id": "aave-v3"}]})
    assert parse(body, request).records[0].key == "aave|2026-11-20|ethereum"


def test_an_empty_answer_is_an_empty_page() -> None:
    """No rows is a page with no records (e.g. a project with no data yet)."""
    assert parse(b'{"data": []}') == Page(records=())


def test_repeated_rows_keep_the_last_with_a_warning() -> None:
    """Two rows for one (day, chain) give one record, the last, and a warning."""
    page = parse(dumps({"data": [row(fees=Decimal(1)), row(fees=Decimal(2))]}))
    assert [r.content["fees"] for r in page.records] == ["2"]
    assert page.warnings == ("1 rows repeat a (day, chain); the last one is kept",)


def test_dates_are_checked() -> None:
    """A timestamp must hold a real calendar date; a bare date is accepted."""
    assert (
        "data[0].timestamp"
        in violation(dumps({"data": [{**row(), "timestamp": "2026-02-30"}]})).detail
    )
    assert only(dumps({"data": [{**row(fees=Decimal(1)), "timestamp": "2026-11-20"}]})).key == (
        "aave|2026-11-20|ethereum"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": None}, "data[0].timestamp"),
        ({"chain": None}, "data[0].chain"),
        ({"chain": ""}, "data[0].chain"),
        ({"chain": 1}, "data[0].chain"),
        ({"fees": "1234.5"}, "data[0].fees"),
        ({"revenue": [1]}, "data[0].revenue"),
    ],
)
def test_schema_violations_name_the_field(change: dict[str, Any], field: str) -> None:
    """A row that does not fit is a schema_violation naming the field."""
    assert field in violation(dumps({"data": [{**row(), **change}]})).detail


def test_detail_names_fields_not_values() -> None:
    """A schema_violation detail never echoes the values."""
    secretish = "4242.4242-not-a-number"
    result = violation(dumps({"data": [row(fees=secretish)] * 9}))
    assert secretish not in result.detail
    assert result.detail.endswith("and 4 more")


def test_metric_ids_come_from_the_request() -> None:
    """The compared columns are the metric ids of the request's query."""
    request = PollRequest(
        "GET", "/v2/projects/aave/metrics?metric_ids=tvl&start=2026-11-17", ("aave",)
    )
    assert parse(SAMPLE, request).records[0].content == {"tvl": "12345678901234567890.123456789"}


# --- change detection -------------------------------------------------------------------


def page_of(*rows: dict[str, Any]) -> dict[str, Record]:
    return {record.key: record for record in parse(dumps({"data": list(rows)})).records}


def test_a_restated_past_day_changes_only_that_key() -> None:
    """Re-reading the lookback, a restated day changes that key's hash and no other."""
    days = ["2026-11-18", "2026-11-19", "2026-11-20"]
    before = page_of(*(row(d, fees=Decimal("10.0"), revenue=Decimal(1)) for d in days))
    after = page_of(
        row(days[0], fees=Decimal("10.0"), revenue=Decimal(1)),
        row(days[1], fees=Decimal("10.5"), revenue=Decimal(1)),
        row(days[2], fees=Decimal("10.0"), revenue=Decimal(1)),
    )
    changed = [key for key in before if before[key].hash != after[key].hash]
    assert changed == ["aave|2026-11-19|ethereum"]
    event = PROVIDER.change_event(after[changed[0]], before[changed[0]], observed=OBSERVED)
    assert event.data["changed"] == ["fees"]
    assert event.data["previous"] == {"fees": "10.0"}
    assert event.data["row"]["fees"] == "10.5"


def test_change_and_change_back_give_three_distinct_ids() -> None:
    """A -> B -> A: first sight, change and change back are three events with distinct ids."""
    a = only(dumps({"data": [row(fees=Decimal("1200.1"), revenue=None)]}))
    b = only(dumps({"data": [row(fees=Decimal("1234.5"), revenue=None)]}))
    again = only(dumps({"data": [row(fees=Decimal("1200.1"), revenue=None)]}))
    assert again == a
    ids = [
        PROVIDER.change_event(a, None, observed=OBSERVED).id,
        PROVIDER.change_event(b, a, observed=OBSERVED).id,
        PROVIDER.change_event(again, b, observed=OBSERVED).id,
    ]
    assert len(set(ids)) == 3


def test_known_answer_ids() -> None:
    """Pinned ids: first sight and a change of one row; a rename."""
    a = only(dumps({"data": [row(fees=Decimal("1200.1"), revenue=None)]}))
    b = only(dumps({"data": [row(fees=Decimal("1234.5"), revenue=None)]}))
    assert PROVIDER.change_event(a, None, observed=OBSERVED).id == FIRST_SIGHT_ID
    change = PROVIDER.change_event(b, a, observed=OBSERVED)
    assert change.id == CHANGE_ID
    assert change.type == "tokenterminal.project.metrics"
    assert change.time == OBSERVED
    assert change.data == {
        "row": dict(b.data),
        "changed": ["fees"],
        "previous": {"fees": "1200.1"},
    }
    renamed = PROVIDER.redirect(AAVE, "/v2/projects/aave-v3/metrics")
    assert renamed is not None
    assert PROVIDER.rename_event(renamed, observed=OBSERVED).id == RENAME_ID


def test_ids_do_not_depend_on_when_they_are_observed() -> None:
    """The id is a function of content, not of the observation time (lost state re-emits old ids)."""
    record = only(PARTIAL)
    later = OBSERVED.replace(year=2027)
    assert (
        PROVIDER.change_event(record, None, observed=OBSERVED).id
        == PROVIDER.change_event(record, None, observed=later).id
    )


# --- renames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "/v2/projects/aave-v3/metrics?metric_ids=fees,revenue&start=2026-11-17",
        "/v2/projects/aave-v3/metrics",
        "https://api.tokenterminal.com/v2/projects/aave-v3/metrics?metric_ids=fees,revenue&start=2026-11-17",
        "../aave-v3/metrics?metric_ids=fees,revenue&start=2026-11-17",
        " /v2/projects/aave%2Dv3/metrics ",
    ],
)
def test_a_308_to_a_new_project_id_is_a_rename(location: str) -> None:
    """A Location naming another project's metrics (relative or absolute) is a rename."""
    assert PROVIDER.redirect(AAVE, location) == Renamed(
        item="aave",
        old_id="aave",
        new_id="aave-v3",
        follow=PollRequest("GET", AAVE_TARGET.replace("/aave/", "/aave-v3/"), ("aave",)),
    )


def test_a_second_rename_keeps_the_configured_item() -> None:
    """A rename of an already renamed project names the current id as old, the item as configured."""
    request = PollRequest("GET", AAVE_TARGET.replace("/aave/", "/aave-v3/"), ("aave",))
    renamed = PROVIDER.redirect(request, "/v2/projects/aave-v4/metrics")
    assert renamed is not None
    assert (renamed.item, renamed.old_id, renamed.new_id) == ("aave", "aave-v3", "aave-v4")


@pytest.mark.parametrize(
    "location",
    [
        "/v2/projects/aave/metrics?metric_ids=fees",  # the same id: not a rename
        "/v2/projects/Aave-V3/metrics",  # not a project id
        "/v2/projects/a%2Fb/metrics",
        "/v2/projects/aave-v3/fees",
        "/v2/projects/aave-v3/metrics/extra",
        "/v2/projects//metrics",
        "http://[::1/v2/projects/x/metrics",  # not a URL
    ],
)
def test_other_redirects_are_not_renames(location: str) -> None:
    """A Location that does not name a new valid project id of the metrics endpoint is None."""
    assert PROVIDER.redirect(AAVE, location) is None


def test_rename_event() -> None:
    """A rename event names the old and new id; its id depends on both."""
    renamed = PROVIDER.redirect(AAVE, "/v2/projects/aave-v3/metrics")
    assert renamed is not None
    event = PROVIDER.rename_event(renamed, observed=OBSERVED)
    assert event.type == "tokenterminal.project.renamed"
    assert event.time == OBSERVED
    assert event.data == {"old_project_id": "aave", "new_project_id": "aave-v3"}
    orjson.dumps(dict(event.data))
    PROVIDER.data_models[event.type].model_validate(dict(event.data))
    other = PROVIDER.redirect(AAVE, "/v2/projects/aave-v4/metrics")
    assert other is not None
    assert PROVIDER.rename_event(other, observed=OBSERVED).id != event.id


def test_a_400_names_no_item() -> None:
    """Token Terminal's 400 is about the whole request: reject gives None."""
    body = b'{"message": "Invalid start date", "code": "BAD_REQUEST"}'
    assert PROVIDER.reject(AAVE, 400, body) is None


def test_state_is_kept_two_days_past_the_lookback() -> None:
    """A row's day leaves the polled range `lookback` days on; one more for time zones."""
    assert PROVIDER.state_ttl(model(lookback="7d")) == 9 * 86400
    assert PROVIDER.state_ttl(model(lookback="1d")) == 3 * 86400


def test_one_bad_row_is_set_aside_the_others_are_records() -> None:
    """
    One bad row (a null chain, a metric as a string) quarantined the whole answer:
    nothing of the project until the row left `lookback`, and then its day's other
    chains never came out at all. A malformed `errors` beside good rows is a warning.
    """
    bad = [{**row(), "chain": None}, row(fees="1234.5")]
    page = parse(dumps({"data": [row(), *bad], "errors": "NOT_FOUND"}))
    assert len(page.records) == 1 and page.rejected == tuple(bad)
    assert page.rejection is not None and page.rejection.reason == "schema_violation"
    assert page.rejection.detail.startswith("data[1].chain: expected a non-empty string")
    assert "data[2].fees" in page.rejection.detail
    assert "2 rows not valid were quarantined" in page.warnings
    assert any("errors" in w for w in page.warnings)
    assert violation(dumps({"data": bad})).detail == page.rejection.detail.replace(
        "data[1]", "data[0]"
    ).replace("data[2]", "data[1]")
