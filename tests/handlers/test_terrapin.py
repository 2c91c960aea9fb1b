"""
Tests for handlers/terrapin.py: ISIN check digits, the resource model, batching,
recorded answers of CONTRACT §9, 422 pointers, and pinned ids. Offline: no sockets.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from handlers import Quarantine
from handlers.polling import Page, PollProvider, PollRequest, Record, Renamed, content_hash
from handlers.terrapin import (
    PROVIDER,
    BondReference,
    Terrapin,
    batch_request,
    isin_check_digit,
    isin_valid,
)
from tests.handlers.poll_contract import OBSERVED, PollProviderContract, dumps

# Real ISINs (Apple, BAE Systems, Alphabet, BAE plc, Bayer, Toyota), and the ISINs of
# CONTRACT §9's example with the check digits ISO 6166 gives them.
VALID = (
    "US0378331005",
    "AU0000XVGZA3",
    "US38259P5089",
    "GB0002634946",
    "DE000BAY0017",
    "JP3435000009",
    "US912810TM09",
    "US91282CJL55",
)
BOND = "US912810TM09"
NOTE = "US91282CJL55"
RESOURCE: dict[str, Any] = {"endpoint": "bond_reference", "isins": [BOND, NOTE], "batch_size": 1000}


def isin(n: int, country: str = "US") -> str:
    """The n-th valid ISIN of a country, for bulk tests."""
    prefix = f"{country}{n:09d}"
    return prefix + str(isin_check_digit(prefix))


def record(code: str = BOND, **changes: Any) -> dict[str, Any]:
    return {
        "isin": code,
        "issuer": "United States Treasury",
        "currency": "USD",
        "coupon": Decimal("4.125"),
        "maturity_date": "2053-08-15",
        "amount_outstanding": Decimal("71234567000000000000000000"),
        "price": Decimal("99.50"),
        "callable": False,
        "ratings": {"sp": "AA+", "moodys": None},
        **changes,
    }


SAMPLE = (
    b'{"data": [{"isin": "US912810TM09", "issuer": "United States Treasury",'
    b' "currency": "USD", "coupon": 4.125, "maturity_date": "2053-08-15",'
    b' "amount_outstanding": 71234567000000000000000000, "price": 99.50, "callable": false,'
    b' "ratings": {"sp": "AA+", "moodys": null}}], "total": 1}'
)
BOTH = dumps({"data": [record(BOND), record(NOTE, coupon=Decimal("4.5"))], "total": 2})
# Pinned answers: if these change, every id already published changes with them.
FIRST_SIGHT_ID = "3f761e6f-f2d1-500f-a596-31b9a9658117"
CHANGE_ID = "3429be1c-0923-50a6-9cc7-449a99f3e5a7"


class TestTerrapinContract(PollProviderContract):
    """The shared poll provider contract, with Terrapin samples."""

    provider: ClassVar[PollProvider] = PROVIDER
    resource = RESOURCE
    valid_bodies = (SAMPLE, BOTH)
    invalid_bodies = (
        b"[]",
        b"{}",
        b'{"data": null, "total": 0}',
        b'{"data": {"US912810TM09": {}}}',
        b'{"data": ["US912810TM09"]}',
        b'{"data": [{"issuer": "United States Treasury", "coupon": 4.125}]}',
        b'{"data": [{"isin": 912810, "coupon": 4.125}]}',
        b'{"data": [{"isin": "", "coupon": 4.125}]}',
    )
    invalid_resources = (
        {**RESOURCE, "isins": ["US912810TM06"]},
        {**RESOURCE, "isins": []},
        {**RESOURCE, "batch_size": 1001},
        {**RESOURCE, "endpoint": "bond_prices"},
    )


def request(*isins: str) -> PollRequest:
    return batch_request(isins or (BOND, NOTE))


def parse(body: bytes, req: PollRequest | None = None) -> Page:
    result = PROVIDER.parse(req or request(), body)
    assert isinstance(result, Page), result
    return result


def only(body: bytes) -> Record:
    (rec,) = parse(body).records
    return rec


def model(**changes: Any) -> BondReference:
    return BondReference.model_validate({**RESOURCE, **changes})


# --- ISINs ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", VALID)
def test_valid_isins(code: str) -> None:
    """Real ISINs, letters in the national number included, pass the check digit."""
    assert isin_valid(code)
    assert isin_check_digit(code[:11]) == int(code[11])


@pytest.mark.parametrize("code", VALID)
def test_any_changed_digit_is_invalid(code: str) -> None:
    """Changing any one digit of a valid ISIN makes it invalid (Luhn catches it)."""
    for position, char in enumerate(code):
        if char.isdigit():
            for other in "0123456789".replace(char, ""):
                assert not isin_valid(code[:position] + other + code[position + 1 :])


def test_the_contract_example_isins_fail_their_check_digit() -> None:
    """CONTRACT §9's US912810TM06 and US91282CJL54 have wrong check digits (9 and 5)."""
    assert not isin_valid("US912810TM06")
    assert not isin_valid("US91282CJL54")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "US037833100",
        "US03783310055",
        "us0378331005",
        "US037833100X",
        "1S0378331005",
        "US03783310-5",
    ],
)
def test_malformed_isins_are_invalid(bad: str) -> None:
    """Wrong length, lower case, a letter as check digit or a digit as country are invalid."""
    assert not isin_valid(bad)


