"""
Tests for handlers/layerx402.py: recorded frames of every type and channel of
CONTRACT §6, the verdicts for what does not fit, stable ids and the frame builders.
Offline: no sockets.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers import CloseKind, Event, Quarantine, StreamProvider, load_provider
from handlers.layerx402 import (
    NAMESPACE,
    PROVIDER,
    AuthOk,
    ErrorFrame,
    EventFrame,
    Ping,
    ServerFrame,
    Subscribed,
    Unparseable,
    Unsubscribed,
    auth_frame,
    event_id,
    parse_frame,
    pong_frame,
    subscribe_frame,
    subscription_key,
    unsubscribe_frame,
)

from .stream_contract import StreamProviderContract

SOL = "So11111111111111111111111111111111111111112"
USDC = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
WALLET = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
SIGNATURE = (
    "5VERv8NMvzbJMEkV8xnrLkEaWRtSz9CosKDYjCJjBRnbJLgp8uirBgmQpjKhoR4tjF3ZpRzrFmBV6UjKdiSZkQUW"
)

# CONTRACT §6, written out again here so the handler's table is checked against it.
REQUIRED: dict[str, tuple[str, ...]] = {
    "token": ("mint", "price_usd", "updated_at"),
    "trades": ("signature", "mint", "side", "amount", "price_usd", "wallet", "ts"),
    "portfolio": ("wallet", "mint", "balance", "ts"),
}
DECIMALS: dict[str, tuple[str, ...]] = {
    "token": ("price_usd",),
    "trades": ("amount", "price_usd"),
    "portfolio": ("balance",),
}
TIMES: dict[str, str] = {"token": "updated_at", "trades": "ts", "portfolio": "ts"}
TYPES: dict[str, str] = {
    "token": "layerx402.token",
    "trades": "layerx402.trade",
    "portfolio": "layerx402.portfolio",
}

# Recorded-style event data per channel, each with extra fields (they are kept).
SAMPLE_DATA: dict[str, dict[str, Any]] = {
    "token": {
        "mint": SOL,
        "price_usd": "143.220117",
        "updated_at": 1763805600123,
        "volume_24h_usd": "1823311.20",
        "holders": 1204311,
    },
    "trades": {
        "signature": SIGNATURE,
        "mint": SOL,
        "side": "buy",
        "amount": "12.500000000",
        "price_usd": "143.22",
        "wallet": WALLET,
        "ts": 1763805600200,
        "slot": 301234567,
        "venue": {"name": "raydium", "pool": None},
    },
    "portfolio": {
        "wallet": WALLET,
        "mint": USDC,
        "balance": "1000000000000000000000.000000000000000001",
        "ts": 1763805600456,
        "value_usd": "250.00",
    },
}
# Pinned answers: if these change, every id already published changes with them.
KNOWN_IDS: dict[str, str] = {
    "token": "76e512a0-0224-59d1-91fe-a5ed13469080",
    "trades": "840159cc-6a7d-5945-9a3c-e602ab2c53fe",
    "portfolio": "196aa06a-2a4e-5d0f-8be8-de71be9524a4",
}
PARAMS: dict[str, dict[str, str]] = {
    "token": {"mint": SOL},
    "trades": {"mint": SOL},
    "portfolio": {"wallet": WALLET},
}

NOT_JSON: tuple[str | bytes, ...] = (
    "",
    " ",
    "{",
    "not json",
    '{"type": "ping",}',
    b"\xff\xfe\x00",
    b'{"type": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate is not UTF-8
    "NaN",
    '{"type": "event", "seq": 1e400}',
)

FRAME_TYPES = (AuthOk, ErrorFrame, Subscribed, Unsubscribed, EventFrame, Ping, Unparseable)


def event_frame(
    channel: str,
    data: Any,
    *,
    seq: Any = 7,
    subscription: str = "sub_1",
) -> bytes:
    return orjson.dumps(
        {
            "type": "event",
            "subscription": subscription,
            "channel": channel,
            "seq": seq,
            "data": data,
        }
    )


def parsed_event(channel: str, data: Any, **kwargs: Any) -> EventFrame:
    frame = parse_frame(event_frame(channel, data, **kwargs))
    assert isinstance(frame, EventFrame), frame
    return frame


def verdict(channel: str, data: Any) -> Quarantine:
    result = parsed_event(channel, data).result
    assert isinstance(result, Quarantine), result
    return result


# --- control frames ------------------------------------------------------------------


def test_auth_ok() -> None:
    """auth_ok parses to AuthOk."""
    assert parse_frame('{"type": "auth_ok"}') == AuthOk()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '{"type": "error", "code": "UNAUTHORIZED", "message": "invalid api key"}',
            ErrorFrame(
                id=None, code="UNAUTHORIZED", message="invalid api key", kind="unauthorized"
            ),
        ),
        (
            '{"type": "error", "id": "r1", "code": "FORBIDDEN", "message": "no access"}',
            ErrorFrame(id="r1", code="FORBIDDEN", message="no access", kind="forbidden"),
        ),
        (
            '{"type": "error", "id": "r2", "code": "INVALID_PARAMS", "message": "mint missing"}',
            ErrorFrame(
                id="r2", code="INVALID_PARAMS", message="mint missing", kind="invalid_params"
            ),
        ),
        (
            '{"type": "error", "code": "RATE_LIMITED", "message": "slow down", "retry_after": 2.5}',
            ErrorFrame(
                id=None,
                code="RATE_LIMITED",
                message="slow down",
                retry_after=2.5,
                kind="rate_limited",
            ),
        ),
        (
            '{"type": "error", "code": "RATE_LIMITED", "retry_after": 3}',
            ErrorFrame(
                id=None, code="RATE_LIMITED", message="", retry_after=3.0, kind="rate_limited"
            ),
        ),
    ],
)
def test_error_frames(raw: str, expected: ErrorFrame) -> None:
    """Error frames keep id, code, message and retry_after (seconds); kind says what the code means."""
    assert parse_frame(raw) == expected


@pytest.mark.parametrize("retry_after", ["5", True, -1, None, [1]])
def test_error_frame_with_off_spec_retry_after_keeps_its_code(retry_after: Any) -> None:
    """An off-spec retry_after is dropped, but the error's code is kept."""
    raw = orjson.dumps({"type": "error", "code": "RATE_LIMITED", "retry_after": retry_after})
    assert parse_frame(raw) == ErrorFrame(
        id=None, code="RATE_LIMITED", message="", kind="rate_limited"
    )


