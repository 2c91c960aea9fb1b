"""
Tests for listener/signatures.py: known answers, rotation, tolerance, malformed
headers, and properties over arbitrary input (CONTRACT §5, NOTES: verification facts).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import standardwebhooks
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from listener.config import SignatureConfig
from listener.exceptions import SignatureError, TimestampOutOfRange
from listener.sources.signatures import (
    DEFAULT_HEADERS,
    Scheme,
    Verifier,
    decode_whsec,
    sign,
    verify,
)

# Published vectors (Standard Webhooks reference tests; GitHub docs), NOTES.
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TS = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

SCHEMES: tuple[Scheme, ...] = ("standard-webhooks", "stripe", "github", "hmac-sha256-hex")
TIMESTAMPED: tuple[Scheme, ...] = ("standard-webhooks", "stripe")
NOW = 1_800_000_000
TEXT_SECRETS = ("s3cr3t-one", "s3cr3t-two", "s3cr3t-three")
WHSEC_SECRETS = tuple(
    "whsec_" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in TEXT_SECRETS
)
PROPERTY = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])


def secrets_for(scheme: Scheme) -> tuple[str, ...]:
    return WHSEC_SECRETS if scheme == "standard-webhooks" else TEXT_SECRETS


def config(
    scheme: Scheme,
    secrets: tuple[str, ...] | None = None,
    *,
    tolerance: float = 300.0,
    header: str | None = None,
) -> SignatureConfig:
    return SignatureConfig.model_validate(
        {
            "scheme": scheme,
            "secrets": list(secrets or secrets_for(scheme)[:1]),
            "tolerance": tolerance,
            "header": header,
        }
    )


def lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --- known answers -----------------------------------------------------------------


def test_standard_webhooks_published_vector_signs() -> None:
    """sign() reproduces the Standard Webhooks published signature."""
    headers = sign("standard-webhooks", SW_SECRET, SW_BODY, msg_id=SW_ID, timestamp=SW_TS)
    assert headers == {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TS),
        "webhook-signature": SW_SIGNATURE,
    }


def test_standard_webhooks_published_vector_verifies() -> None:
    """The published Standard Webhooks request verifies at its own time."""
    headers = {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TS),
        "webhook-signature": SW_SIGNATURE,
    }
    verify(config("standard-webhooks", (SW_SECRET,)), headers, SW_BODY, now=SW_TS)


def test_standard_webhooks_library_accepts_our_signature() -> None:
    """The reference standardwebhooks library verifies what sign() produces."""
    stamp = int(time.time())
    headers = sign("standard-webhooks", SW_SECRET, SW_BODY, msg_id=SW_ID, timestamp=stamp)
    standardwebhooks.Webhook(SW_SECRET).verify(SW_BODY, headers, json_parse=False)


@settings(deadline=None)
@given(
    key=st.binary(min_size=1, max_size=64),
    msg_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
    stamp=st.integers(min_value=0, max_value=4_000_000_000),
    body=st.text(),
)
def test_standard_webhooks_equals_reference_library(
    key: bytes, msg_id: str, stamp: int, body: str
) -> None:
    """For any secret, id, timestamp and body, sign() equals the reference library's sign."""
    secret = "whsec_" + base64.b64encode(key).decode()
    ours = sign("standard-webhooks", secret, body.encode(), msg_id=msg_id, timestamp=stamp)
    theirs = standardwebhooks.Webhook(secret).sign(
        msg_id, datetime.fromtimestamp(stamp, tz=UTC), body
    )
    assert ours["webhook-signature"] == theirs


def test_github_published_vector() -> None:
    """sign() and verify() agree with GitHub's published X-Hub-Signature-256 example."""
    assert sign("github", GH_SECRET, GH_BODY) == {"X-Hub-Signature-256": GH_SIGNATURE}
    verify(config("github", (GH_SECRET,)), {"x-hub-signature-256": GH_SIGNATURE}, GH_BODY, now=NOW)


def test_stripe_known_answer() -> None:
    """Stripe signs "t.body" with the secret as UTF-8 and sends t=..,v1=<hex>."""
    secret, body = "whsec_stripe_téxt", b'{"id":"evt_1"}'
    expected = hmac.new(secret.encode(), f"{NOW}.".encode() + body, hashlib.sha256).hexdigest()
    headers = sign("stripe", secret, body, timestamp=NOW)
    assert headers == {"Stripe-Signature": f"t={NOW},v1={expected}"}
    verify(config("stripe", (secret,)), headers, body, now=NOW)