@pytest.mark.parametrize("bad", [None, 378331005, b"US0378331005", ["US0378331005"]])
def test_non_strings_are_invalid(bad: object) -> None:
    """isin_valid takes anything and says no to what is not a string."""
    assert not isin_valid(bad)


@given(prefix=st.from_regex(r"[A-Z]{2}[A-Z0-9]{9}", fullmatch=True))
def test_the_check_digit_completes_any_prefix(prefix: str) -> None:
    """Any 11-character prefix plus isin_check_digit is a valid ISIN, and only that digit."""
    digit = isin_check_digit(prefix)
    assert [d for d in range(10) if isin_valid(f"{prefix}{d}")] == [digit]


# --- the resource model ----------------------------------------------------------------


def test_resource_defaults() -> None:
    """batch_size defaults to 1000, Terrapin's most."""
    assert BondReference(endpoint="bond_reference", isins=(BOND,)).batch_size == 1000


def test_a_bad_isin_is_named_with_its_check_digit() -> None:
    """An ISIN with a wrong check digit is an error at isins.<index> naming it and the digit."""
    with pytest.raises(ValidationError) as caught:
        model(isins=[NOTE, "US912810TM06"])
    (error,) = caught.value.errors()
    assert error["loc"] == ("isins", 1)
    assert "'US912810TM06'" in error["msg"]
    assert "check digit should be 9" in error["msg"]


@pytest.mark.parametrize("bad", ["us912810tm09", "US912810TM0", "", "US-12810TM09", 912810])
def test_malformed_isins_are_errors(bad: object) -> None:
    """A malformed ISIN is an error at its index."""
    with pytest.raises(ValidationError) as caught:
        model(isins=[bad])
    assert [error["loc"] for error in caught.value.errors()] == [("isins", 0)]


def test_duplicate_isins_are_errors() -> None:
    """Each ISIN is listed once."""
    with pytest.raises(ValidationError, match="'US912810TM09' is listed twice"):
        model(isins=[BOND, NOTE, BOND])


@pytest.mark.parametrize("size", [0, -1, 1001])
def test_batch_size_is_one_to_a_thousand(size: int) -> None:
    """batch_size outside 1..1000 is an error at batch_size."""
    with pytest.raises(ValidationError) as caught:
        model(batch_size=size)
    assert [error["loc"] for error in caught.value.errors()] == [("batch_size",)]


# --- the plan ---------------------------------------------------------------------------


def test_plan_posts_the_isins() -> None:
    """One POST of {"isins": [...]} to /api/v1/bond_reference; items are its ISINs."""
    (only_request,) = PROVIDER.plan(model(), aliases={}, today=TestTerrapinContract.today)
    assert only_request.method == "POST"
    assert only_request.target == "/api/v1/bond_reference"
    assert only_request.items == (BOND, NOTE)
    assert only_request.body is not None
    assert orjson.loads(only_request.body) == {"isins": [BOND, NOTE]}


def test_plan_batches_in_configured_order() -> None:
    """2,500 ISINs in batches of 1,000 are three requests: 1,000, 1,000 and 500, in order."""
    isins = [isin(n) for n in range(2500)]
    plan = PROVIDER.plan(model(isins=isins), aliases={}, today=TestTerrapinContract.today)
    assert [len(r.items) for r in plan] == [1000, 1000, 500]
    assert [i for r in plan for i in r.items] == isins
    for r in plan:
        assert r.body is not None
        assert orjson.loads(r.body) == {"isins": list(r.items)}


def test_plan_with_small_batches() -> None:
    """batch_size 2 splits three ISINs into two requests."""
    plan = PROVIDER.plan(
        model(isins=[BOND, NOTE, VALID[0]], batch_size=2),
        aliases={},
        today=TestTerrapinContract.today,
    )
    assert [r.items for r in plan] == [(BOND, NOTE), (VALID[0],)]