def test_subscribed() -> None:
    """subscribed parses to Subscribed with the request id, channel and subscription id."""
    raw = '{"type": "subscribed", "id": "r1", "channel": "trades", "subscription": "sub_9"}'
    assert parse_frame(raw) == Subscribed(id="r1", channel="trades", subscription="sub_9")


def test_unsubscribed() -> None:
    """unsubscribed parses to Unsubscribed."""
    raw = '{"type": "unsubscribed", "id": "r3", "subscription": "sub_9"}'
    assert parse_frame(raw) == Unsubscribed(id="r3", subscription="sub_9")


def test_ping_and_pong_echo_ts() -> None:
    """A ping parses to Ping, and pong_frame echoes the same ts."""
    frame = parse_frame(b'{"type": "ping", "ts": 1763805600000}')
    assert frame == Ping(ts=1763805600000)
    assert orjson.loads(pong_frame(frame.ts)) == {"type": "pong", "ts": 1763805600000}


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "error", "message": "no code"}',
        '{"type": "error", "code": 401}',
        '{"type": "subscribed", "id": "r1", "channel": "trades"}',
        '{"type": "subscribed", "id": 1, "channel": "trades", "subscription": "s"}',
        '{"type": "unsubscribed", "id": "r1"}',
        '{"type": "ping"}',
        '{"type": "ping", "ts": "1763805600000"}',
        '{"type": "ping", "ts": 1.5}',
        '{"type": "ping", "ts": true}',
    ],
)
def test_control_frames_missing_fields_are_schema_violations(raw: str) -> None:
    """A control frame without its required fields is Unparseable (schema_violation)."""
    frame = parse_frame(raw)
    assert isinstance(frame, Unparseable)
    assert frame.verdict.reason == "schema_violation"


# --- event frames --------------------------------------------------------------------


@pytest.mark.parametrize("channel", sorted(SAMPLE_DATA))
def test_recorded_events_parse(channel: str) -> None:
    """A recorded event of each channel becomes its typed Event, data as given."""
    frame = parsed_event(channel, SAMPLE_DATA[channel], seq=42, subscription="sub_3")
    assert (frame.subscription, frame.channel, frame.seq) == ("sub_3", channel, 42)
    event = frame.result
    assert isinstance(event, Event)
    assert event.type == TYPES[channel]
    assert event.id == KNOWN_IDS[channel]
    assert event.data == SAMPLE_DATA[channel]  # extra fields kept, decimals still strings