def test_hmac_sha256_hex_known_answer() -> None:
    """hmac-sha256-hex sends the hex HMAC of the body in X-Signature by default."""
    secret, body = "shared", b"payload"
    expected = hmac.new(b"shared", body, hashlib.sha256).hexdigest()
    assert sign("hmac-sha256-hex", secret, body) == {"X-Signature": expected}
    verify(config("hmac-sha256-hex", (secret,)), {"X-Signature": expected}, body, now=NOW)
    verify(config("hmac-sha256-hex", (secret,)), {"x-signature": expected.upper()}, body, now=NOW)


@pytest.mark.parametrize("scheme", ["stripe", "github", "hmac-sha256-hex"])
def test_configured_header_name(scheme: Scheme) -> None:
    """A configured header name replaces the scheme's default one."""
    body = b"{}"
    headers = sign(scheme, "k", body, timestamp=NOW, header="X-Custom-Sig")
    assert list(headers) == ["X-Custom-Sig"]
    verify(config(scheme, ("k",), header="X-Custom-Sig"), headers, body, now=NOW)
    with pytest.raises(SignatureError, match="x-custom-sig"):
        verify(config(scheme, ("k",), header="X-Custom-Sig"), {}, body, now=NOW)


def test_standard_webhooks_ignores_header_option() -> None:
    """Standard Webhooks keeps its fixed header names whatever signature.header says."""
    headers = sign("standard-webhooks", SW_SECRET, SW_BODY, timestamp=NOW)
    verify(config("standard-webhooks", (SW_SECRET,), header="X-Other"), headers, SW_BODY, now=NOW)


def test_sign_defaults() -> None:
    """sign() derives a stable msg id from the body and stamps the current time."""
    first = sign("standard-webhooks", SW_SECRET, SW_BODY)
    second = sign("standard-webhooks", SW_SECRET, SW_BODY)
    assert first["webhook-id"] == second["webhook-id"]
    assert abs(int(first["webhook-timestamp"]) - time.time()) < 60
    verify(config("standard-webhooks", (SW_SECRET,)), first, SW_BODY, now=time.time())


def test_sign_rejects_unknown_scheme() -> None:
    """sign() refuses a scheme it does not know."""
    with pytest.raises(ValueError, match="unknown signature scheme"):
        sign(cast(Scheme, "md5"), "k", b"")


# --- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_headers_case_insensitive(scheme: Scheme) -> None:
    """Headers verify from a CIMultiDictProxy, a lower-cased dict and a mixed-case dict."""
    body = b'{"a":1}'
    headers = sign(scheme, secrets_for(scheme)[0], body, timestamp=NOW)
    shouting = {k.upper(): v for k, v in headers.items()}
    for form in (CIMultiDictProxy(CIMultiDict(shouting)), lower(headers), shouting, headers):
        verify(config(scheme), form, body, now=NOW)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rotation_accepts_any_configured_secret(scheme: Scheme) -> None:
    """With several secrets configured, a request signed with any of them passes."""
    old, new, other = secrets_for(scheme)
    verifier = Verifier(config(scheme, (old, new)))
    body = b"rotating"
    for secret in (old, new):
        verifier.verify(sign(scheme, secret, body, timestamp=NOW), body, NOW)
    with pytest.raises(SignatureError) as caught:
        verifier.verify(sign(scheme, other, body, timestamp=NOW), body, NOW)
    assert type(caught.value) is SignatureError


def test_rotation_sender_signs_with_both() -> None:
    """A sender listing old and new signatures passes a verifier that knows only one."""
    old, new, _ = WHSEC_SECRETS
    a = sign("standard-webhooks", old, b"x", msg_id="m", timestamp=NOW)
    b = sign("standard-webhooks", new, b"x", msg_id="m", timestamp=NOW)
    a["webhook-signature"] += " " + b["webhook-signature"]
    verify(config("standard-webhooks", (new,)), a, b"x", now=NOW)


# --- tolerance ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_within_tolerance_accepted(scheme: Scheme, offset: int) -> None:
    """A timestamp up to tolerance in the past or the future passes."""
    headers = sign(scheme, secrets_for(scheme)[0], b"b", timestamp=NOW + offset)
    verify(config(scheme, tolerance=300), headers, b"b", now=NOW)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("offset", [-301, 301, -86400 * 365, NOW])