def test_describe_and_auth_headers() -> None:
    """describe counts the ISINs and names the first; auth is a Bearer key."""
    assert PROVIDER.describe(model()) == "bond_reference:2 isins from US912810TM09"
    assert PROVIDER.describe(model(isins=[NOTE])) == "bond_reference:1 isin from US91282CJL55"
    assert PROVIDER.auth_headers("k-1") == {"Authorization": "Bearer k-1"}
    assert (PROVIDER.name, PROVIDER.kind) == ("terrapin", "poll")
    assert isinstance(PROVIDER, Terrapin)


# --- answers ----------------------------------------------------------------------------


def test_records_are_keyed_by_isin_with_exact_decimals() -> None:
    """A record is keyed by its ISIN; numbers keep their exact digits; content is the record."""
    rec = only(SAMPLE)
    assert rec.key == BOND
    assert rec.data["coupon"] == "4.125"
    assert rec.data["price"] == "99.50"
    assert rec.data["amount_outstanding"] == "71234567000000000000000000"
    assert rec.data["ratings"] == {"sp": "AA+", "moodys": None}
    assert rec.content == rec.data
    assert rec.hash == content_hash(rec.data)


def test_an_unknown_isin_is_simply_absent() -> None:
    """An ISIN asked for but not answered has no record; it is not an error."""
    page = parse(b'{"data": [], "total": 0}')
    assert page == Page(records=())
    assert [r.key for r in parse(SAMPLE).records] == [BOND]


def test_records_for_isins_not_asked_for_are_left_out() -> None:
    """A record for an ISIN the batch did not ask for is left out, with a warning."""
    page = parse(dumps({"data": [record(BOND), record(VALID[0])]}), request(BOND))
    assert [r.key for r in page.records] == [BOND]
    assert page.warnings == ("1 records for ISINs not asked for were left out",)


def test_repeated_isins_keep_the_last() -> None:
    """Two records for one ISIN give one record, the last, with a warning."""
    page = parse(dumps({"data": [record(coupon=Decimal(1)), record(coupon=Decimal(2))]}))
    assert [r.data["coupon"] for r in page.records] == ["2"]
    assert page.warnings == ("1 records repeat an ISIN; the last is kept",)


def test_total_is_not_relied_on() -> None:
    """A missing or odd total does not matter: the records are what counts."""
    assert only(dumps({"data": [record()]})) == only(dumps({"data": [record()], "total": "x"}))


def test_any_field_change_is_a_change() -> None:
    """Records have no updated_at: any changed field changes the hash, and is named."""
    before = only(dumps({"data": [record()]}))
    after = only(dumps({"data": [record(ratings={"sp": "AA", "moodys": None})]}))
    assert before.hash != after.hash
    event = PROVIDER.change_event(after, before, observed=OBSERVED)
    assert event.type == "terrapin.bond.reference"
    assert event.data["changed"] == ["ratings"]
    assert event.data["previous"] == {"ratings": {"sp": "AA+", "moodys": None}}
    assert event.data["record"] == dict(after.data)


def test_change_and_change_back_give_three_distinct_ids() -> None:
    """A -> B -> A: three events with distinct ids."""
    a = only(dumps({"data": [record()]}))
    b = only(dumps({"data": [record(coupon=Decimal("4.25"))]}))
    ids = {
        PROVIDER.change_event(a, None, observed=OBSERVED).id,
        PROVIDER.change_event(b, a, observed=OBSERVED).id,
        PROVIDER.change_event(a, b, observed=OBSERVED).id,
    }
    assert len(ids) == 3


def test_known_answer_ids() -> None:
    """Pinned ids of a first sight and of a change."""
    a = only(SAMPLE)
    b = only(dumps({"data": [record(coupon=Decimal("4.25"))]}))
    assert PROVIDER.change_event(a, None, observed=OBSERVED).id == FIRST_SIGHT_ID
    assert PROVIDER.change_event(b, a, observed=OBSERVED).id == CHANGE_ID


def test_schema_violation_names_the_field_not_the_value() -> None:
    """A record without a string isin is a schema_violation naming data[i].isin only."""
    result = PROVIDER.parse(request(), dumps({"data": [{"isin": 4242424242}]}))
    assert isinstance(result, Quarantine)
    assert result.detail == "data[1].isin: expected a non-empty string".replace("[1]", "[0]")
    assert "4242424242" not in result.detail


def test_one_bad_record_is_set_aside_the_others_are_records() -> None:
    """
    One `{"isin": null}` among a thousand quarantined the whole batch, for as long as
    the provider sent it: no change of the others was seen meanwhile.
    """
    result = PROVIDER.parse(request(), dumps({"data": [record(), {"isin": None}, 7]}))
    assert isinstance(result, Page)
    assert [r.key for r in result.records] == [BOND]
    assert result.rejected == ({"isin": None}, 7)
    assert result.rejection == Quarantine(
        "schema_violation",
        "data[1].isin: expected a non-empty string; data[2]: expected an object",
    )
    assert "2 records not valid were quarantined" in result.warnings