@pytest.mark.parametrize("channel", sorted(SAMPLE_DATA))
def test_event_time_is_the_provider_time_in_utc(channel: str) -> None:
    """Event.time is updated_at/ts (ms) as an exact UTC datetime."""
    event = parsed_event(channel, SAMPLE_DATA[channel]).result
    assert isinstance(event, Event)
    ms = SAMPLE_DATA[channel][TIMES[channel]]
    assert event.time == datetime.fromtimestamp(ms // 1000, UTC).replace(
        microsecond=(ms % 1000) * 1000
    )
    assert event.time is not None
    assert event.time.tzinfo is UTC


def test_ids_follow_the_contract_fields() -> None:
    """Ids are uuid5 over the channel and CONTRACT §6 "id from" fields, as a JSON array."""
    names = {
        "token": f'["token","{SOL}",1763805600123]',
        "trades": f'["trades","{SIGNATURE}","{SOL}"]',
        "portfolio": f'["portfolio","{WALLET}","{USDC}",1763805600456]',
    }
    for channel, name in names.items():
        assert KNOWN_IDS[channel] == str(uuid.uuid5(NAMESPACE, name))
    assert event_id("trades", SIGNATURE, SOL) == KNOWN_IDS["trades"]


@pytest.mark.parametrize("channel", sorted(SAMPLE_DATA))
def test_ids_are_stable_across_reconnects(channel: str) -> None:
    """The same event resent (other subscription id, seq, extras, key order) keeps its id."""
    first = parsed_event(channel, SAMPLE_DATA[channel], seq=5, subscription="sub_1").result
    data = dict(reversed(list(SAMPLE_DATA[channel].items())))
    data["resent"] = True
    again = parsed_event(channel, data, seq=905, subscription="sub_77").result
    assert isinstance(first, Event)
    assert isinstance(again, Event)
    assert first.id == again.id


@pytest.mark.parametrize(
    ("channel", "field", "value"),
    [
        ("token", "mint", USDC),
        ("token", "updated_at", 1763805600124),
        ("trades", "signature", SIGNATURE[::-1]),
        ("trades", "mint", USDC),
        ("portfolio", "wallet", SOL),
        ("portfolio", "mint", SOL),
        ("portfolio", "ts", 1763805600457),
    ],
)
def test_ids_differ_when_an_id_field_differs(channel: str, field: str, value: Any) -> None:
    """Changing one "id from" field gives another id."""
    base = parsed_event(channel, SAMPLE_DATA[channel]).result
    other = parsed_event(channel, {**SAMPLE_DATA[channel], field: value}).result
    assert isinstance(base, Event)
    assert isinstance(other, Event)
    assert base.id != other.id


def test_trade_id_ignores_price_and_time() -> None:
    """A trade's id is signature + mint only: a corrected price is the same trade."""
    base = parsed_event("trades", SAMPLE_DATA["trades"]).result
    fixed = parsed_event(
        "trades", {**SAMPLE_DATA["trades"], "price_usd": "143.23", "ts": 1763805600999}
    ).result
    assert isinstance(base, Event)
    assert isinstance(fixed, Event)
    assert base.id == fixed.id


@pytest.mark.parametrize(
    ("channel", "field"), [(c, f) for c, fields in REQUIRED.items() for f in fields]
)
def test_missing_required_field_is_schema_violation(channel: str, field: str) -> None:
    """Every required data field, missing, gives schema_violation naming the field."""
    data = copy.deepcopy(SAMPLE_DATA[channel])
    del data[field]
    result = verdict(channel, data)
    assert result.reason == "schema_violation"
    assert field in result.detail


@pytest.mark.parametrize(
    ("channel", "field", "number"),
    [(c, f, n) for c, fields in DECIMALS.items() for f in fields for n in (12, 12.5, 0, 1e20, -3)],
)
def test_number_where_decimal_string_required_is_schema_violation(
    channel: str, field: str, number: float
) -> None:
    """A JSON number where a decimal string is required is a schema_violation."""
    result = verdict(channel, {**SAMPLE_DATA[channel], field: number})
    assert result.reason == "schema_violation"
    assert field in result.detail


