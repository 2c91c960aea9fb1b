"""
Tests for handlers/getstoken.py: the shared webhook contract plus every event type of
CONTRACT §5's table.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Literal

import orjson
import pytest

from handlers import Event, Quarantine, WebhookProvider
from handlers.getstoken import DATA_MODELS, PROVIDER, Settings

from .contract import WebhookProviderContract

# CONTRACT §5, written out again here so the handler's table is checked against it.
REQUIRED: dict[str, tuple[str, ...]] = {
    "user.created": ("user_id",),
    "user.updated": ("user_id",),
    "token.minted": ("tx_id", "user_id", "amount"),
    "token.transferred": ("tx_id", "from_user_id", "to_user_id", "amount"),
    "badge.issued": ("badge_id", "user_id", "badge_type"),
    "badge.revoked": ("badge_id", "user_id", "badge_type"),
    "achievement.progressed": ("achievement_id", "user_id", "progress"),
    "achievement.completed": ("achievement_id", "user_id"),
}

# Recorded-style sample data per type, with an extra field each (extras are kept).
SAMPLE_DATA: dict[str, dict[str, Any]] = {
    "user.created": {"user_id": "usr_1", "email_verified": False},
    "user.updated": {"user_id": "usr_1", "changes": ["display_name"]},
    "token.minted": {
        "tx_id": "tx_1",
        "user_id": "usr_1",
        "amount": "1000000000000000000000.000000000000000001",
        "reason": "signup",
    },
    "token.transferred": {
        "tx_id": "tx_2",
        "from_user_id": "usr_1",
        "to_user_id": "usr_2",
        "amount": "12.5",
        "memo": {"note": "thanks", "tags": [1, 2]},
    },
    "badge.issued": {"badge_id": "bdg_1", "user_id": "usr_1", "badge_type": "early_adopter"},
    "badge.revoked": {
        "badge_id": "bdg_1",
        "user_id": "usr_1",
        "badge_type": "early_adopter",
        "revoked_by": None,
    },
    "achievement.progressed": {"achievement_id": "ach_1", "user_id": "usr_1", "progress": 0.25},
    "achievement.completed": {"achievement_id": "ach_1", "user_id": "usr_1", "points": 50},
}
CREATED_AT = "2026-11-22T10:00:00.123Z"


def payload(
    type_: str = "badge.issued",
    data: dict[str, Any] | None = None,
    **envelope: Any,
) -> dict[str, Any]:
    body = {
        "id": f"evt_{type_.replace('.', '_')}",
        "type": type_,
        "created_at": CREATED_AT,
        "environment": "production",
        "data": copy.deepcopy(SAMPLE_DATA.get(type_, {}) if data is None else data),
    }
    body.update(envelope)
    return body


def body_of(value: Any) -> bytes:
    return orjson.dumps(value)


def parse(
    value: Any,
    *,
    environment: str = "production",
    unknown_types: Literal["publish", "quarantine"] = "publish",
) -> Event | Quarantine:
    raw = value if isinstance(value, bytes) else body_of(value)
    return PROVIDER.parse(raw, Settings(environment=environment, unknown_types=unknown_types), {})


def quarantined(value: Any, reason: str, **kwargs: Any) -> Quarantine:
    result = parse(value, **kwargs)
    assert isinstance(result, Quarantine), result
    assert result.reason == reason, result
    return result


def without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


class TestGetSmartTokenContract(WebhookProviderContract):
    """The shared webhook provider contract, for Get Smart Token."""

    provider: ClassVar[WebhookProvider] = PROVIDER
    settings: ClassVar[Mapping[str, Any]] = {"environment": "production"}
    strict_settings: ClassVar[Mapping[str, Any]] = {"unknown_types": "quarantine"}
    valid_bodies: ClassVar[list[bytes]] = [body_of(payload(t)) for t in SAMPLE_DATA]
    invalid_bodies: ClassVar[list[tuple[bytes, str]]] = [
        (b"[]", "schema_violation"),
        (b'"evt_1"', "schema_violation"),
        (b"null", "schema_violation"),
        (body_of(without(payload(), "id")), "schema_violation"),
        (
            body_of(payload("token.minted", {**SAMPLE_DATA["token.minted"], "amount": 1.5})),
            "schema_violation",
        ),
        (body_of(payload(environment="sandbox")), "environment_mismatch"),
        (body_of(payload("gift.sent", {"x": "y" * 200})), "unknown_type"),
        (body_of(payload(data={"user_id": "u", "badge_type": "b" * 500})), "schema_violation"),
    ]


def test_table_matches_contract() -> None:
    """The handler knows exactly the types of CONTRACT §5."""
    assert set(DATA_MODELS) == set(REQUIRED)


@pytest.mark.parametrize("type_", list(REQUIRED))
def test_every_type_is_an_event(type_: str) -> None:
    """Each known type becomes getstoken.<type> with its id, time and data as sent."""
    sent = payload(type_)
    event = parse(sent)
    assert isinstance(event, Event)
    assert event.id == sent["id"]
    assert event.type == f"getstoken.{type_}"
    assert event.time == datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC)
    assert event.data == sent["data"]


@pytest.mark.parametrize(
    ("type_", "field"), [(t, f) for t, fields in REQUIRED.items() for f in fields]
)
def test_missing_required_field_is_schema_violation(type_: str, field: str) -> None:
    """A known type missing any required data field is quarantined, naming the field."""
    result = quarantined(payload(type_, without(SAMPLE_DATA[type_], field)), "schema_violation")
    assert f"data.{field}" in result.detail


@pytest.mark.parametrize(
    ("type_", "field"),
    [(t, f) for t, fields in REQUIRED.items() for f in fields if f != "progress"],
)
def test_required_field_must_be_text(type_: str, field: str) -> None:
    """Ids and amounts given as numbers, null or empty strings are schema violations."""
    for bad in (1, None, "", ["x"]):
        data = {**SAMPLE_DATA[type_], field: bad}
        result = quarantined(payload(type_, data), "schema_violation")
        assert f"data.{field}" in result.detail


@pytest.mark.parametrize("type_", ["token.minted", "token.transferred"])
@pytest.mark.parametrize("amount", [1.5, 10, 0.1, 1e30, 12345678901234567890])
def test_amount_as_number_is_schema_violation(type_: str, amount: float) -> None:
    """An amount sent as a JSON number is quarantined, never converted through float."""
    data = {**SAMPLE_DATA[type_], "amount": amount}
    result = quarantined(payload(type_, data), "schema_violation")
    assert "data.amount" in result.detail


@pytest.mark.parametrize(
    "amount", ["1e5", "-1", "1,5", " 1", "1\n", "1.", ".5", "0x10", "NaN", "١", ""]
)
def test_amount_must_be_a_decimal_string(amount: str) -> None:
    """Amount strings that are not plain decimals are schema violations."""
    data = {**SAMPLE_DATA["token.minted"], "amount": amount}
    assert "data.amount" in quarantined(payload("token.minted", data), "schema_violation").detail


@pytest.mark.parametrize("amount", ["0", "7", "0.000000000000000001", "99999999999999999999999.99"])
def test_amount_string_kept_verbatim(amount: str) -> None:
    """A decimal-string amount passes and stays the exact string sent."""
    event = parse(payload("token.minted", {**SAMPLE_DATA["token.minted"], "amount": amount}))
    assert isinstance(event, Event)
    assert event.data["amount"] == amount


@pytest.mark.parametrize("progress", [0, 1, 0.5, 1.0, "0", "1", "0.25", "1.000"])
def test_progress_accepted(progress: Any) -> None:
    """progress is a number or decimal string from 0 to 1, kept as sent."""
    data = {**SAMPLE_DATA["achievement.progressed"], "progress": progress}
    event = parse(payload("achievement.progressed", data))
    assert isinstance(event, Event)
    assert event.data["progress"] == progress
    assert type(event.data["progress"]) is type(progress)


@pytest.mark.parametrize(
    "progress",
    [1.5, -0.1, 2, -1, "1.01", "-0", "abc", "", "NaN", "1e-1", "0.5\n", True, False, None, []],
)
def test_progress_out_of_range_or_wrong_type(progress: Any) -> None:
    """progress outside 0..1, or neither number nor decimal string, is a schema violation."""
    data = {**SAMPLE_DATA["achievement.progressed"], "progress": progress}
    result = quarantined(payload("achievement.progressed", data), "schema_violation")
    assert "data.progress" in result.detail


def test_extras_kept() -> None:
    """Extra data and envelope fields are allowed; data comes back exactly as sent."""
    data = {**SAMPLE_DATA["badge.issued"], "nested": {"a": [1, {"b": None}]}, "level": 3}
    sent = payload("badge.issued", data, api_version="2026-01-01", attempt=2)
    event = parse(sent)
    assert isinstance(event, Event)
    assert event.data == data
    assert list(event.data) == list(data)


@pytest.mark.parametrize(("source", "sent"), [("production", "sandbox"), ("sandbox", "production")])
def test_environment_mismatch(source: str, sent: str) -> None:
    """An event for the other environment is quarantined as environment_mismatch."""
    result = quarantined(payload(environment=sent), "environment_mismatch", environment=source)
    assert sent in result.detail
    assert source in result.detail


def test_sandbox_source_accepts_sandbox_events() -> None:
    """A sandbox source takes sandbox events."""
    assert isinstance(parse(payload(environment="sandbox"), environment="sandbox"), Event)


def test_unknown_environment_value_is_schema_violation() -> None:
    """An environment other than production or sandbox is a schema violation."""
    assert "environment" in quarantined(payload(environment="staging"), "schema_violation").detail


def test_unknown_type_published_by_default() -> None:
    """An unknown type is published as getstoken.<type> with its data as given."""
    data = {"anything": [1, "2"], "amount": 3.5}
    event = parse(payload("gift.sent", data))
    assert isinstance(event, Event)
    assert event.type == "getstoken.gift.sent"
    assert event.data == data


def test_unknown_type_quarantined_when_configured() -> None:
    """With unknown_types: quarantine, an unknown type is quarantined as unknown_type."""
    result = quarantined(payload("gift.sent", {}), "unknown_type", unknown_types="quarantine")
    assert "gift.sent" in result.detail


def test_environment_checked_before_type() -> None:
    """An unknown type from the wrong environment is an environment mismatch."""
    quarantined(
        payload("gift.sent", {}, environment="sandbox"),
        "environment_mismatch",
        unknown_types="quarantine",
    )


@pytest.mark.parametrize("field", ["id", "type", "created_at", "environment", "data"])
def test_envelope_field_required(field: str) -> None:
    """Each envelope field is required; its absence is a schema violation naming it."""
    assert field in quarantined(without(payload(), field), "schema_violation").detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 123),
        ("id", ""),
        ("id", "evt 1"),
        ("id", "e" * 256),
        ("type", ""),
        ("type", "badge issued"),
        ("type", "badge.#"),
        ("type", "badge..issued"),
        ("type", ".badge"),
        ("type", "a" * 246),
        ("type", 7),
        ("created_at", 1614265330),
        ("created_at", "1614265330"),
        ("created_at", "2026-11-22"),
        ("created_at", "2026-11-22T10:00:00"),
        ("created_at", "22/11/2026 10:00"),
        ("created_at", "2026-13-22T10:00:00Z"),
        ("data", []),
        ("data", "x"),
        ("data", None),
    ],
)
def test_envelope_field_malformed(field: str, value: Any) -> None:
    """Malformed envelope fields are schema violations naming the field."""
    result = quarantined({**payload(), field: value}, "schema_violation")
    assert result.detail.startswith(field)


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        ("2026-11-22T12:30:00+02:30", datetime(2026, 11, 22, 10, 0, tzinfo=UTC)),
        ("2026-11-22 10:00:00Z", datetime(2026, 11, 22, 10, 0, tzinfo=UTC)),
        ("2026-11-22t10:00:00.5z", datetime(2026, 11, 22, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-22T05:00:00-05:00", datetime(2026, 11, 22, 10, 0, tzinfo=UTC)),
        # A leap second (RFC 3339 allows it): the second before it, not a quarantine.
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("2016-12-31T15:59:60.25-08:00", datetime(2016, 12, 31, 23, 59, 59, 250000, tzinfo=UTC)),
    ],
)
def test_created_at_is_rfc3339(created_at: str, expected: datetime) -> None:
    """created_at takes RFC 3339 forms with any offset and becomes an aware time."""
    event = parse(payload(created_at=created_at))
    assert isinstance(event, Event)
    assert event.time == expected
    assert event.time is not None
    assert event.time.utcoffset() is not None


def test_created_at_offset_kept() -> None:
    """The event time keeps the instant the provider gave, whatever its offset."""
    event = parse(payload(created_at="2026-11-22T10:00:00+01:00"))
    assert isinstance(event, Event)
    assert event.time == datetime(2026, 11, 22, 10, 0, tzinfo=timezone(timedelta(hours=1)))


def test_detail_never_echoes_values() -> None:
    """A schema_violation detail names fields, not the values sent (they may be secret or huge)."""
    marker = "SECRET-VALUE-" + "x" * 100
    data = {**SAMPLE_DATA["token.minted"], "amount": marker, "tx_id": 5}
    result = quarantined(payload("token.minted", data), "schema_violation")
    assert marker not in result.detail
    assert "data.amount" in result.detail
    assert "data.tx_id" in result.detail


def test_detail_is_bounded_for_many_errors() -> None:
    """A payload with many problems gets a detail naming a few and counting the rest."""
    data = dict.fromkeys(REQUIRED["token.transferred"], 1)
    result = quarantined(payload("token.transferred", data, id=1, created_at=2), "schema_violation")
    assert len(result.detail) < 400


def test_same_body_same_id_across_retries() -> None:
    """A retried delivery of the same event keeps the provider's event id."""
    first = parse(payload("user.created"))
    retry = parse(orjson.dumps(payload("user.created"), option=orjson.OPT_INDENT_2))
    assert isinstance(first, Event)
    assert isinstance(retry, Event)
    assert first.id == retry.id == "evt_user_created"


def test_numbers_in_data_keep_their_digits_in_the_cloudevent() -> None:
    """An extra field past 64 bits is published as sent, not as the nearest double."""
    raw = body_of(payload("badge.issued")).replace(
        b'"data":{', b'"data":{"wei":123456789012345678901234567890,', 1
    )
    event = parse(raw)
    assert isinstance(event, Event)
    # (orjson writes the CloudEvent: listener.envelope.event_entry)
    assert b'"wei":123456789012345678901234567890' in orjson.dumps({"data": event.data})