# --- rejections -------------------------------------------------------------------------


def errors(*pointers: str, detail: str = "invalid ISIN") -> bytes:
    return dumps({"errors": [{"detail": detail, "source": {"pointer": p}} for p in pointers]})


def test_a_422_names_isins_by_pointer() -> None:
    """Pointers /isins/i name the batch's ISINs; the retry asks for the others."""
    batch = request(*VALID[:5])
    rejected = PROVIDER.reject(batch, 422, errors("/isins/1", "/isins/3"))
    assert rejected is not None
    assert rejected.items == (VALID[1], VALID[3])
    assert rejected.retry == batch_request((VALID[0], VALID[2], VALID[4]))
    assert rejected.detail == f"{VALID[1]}: invalid ISIN; {VALID[3]}: invalid ISIN"
    assert orjson.loads(rejected.payloads[VALID[3]]) == {
        "isin": VALID[3],
        "status": 422,
        "pointer": "/isins/3",
        "detail": "invalid ISIN",
    }
    assert set(rejected.payloads) == set(rejected.items)


def test_a_422_naming_every_isin_leaves_no_retry() -> None:
    """When every ISIN of the batch is named, there is nothing to retry."""
    rejected = PROVIDER.reject(request(BOND), 422, errors("/isins/0", "/isins/0"))
    assert rejected is not None
    assert rejected.items == (BOND,)
    assert rejected.retry is None


@pytest.mark.parametrize(
    "body",
    [
        errors("/isins"),  # the batch as a whole (e.g. more than 1000)
        errors("/isins/2"),  # out of range
        errors("/isins/01"),  # not an RFC 6901 array index
        errors("/isins/-"),
        errors("/isin/0"),
        dumps({"errors": [{"detail": "bad", "source": {"parameter": "isins"}}]}),
        dumps({"errors": [{"detail": "bad"}]}),
        b'{"errors": []}',
        b"<html>Unprocessable</html>",
    ],
)
def test_a_rejection_that_names_no_isin_is_none(body: bytes) -> None:
    """A 400/422 that names no ISIN of the request gives None (the resource is invalid_params)."""
    assert PROVIDER.reject(request(), 422, body) is None


def test_rejection_details_are_one_short_line() -> None:
    """A provider detail is kept to one short line; a missing one reads 'rejected'."""
    long = PROVIDER.reject(request(), 422, errors("/isins/0", detail="bad\n" * 200))
    assert long is not None
    assert "\n" not in long.detail
    assert len(long.detail) <= 500
    bare = PROVIDER.reject(request(), 422, dumps({"errors": [{"source": {"pointer": "/isins/1"}}]}))
    assert bare is not None
    assert bare.detail == f"{NOTE}: rejected"


def test_redirects_are_never_renames() -> None:
    """Terrapin renames nothing: redirect is always None and there is no rename event."""
    assert PROVIDER.redirect(request(), "/api/v1/bond_reference") is None
    renamed = Renamed(item=BOND, old_id=BOND, new_id=NOTE, follow=request())
    with pytest.raises(ValueError, match="no rename event"):
        PROVIDER.rename_event(renamed, observed=OBSERVED)


def test_records_keep_extra_reference_fields() -> None:
    """Every reference field is kept in data, canonical (nested numbers as strings too)."""
    rec = only(
        dumps({"data": [record(schedule=[{"date": "2026-02-15", "rate": Decimal("2.0625")}])]})
    )
    assert rec.data["schedule"] == [{"date": "2026-02-15", "rate": "2.0625"}]
    assert isinstance(rec, Record)


def test_state_is_kept_for_good() -> None:
    """Every poll asks for every ISIN: no record's state is ever forgotten."""
    assert PROVIDER.state_ttl(model()) is None


def test_a_field_gone_from_null_is_named_as_changed() -> None:
    """
    Null then absent hash apart, so it is a change, and the event named none:
    `"changed": []`, one such event per ISIN when a provider stops sending null fields.
    """
    before = only(dumps({"data": [record(BOND, call_date=None)]}))
    after = only(dumps({"data": [{k: v for k, v in record(BOND).items() if k != "call_date"}]}))
    assert "call_date" in before.content and "call_date" not in after.content
    assert before.hash != after.hash
    data = PROVIDER.change_event(after, before, observed=OBSERVED).data
    assert data["changed"] == ["call_date"] and data["previous"] == {"call_date": None}