def test_beyond_tolerance_rejected(scheme: Scheme, offset: int) -> None:
    """A correctly signed timestamp beyond tolerance, past or future, is out of range."""
    headers = sign(scheme, secrets_for(scheme)[0], b"b", timestamp=NOW + offset)
    with pytest.raises(TimestampOutOfRange):
        verify(config(scheme, tolerance=300), headers, b"b", now=NOW)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_forged_stale_request_is_invalid_signature(scheme: Scheme) -> None:
    """A stale request with a wrong signature is INVALID_SIGNATURE, not a clock hint."""
    headers = sign(scheme, secrets_for(scheme)[2], b"b", timestamp=NOW - 10_000)
    with pytest.raises(SignatureError) as caught:
        verify(config(scheme), headers, b"b", now=NOW)
    assert caught.value.code == "INVALID_SIGNATURE"


def test_github_has_no_timestamp() -> None:
    """GitHub-style signatures carry no time, so any now passes."""
    headers = sign("github", GH_SECRET, GH_BODY)
    verify(config("github", (GH_SECRET,)), headers, GH_BODY, now=0)


# --- malformed input ---------------------------------------------------------------------

VALID_SW = sign("standard-webhooks", WHSEC_SECRETS[0], b"b", msg_id="msg_1", timestamp=NOW)
VALID_STRIPE = sign("stripe", TEXT_SECRETS[0], b"b", timestamp=NOW)["Stripe-Signature"]
HEX = "a" * 64

MALFORMED: list[tuple[Scheme, dict[str, Any]]] = [
    ("standard-webhooks", {}),
    ("standard-webhooks", {**VALID_SW, "webhook-id": ""}),
    ("standard-webhooks", {k: v for k, v in VALID_SW.items() if k != "webhook-id"}),
    ("standard-webhooks", {k: v for k, v in VALID_SW.items() if k != "webhook-timestamp"}),
    ("standard-webhooks", {k: v for k, v in VALID_SW.items() if k != "webhook-signature"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "soon"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "-1"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "1.5"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": " 1800000000"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "1_800_000_000"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "１８００００００００"}),
    ("standard-webhooks", {**VALID_SW, "webhook-timestamp": "9" * 400}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1,"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1,a,b"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1,!!notbase64!!"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1,YQ="}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v1,ëëë"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "v2,abcd v1a,xyz"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": "   "}),
    ("standard-webhooks", {**VALID_SW, "webhook-id": "msg_\udcff\ud800"}),
    ("standard-webhooks", {**VALID_SW, "webhook-id": b"msg_1"}),
    ("standard-webhooks", {**VALID_SW, "webhook-signature": None}),
    ("stripe", {}),
    ("stripe", {"Stripe-Signature": ""}),
    ("stripe", {"Stripe-Signature": "garbage"}),
    ("stripe", {"Stripe-Signature": f"v1={HEX}"}),
    ("stripe", {"Stripe-Signature": f"t={NOW}"}),
    ("stripe", {"Stripe-Signature": f"t={NOW},t={NOW},v1={HEX}"}),
    ("stripe", {"Stripe-Signature": f"t=now,v1={HEX}"}),
    ("stripe", {"Stripe-Signature": f"t={NOW},v1=xyz"}),
    ("stripe", {"Stripe-Signature": f"t={NOW},v1={'g' * 64}"}),
    ("stripe", {"Stripe-Signature": f"t={NOW},v1={'é' * 64}"}),
    ("stripe", {"Stripe-Signature": f"t={NOW},v0={HEX}"}),
    ("stripe", {"Stripe-Signature": ",,,=,=="}),
    ("github", {}),
    ("github", {"X-Hub-Signature-256": ""}),
    ("github", {"X-Hub-Signature-256": HEX}),
    ("github", {"X-Hub-Signature-256": f"sha1={HEX[:40]}"}),
    ("github", {"X-Hub-Signature-256": "sha256="}),
    ("github", {"X-Hub-Signature-256": "sha256=zz"}),
    ("github", {"X-Hub-Signature-256": f"sha256={HEX}ff"}),
    ("github", {"X-Hub-Signature": f"sha1={HEX[:40]}"}),
    ("hmac-sha256-hex", {}),
    ("hmac-sha256-hex", {"X-Signature": ""}),
    ("hmac-sha256-hex", {"X-Signature": f"sha256={HEX}"}),
    ("hmac-sha256-hex", {"X-Signature": HEX[:-1] + "\u0661"}),
    ("hmac-sha256-hex", {"X-Signature": HEX[:62]}),
    ("hmac-sha256-hex", {"X-Signature": HEX}),
]