@pytest.mark.parametrize(
    "bad", ["", "1,5", "NaN", "Infinity", "0x10", " 1", "1.", ".5", "+1", "01"]
)
def test_malformed_decimal_strings_are_schema_violations(bad: str) -> None:
    """A string that is not a decimal number is a schema_violation."""
    result = verdict("trades", {**SAMPLE_DATA["trades"], "amount": bad})
    assert result.reason == "schema_violation"


@pytest.mark.parametrize(
    "good", ["0", "0.0", "-1.5", "1e-7", "2.5E+3", "123456789012345678901234567890"]
)
def test_decimal_strings_in_json_number_spelling_are_accepted(good: str) -> None:
    """Any JSON-number spelling in a string is a decimal string."""
    assert isinstance(
        parsed_event("portfolio", {**SAMPLE_DATA["portfolio"], "balance": good}).result, Event
    )


@pytest.mark.parametrize(
    ("channel", "value"),
    [
        (c, v)
        for c in TIMES
        for v in (1763805600123.0, "1763805600123", True, -1, 253_402_300_800_000, None)
    ],
)
def test_bad_timestamps_are_schema_violations(channel: str, value: Any) -> None:
    """updated_at/ts must be integer ms within datetime's range, not floats, strings or bools."""
    result = verdict(channel, {**SAMPLE_DATA[channel], TIMES[channel]: value})
    assert result.reason == "schema_violation"


def test_latest_representable_timestamp_is_accepted() -> None:
    """The last millisecond of year 9999 is still a valid ts."""
    event = parsed_event("trades", {**SAMPLE_DATA["trades"], "ts": 253_402_300_799_999}).result
    assert isinstance(event, Event)
    assert event.time == datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


@pytest.mark.parametrize("side", ["BUY", "hold", "", 1, None])
def test_side_must_be_buy_or_sell(side: Any) -> None:
    """A trade side other than buy/sell is a schema_violation."""
    assert verdict("trades", {**SAMPLE_DATA["trades"], "side": side}).reason == "schema_violation"


@pytest.mark.parametrize(("channel", "field"), [("trades", "signature"), ("token", "mint")])
def test_empty_or_non_string_identifiers_are_schema_violations(channel: str, field: str) -> None:
    """Identifier fields are non-empty strings."""
    for value in ("", 123, None, ["x"]):
        assert verdict(channel, {**SAMPLE_DATA[channel], field: value}).reason == "schema_violation"


def test_detail_names_fields_not_values() -> None:
    """A schema_violation detail names the field but never echoes the payload's values."""
    secretish = "4242.4242-not-a-decimal"
    result = verdict("trades", {**SAMPLE_DATA["trades"], "amount": secretish})
    assert "amount" in result.detail
    assert secretish not in result.detail
    assert "\n" not in result.detail


@pytest.mark.parametrize("data", [None, [], "x", 5])
def test_event_data_not_an_object_is_schema_violation(data: Any) -> None:
    """An event whose data is not an object is still an EventFrame (seq may advance), quarantined."""
    assert verdict("trades", data).reason == "schema_violation"


def test_unknown_channel_is_quarantined_with_its_seq() -> None:
    """An event on a channel not in the table is quarantined as unknown_channel, keeping seq."""
    frame = parsed_event("orderbook", {"mint": SOL}, seq=11)
    assert frame.seq == 11
    assert isinstance(frame.result, Quarantine)
    assert frame.result.reason == "unknown_channel"
    assert "orderbook" in frame.result.detail


@pytest.mark.parametrize("seq", ["missing", None, "7", 7.0, True, -1, [7]])
def test_event_without_a_valid_seq_is_unparseable(seq: Any) -> None:
    """An event frame whose seq is missing or not a non-negative integer is Unparseable."""
    frame = orjson.loads(event_frame("trades", SAMPLE_DATA["trades"]))
    if seq == "missing":
        del frame["seq"]
    else:
        frame["seq"] = seq
    result = parse_frame(orjson.dumps(frame))
    assert isinstance(result, Unparseable)
    assert result.verdict.reason == "schema_violation"