@pytest.mark.parametrize(("scheme", "headers"), MALFORMED)
def test_malformed_headers_raise_signature_error(scheme: Scheme, headers: dict[str, Any]) -> None:
    """Missing, empty or malformed signature headers give SignatureError, never another error."""
    with pytest.raises(SignatureError) as caught:
        verify(config(scheme), headers, b"b", now=NOW)
    assert type(caught.value) is SignatureError
    assert caught.value.code == "INVALID_SIGNATURE"


def test_error_messages_hold_no_secret() -> None:
    """Rejections never mention a configured secret."""
    for scheme, headers in MALFORMED:
        with pytest.raises(SignatureError) as caught:
            verify(config(scheme), headers, b"b", now=NOW)
        assert all(s not in str(caught.value) for s in (*TEXT_SECRETS, *WHSEC_SECRETS))


@pytest.mark.parametrize(
    "secret",
    [
        SW_SECRET,
        SW_SECRET.removeprefix("whsec_"),
        "whsec_" + base64.b64encode(b"sixteen byte key").decode().rstrip("="),
        "whsec_" + base64.b64encode(b"x").decode(),
    ],
)
def test_decode_whsec_accepts(secret: str) -> None:
    """decode_whsec takes whsec_<base64>, bare base64 and unpadded base64."""
    raw = secret.removeprefix("whsec_")
    assert decode_whsec(secret) == base64.b64decode(raw + "=" * (-len(raw) % 4))


@pytest.mark.parametrize(
    "secret", ["", "whsec_", "whsec_===", "whsec_not base64!", "whsec_ab-_", "whsec_é", "whsec_a"]
)
def test_decode_whsec_rejects(secret: str) -> None:
    """decode_whsec raises ValueError with a clear message for anything but base64."""
    with pytest.raises(ValueError, match="standard-webhooks secret"):
        decode_whsec(secret)


def test_config_rejects_bad_whsec() -> None:
    """A standard-webhooks source with a non-base64 secret is a config error."""
    with pytest.raises(ValidationError, match="whsec_"):
        config("standard-webhooks", ("not-base64!",))


def test_verifier_survives_undecodable_env_secret() -> None:
    """A secret holding a byte os.environ kept as a surrogate keys the HMAC with that byte."""
    secret = b"k\xff".decode("utf-8", "surrogateescape")
    expected = hmac.new(b"k\xff", b"b", hashlib.sha256).hexdigest()
    verify(config("hmac-sha256-hex", (secret,)), {"x-signature": expected}, b"b", now=NOW)


# --- properties ----------------------------------------------------------------------------

bodies = st.binary(max_size=256)
msg_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
offsets = st.integers(min_value=-300, max_value=300)
# Any code point, lone surrogates included (aiohttp keeps undecodable header bytes
# as surrogates), which st.characters() leaves out unless asked.
any_text = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=120)


def _flip(value: str, index: int) -> str:
    """Change one character of ``value`` to a different one of the same alphabet."""
    index %= len(value)
    old = value[index]
    alphabet = "0123456789abcdef" if old in "0123456789abcdef" else "ABCDEFGHabcdefgh0123"
    new = next(c for c in alphabet if c != old)
    return value[:index] + new + value[index + 1 :]


@PROPERTY
@given(
    scheme=st.sampled_from(SCHEMES),
    body=bodies,
    msg_id=msg_ids,
    offset=offsets,
    part=st.sampled_from(["body", "id", "timestamp", "signature"]),
    data=st.data(),
)
def test_any_mutation_is_rejected(
    scheme: Scheme, body: bytes, msg_id: str, offset: int, part: str, data: st.DataObject
) -> None:
    """Changing the body, id, timestamp or signature of a signed request fails verification."""
    secret = secrets_for(scheme)[0]
    headers = sign(scheme, secret, body, msg_id=msg_id, timestamp=NOW + offset)
    verifier = Verifier(config(scheme))
    verifier.verify(headers, body, NOW)
    name = DEFAULT_HEADERS[scheme]
    if part == "body":
        other = data.draw(bodies.filter(lambda b: b != body), label="other body")
        body = other
    elif part == "id":
        assume(scheme == "standard-webhooks")
        headers["webhook-id"] = data.draw(msg_ids.filter(lambda m: m != msg_id), label="id")
    elif part == "timestamp":
        assume(scheme in TIMESTAMPED)
        # Same instant spelled differently ("0" prefix) or another instant in range:
        # either changes the signed text.
        stamp = data.draw(
            st.one_of(
                st.just("0" + str(NOW + offset)),
                offsets.filter(lambda o: o != offset).map(lambda o: str(NOW + o)),
            ),
            label="timestamp",
        )
        if scheme == "stripe":
            headers[name] = headers[name].replace(f"t={NOW + offset}", f"t={stamp}")
        else:
            headers["webhook-timestamp"] = stamp
    else:
        value = headers[name]
        # Where the encoded digest starts: after "v1,", "v1=", "sha256=" or at once.
        start = {"standard-webhooks": value.find(",") + 1, "hmac-sha256-hex": 0}.get(
            scheme, value.rfind("=") + 1
        )
        if scheme == "standard-webhooks":
            # Flip a bit of the decoded digest, so the base64 stays well formed.
            digest = bytearray(base64.b64decode(value[start:]))
            digest[data.draw(st.integers(0, 31), label="byte")] ^= 1 << data.draw(
                st.integers(0, 7), label="bit"
            )
            headers[name] = value[:start] + base64.b64encode(bytes(digest)).decode()
        else:
            tail = _flip(value[start:], data.draw(st.integers(0, 63), label="index"))
            headers[name] = value[:start] + tail
    with pytest.raises(SignatureError) as caught:
        verifier.verify(headers, body, NOW)
    assert type(caught.value) is SignatureError


@PROPERTY
@given(
    scheme=st.sampled_from(TIMESTAMPED),
    body=bodies,
    garbage=st.lists(
        st.text(st.characters(exclude_categories=("Z", "Cc", "Cs")), min_size=1, max_size=60),
        max_size=6,
    ),
    position=st.integers(min_value=0),
)
def test_valid_signature_among_garbage_is_accepted(
    scheme: Scheme, body: bytes, garbage: list[str], position: int
) -> None:
    """A signature list holding one valid entry among garbage entries passes."""
    headers = sign(scheme, secrets_for(scheme)[0], body, msg_id="msg_1", timestamp=NOW)
    name = DEFAULT_HEADERS[scheme]
    if scheme == "standard-webhooks":
        entries = [g.replace(" ", "") for g in garbage]
        entries.insert(position % (len(entries) + 1), headers[name])
        headers[name] = " ".join(entries)
    else:
        # Keep exactly one t=, the rest garbage v1=/other items around the valid v1.
        stamp, valid = headers[name].split(",")
        items = [g.replace(",", "") for g in garbage if not g.strip().startswith("t=")]
        items = [i for i in items if not i.replace(" ", "").startswith("t=")]
        items.insert(position % (len(items) + 1), valid)
        headers[name] = ",".join([stamp, *items])
    verify(config(scheme), headers, body, now=NOW)


@PROPERTY
@given(
    scheme=st.sampled_from(SCHEMES),
    headers=st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    "webhook-id",
                    "webhook-timestamp",
                    "webhook-signature",
                    "WEBHOOK-SIGNATURE",
                    "Stripe-Signature",
                    "X-Hub-Signature-256",
                    "x-signature",
                ]
            ),
            any_text,
        ),
        st.one_of(
            any_text,
            st.builds(lambda n: f"t={n},v1={'0' * 64}", st.integers()),
            st.builds(lambda t: f"v1,{t}", any_text),
            st.builds(lambda t: f"sha256={t}", any_text),
        ),
        max_size=6,
    ),
    body=bodies,
    now=st.floats(allow_nan=False, allow_infinity=False),
)
def test_header_garbage_raises_only_signature_error(
    scheme: Scheme, headers: dict[str, str], body: bytes, now: float
) -> None:
    """Arbitrary header names and values never raise anything but SignatureError."""
    with pytest.raises(SignatureError):
        verify(config(scheme), headers, body, now=now)