@pytest.mark.parametrize("field", ["subscription", "channel"])
def test_event_without_subscription_or_channel_is_unparseable(field: str) -> None:
    """An event frame without a string subscription or channel is Unparseable."""
    frame = orjson.loads(event_frame("trades", SAMPLE_DATA["trades"]))
    del frame[field]
    result = parse_frame(orjson.dumps(frame))
    assert isinstance(result, Unparseable)
    assert result.verdict.reason == "schema_violation"


# --- frames that are not frames ------------------------------------------------------


@pytest.mark.parametrize("raw", NOT_JSON)
def test_invalid_json_is_unparseable(raw: str | bytes) -> None:
    """Text or bytes that are not JSON (or not UTF-8) are Unparseable as invalid_json."""
    frame = parse_frame(raw)
    assert isinstance(frame, Unparseable)
    assert frame.verdict.reason == "invalid_json"
    assert frame.verdict.detail


@pytest.mark.parametrize(
    "raw",
    ["[1, 2]", '"auth_ok"', "42", "null", "{}", '{"type": 5}', '{"type": "telemetry", "x": 1}'],
)
def test_json_that_is_not_a_known_frame_is_schema_violation(raw: str) -> None:
    """JSON that is not an object with a known type is Unparseable as schema_violation."""
    frame = parse_frame(raw)
    assert isinstance(frame, Unparseable)
    assert frame.verdict.reason == "schema_violation"


def test_bytes_and_text_parse_alike() -> None:
    """A binary frame with the same JSON parses like the text frame."""
    raw = event_frame("token", SAMPLE_DATA["token"])
    assert parse_frame(raw) == parse_frame(raw.decode())


# --- builders ------------------------------------------------------------------------


def test_auth_frame() -> None:
    """auth_frame is CONTRACT §6's auth message."""
    assert orjson.loads(auth_frame("k-1")) == {"type": "auth", "api_key": "k-1"}


def test_subscribe_frame_with_and_without_since_seq() -> None:
    """subscribe_frame carries since_seq only when given (0 included)."""
    first = orjson.loads(subscribe_frame("r1", "trades", {"mint": SOL}))
    assert first == {"type": "subscribe", "id": "r1", "channel": "trades", "params": {"mint": SOL}}
    again = orjson.loads(subscribe_frame("r2", "portfolio", {"wallet": WALLET}, 0))
    assert again == {
        "type": "subscribe",
        "id": "r2",
        "channel": "portfolio",
        "params": {"wallet": WALLET},
        "since_seq": 0,
    }


def test_unsubscribe_frame() -> None:
    """unsubscribe_frame names the server's subscription id."""
    assert orjson.loads(unsubscribe_frame("r9", "sub_4")) == {
        "type": "unsubscribe",
        "id": "r9",
        "subscription": "sub_4",
    }


def test_subscription_key_is_stable() -> None:
    """subscription_key is channel?params sorted, whatever the params' order."""
    assert subscription_key("trades", {"mint": SOL}) == f"trades?mint={SOL}"
    assert subscription_key("x", {"b": "2", "a": "1"}) == subscription_key(
        "x", {"a": "1", "b": "2"}
    )
    assert subscription_key("x", {"b": "2", "a": "1"}) == "x?a=1&b=2"
    assert subscription_key("token", {}) == "token"
    assert subscription_key("x", {"a": "1&b=2"}) != subscription_key("x", {"a": "1", "b": "2"})


# --- provider ------------------------------------------------------------------------


def test_provider_is_found_by_name_and_is_a_stream_provider() -> None:
    """load_provider finds PROVIDER, a StreamProvider named layerx402 of kind websocket."""
    assert load_provider("layerx402") is PROVIDER
    assert isinstance(PROVIDER, StreamProvider)
    assert (PROVIDER.name, PROVIDER.kind) == ("layerx402", "websocket")
    assert dict(PROVIDER.channels) == {
        "token": ("mint",),
        "trades": ("mint",),
        "portfolio": ("wallet",),
    }


def test_provider_methods_match_the_functions() -> None:
    """PROVIDER's methods are the module's functions."""
    raw = event_frame("portfolio", SAMPLE_DATA["portfolio"])
    assert PROVIDER.parse_frame(raw) == parse_frame(raw)
    assert PROVIDER.auth_frame("k") == auth_frame("k")
    assert PROVIDER.subscribe_frame("r", "token", {"mint": SOL}, 3) == subscribe_frame(
        "r", "token", {"mint": SOL}, 3
    )
    assert PROVIDER.unsubscribe_frame("r", "s") == unsubscribe_frame("r", "s")
    assert PROVIDER.pong_frame(5) == pong_frame(5)
    assert PROVIDER.subscription_key("token", {"mint": SOL}) == subscription_key(
        "token", {"mint": SOL}
    )


# --- never raises --------------------------------------------------------------------

PROPERTY = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def check_frame(frame: ServerFrame) -> None:
    assert isinstance(frame, FRAME_TYPES)
    verdicts = [frame.verdict] if isinstance(frame, Unparseable) else []
    if isinstance(frame, EventFrame):
        assert frame.seq >= 0
        if isinstance(frame.result, Quarantine):
            verdicts.append(frame.result)
        else:
            orjson.dumps(dict(frame.result.data))
    for v in verdicts:
        assert v.reason in {"invalid_json", "schema_violation", "unknown_channel"}
        assert v.detail
        assert len(v.detail) <= 1000


@PROPERTY
@given(raw=st.text(max_size=300) | st.binary(max_size=300))
def test_never_raises_on_arbitrary_text_or_bytes(raw: str | bytes) -> None:
    """parse_frame on arbitrary text or bytes returns a ServerFrame, never raises."""
    check_frame(parse_frame(raw))


@PROPERTY
@given(value=json_values)
def test_never_raises_on_arbitrary_json(value: Any) -> None:
    """parse_frame on arbitrary JSON returns a ServerFrame, never raises."""
    check_frame(parse_frame(orjson.dumps(value)))


@PROPERTY
@given(data=st.data())
def test_never_raises_on_damaged_recorded_frames(data: st.DataObject) -> None:
    """A recorded frame with one field replaced or removed still gives a ServerFrame."""
    channel = data.draw(st.sampled_from(sorted(SAMPLE_DATA)), label="channel")
    frame = orjson.loads(event_frame(channel, SAMPLE_DATA[channel]))
    kind = data.draw(st.sampled_from(["event", "error", "subscribed", "ping", "unsubscribed"]))
    frame["type"] = kind
    target = frame["data"] if data.draw(st.booleans(), label="in data") else frame
    key = data.draw(st.sampled_from(sorted(target)), label="key")
    if data.draw(st.booleans(), label="remove"):
        del target[key]
    else:
        target[key] = data.draw(json_values, label="value")
    check_frame(parse_frame(orjson.dumps(frame)))


class TestLayerx402Contract(StreamProviderContract):
    """Layerx402 keeps the contract every stream provider keeps."""

    provider = PROVIDER
    event_frames: ClassVar[list[bytes]] = [event_frame(c, d) for c, d in SAMPLE_DATA.items()]
    control_frames: ClassVar[list[tuple[bytes, type]]] = [
        (b'{"type": "auth_ok"}', AuthOk),
        (b'{"type": "ping", "ts": 1}', Ping),
        (
            b'{"type": "subscribed", "id": "r1", "channel": "trades", "subscription": "s"}',
            Subscribed,
        ),
        (b'{"type": "unsubscribed", "id": "r1", "subscription": "s"}', Unsubscribed),
        (b'{"type": "error", "code": "UNAUTHORIZED", "message": "no"}', ErrorFrame),
        (b'{"type": "error", "id": "r1", "code": "FORBIDDEN", "message": "no"}', ErrorFrame),
        (b'{"type": "welcome"}', Unparseable),
    ]
    close_codes: ClassVar[dict[int | None, CloseKind | None]] = {
        4001: "unauthorized",
        4003: "forbidden",
        4029: "rate_limited",
        1000: None,
        None: None,
    }
    subscription: ClassVar[tuple[str, dict[str, str]]] = ("portfolio", {"wallet": WALLET})


def test_numbers_in_data_keep_their_digits_in_the_cloudevent() -> None:
    """An extra field past 64 bits is published as sent, not as the nearest double."""
    raw = event_frame("trades", SAMPLE_DATA["trades"]).replace(
        b'"data":{', b'"data":{"lamports":123456789012345678901234567890,', 1
    )
    frame = parse_frame(raw)
    assert isinstance(frame, EventFrame) and isinstance(frame.result, Event)
    written = orjson.dumps({"data": frame.result.data})  # (as listener.envelope writes it)
    assert b'"lamports":123456789012345678901234567890' in written
