"""
Webhook signature verification (CONTRACT §5): pure, no I/O, no logging.

Four schemes, chosen per source by ``signature.scheme``:

==================== ============================================== ====================
scheme               headers                                        signed content
==================== ============================================== ====================
standard-webhooks    ``webhook-id``, ``webhook-timestamp``,         ``id.timestamp.body``
                     ``webhook-signature: v1,<base64> ...``
stripe               ``Stripe-Signature: t=<unix>,v1=<hex>[,...]``  ``t.body``
github               ``X-Hub-Signature-256: sha256=<hex>``          ``body``
hmac-sha256-hex      ``X-Signature: <hex>``                         ``body``
==================== ============================================== ====================

All use HMAC-SHA256. A request passes when any configured secret (several during
rotation) matches any signature it carries; digests are compared with
:func:`hmac.compare_digest`. Timestamps must lie within ``tolerance`` of ``now``, in
the past or the future.

Why not ``standardwebhooks.Webhook.verify``: it reads the wall clock with a fixed
±5 min tolerance, takes one secret, decodes the body as UTF-8 and raises plain
``ValueError``/``binascii.Error`` on malformed headers (NOTES: webhook verification
facts). This module implements the same algorithm (Standard Webhooks spec,
"Verifying webhooks") with an injected clock, configurable tolerance, rotation and
only :class:`SignatureError` out; the tests prove it equal to the library and the
spec's published vector.

The only exceptions out of :meth:`Verifier.verify` are :class:`SignatureError` and
its subclass :class:`TimestampOutOfRange`, whatever the headers hold.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from listener.exceptions import SignatureError, TimestampOutOfRange

if TYPE_CHECKING:
    from listener.config import SignatureConfig

__all__ = [
    "DEFAULT_HEADERS",
    "Scheme",
    "Verifier",
    "decode_whsec",
    "sign",
    "verify",
]

Scheme = Literal["standard-webhooks", "stripe", "github", "hmac-sha256-hex"]

# Header carrying the signature, per scheme, when ``signature.header`` is not set.
# Standard Webhooks fixes its three header names (spec: "Webhook headers").
DEFAULT_HEADERS: Mapping[str, str] = {
    "standard-webhooks": "webhook-signature",
    "stripe": "Stripe-Signature",
    "github": "X-Hub-Signature-256",
    "hmac-sha256-hex": "X-Signature",
}

_WHSEC_PREFIX = "whsec_"
# A Unix timestamp in seconds: ASCII digits only (``int()`` would also take " 1_0",
# "+1" or Arabic-Indic digits, none of which a signer produces). 12 digits reach
# the year 33658, and bound the work done on a hostile header.
_MAX_TIMESTAMP_DIGITS = 12
_SHA256_SIZE = 32


def decode_whsec(secret: str) -> bytes:
    """
    Decode a Standard Webhooks secret, ``whsec_<base64>`` or bare base64.

    Padding may be omitted, as the reference library allows; anything outside the
    standard base64 alphabet is refused (the library silently drops it).

    Raises:
        ValueError: not base64, or empty once decoded.
    """
    encoded = secret.removeprefix(_WHSEC_PREFIX).rstrip("=")
    if not encoded:
        raise ValueError("a standard-webhooks secret must be 'whsec_' followed by base64")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError:  # binascii.Error is a ValueError; so is non-ASCII input
        raise ValueError(
            "a standard-webhooks secret must be 'whsec_' followed by base64 "
            "(as the provider's dashboard shows it)"
        ) from None
    if not key:
        raise ValueError("a standard-webhooks secret must not be empty")
    return key


def _utf8(text: str) -> bytes:
    """
    ``text`` as UTF-8; an undecodable byte that ``os.environ`` kept as a surrogate
    (PEP 383) goes back to the byte the operator wrote, instead of failing.
    """
    return text.encode("utf-8", "surrogateescape")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """
    Case-insensitive header lookup (RFC 9110 §5.1) for any mapping.

    aiohttp's ``CIMultiDictProxy`` and lower-cased dicts answer the first ``get``;
    only a miss pays for the scan, which makes plain dicts with any casing work.
    """
    value = headers.get(name)
    if value is None:
        for key, item in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = item
                break
    if value is None:
        return None
    if not isinstance(value, str):
        raise SignatureError(f"header {name} is not text")
    return value


def _timestamp(value: str, name: str) -> int:
    """Parse a Unix timestamp in seconds; anything else is a malformed header."""
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_TIMESTAMP_DIGITS):
        raise SignatureError(f"header {name} must be a Unix time in seconds")
    return int(value)


def _hex_digest(value: str) -> bytes | None:
    """Decode a hex SHA-256 digest, or ``None`` when it is not one."""
    if len(value) != 2 * _SHA256_SIZE:
        return None
    try:
        return binascii.a2b_hex(value)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None


def _b64_digest(value: str) -> bytes | None:
    """Decode a base64 SHA-256 digest, or ``None`` when it is not one."""
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    return digest if len(digest) == _SHA256_SIZE else None


class Verifier:
    """
    Verifies one source's webhooks; build it once per source (hot path).

    The HMAC key schedule of every secret is computed here, once; each request
    copies the prepared state and feeds it the signed content without
    concatenating the body.
    """

    __slots__ = ("_check", "_header_name", "_keys", "_tolerance")

    def __init__(self, config: SignatureConfig) -> None:
        """
        Prepare the keys of ``config.secrets`` for ``config.scheme``.

        Raises:
            ValueError: a standard-webhooks secret is not ``whsec_<base64>``
                (the config model refuses it first).
        """
        scheme: Scheme = config.scheme
        secrets = [s.get_secret_value() for s in config.secrets]
        if scheme == "standard-webhooks":
            keys = [decode_whsec(s) for s in secrets]
        else:
            # Stripe and GitHub key the HMAC with the secret text as UTF-8 (NOTES).
            keys = [_utf8(s) for s in secrets]
        self._keys = tuple(hmac.new(k, digestmod=hashlib.sha256) for k in keys)
        self._tolerance = config.tolerance
        header = DEFAULT_HEADERS[scheme]
        if scheme != "standard-webhooks" and config.header:
            header = config.header
        self._header_name = header.lower()
        checks: dict[str, Callable[[Mapping[str, str], bytes, float], None]] = {
            "standard-webhooks": self._standard_webhooks,
            "stripe": self._stripe,
            "github": self._github,
            "hmac-sha256-hex": self._hmac_hex,
        }
        self._check = checks[scheme]

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """
        Check the request's signature and timestamp.

        Args:
            headers: the request headers (looked up case-insensitively).
            body: the raw request body, exactly as received.
            now: the current Unix time, in seconds.

        Raises:
            TimestampOutOfRange: signed correctly, but too old or too new.
            SignatureError: a header is missing or malformed, or no secret matches.
        """
        self._check(headers, body, now)

    def _digests(self, *parts: bytes) -> list[bytes]:
        """HMAC-SHA256 of ``parts`` concatenated, under every key."""
        out = []
        for prepared in self._keys:
            mac = prepared.copy()
            for part in parts:
                mac.update(part)
            out.append(mac.digest())
        return out

    @staticmethod
    def _match(expected: list[bytes], given: list[bytes]) -> bool:
        # compare_digest per pair, so the time taken does not reveal how many
        # leading bytes of a forged signature were right.
        return any(hmac.compare_digest(e, g) for g in given for e in expected)

    def _check_time(self, timestamp: int, now: float) -> None:
        # Both ways: a timestamp from the future is as suspect as an old one
        # (Standard Webhooks spec, "Verifying webhooks": replay protection).
        if abs(now - timestamp) > self._tolerance:
            raise TimestampOutOfRange(
                f"webhook timestamp is {now - timestamp:+.0f}s from now, beyond the "
                f"tolerance of {self._tolerance:g}s: check the sender's clock"
            )

    def _standard_webhooks(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        msg_id = _header(headers, "webhook-id")
        stamp = _header(headers, "webhook-timestamp")
        signature = _header(headers, "webhook-signature")
        if not (msg_id and stamp and signature):
            raise SignatureError(
                "missing webhook-id, webhook-timestamp or webhook-signature header"
            )
        timestamp = _timestamp(stamp, "webhook-timestamp")
        try:
            # aiohttp decodes header bytes as UTF-8 with surrogateescape: undo it to
            # sign the bytes that were sent; a surrogate it cannot map is malformed.
            prefix = _utf8(f"{msg_id}.{stamp}.")
        except UnicodeEncodeError:
            raise SignatureError("header webhook-id is not valid text") from None
        # The header is a space-separated list of "<version>,<base64>"; only v1 is
        # HMAC-SHA256 (v1a is Ed25519): skip the rest (spec: "Signature scheme").
        given = []
        for item in signature.split():
            version, _, value = item.partition(",")
            if version == "v1" and (digest := _b64_digest(value)) is not None:
                given.append(digest)
        if not given:
            raise SignatureError("header webhook-signature holds no v1 signature")
        if not self._match(self._digests(prefix, body), given):
            raise SignatureError("no secret matches the webhook signature")
        # Time after signature: only an authentic but stale or early request is told
        # TIMESTAMP_OUT_OF_RANGE, so a forger learns nothing about our clock.
        self._check_time(timestamp, now)

    def _stripe(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        name = self._header_name
        value = _header(headers, name)
        if not value:
            raise SignatureError(f"missing {name} header")
        # "t=<unix>,v1=<hex>,v1=<hex>,v0=...": unknown keys are skipped, as Stripe's
        # libraries do, so a future scheme can be added alongside v1.
        stamps: list[str] = []
        given: list[bytes] = []
        for item in value.split(","):
            key, sep, field = item.strip().partition("=")
            if not sep:
                continue
            if key == "t":
                stamps.append(field)
            elif key == "v1" and (digest := _hex_digest(field)) is not None:
                given.append(digest)
        if len(stamps) != 1:
            raise SignatureError(f"header {name} must hold exactly one t=<unix time>")
        timestamp = _timestamp(stamps[0], name)
        if not given:
            raise SignatureError(f"header {name} holds no v1 signature")
        if not self._match(self._digests(stamps[0].encode(), b".", body), given):
            raise SignatureError("no secret matches the webhook signature")
        self._check_time(timestamp, now)

    def _github(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        # No timestamp in this scheme: replays are caught by event-id deduplication.
        name = self._header_name
        value = _header(headers, name)
        if not value:
            raise SignatureError(f"missing {name} header")
        algorithm, sep, hex_value = value.strip().partition("=")
        digest = _hex_digest(hex_value) if sep and algorithm == "sha256" else None
        if digest is None:
            raise SignatureError(f"header {name} must be sha256=<64 hex digits>")
        if not self._match(self._digests(body), [digest]):
            raise SignatureError("no secret matches the webhook signature")

    def _hmac_hex(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        name = self._header_name
        value = _header(headers, name)
        if not value:
            raise SignatureError(f"missing {name} header")
        digest = _hex_digest(value.strip())
        if digest is None:
            raise SignatureError(f"header {name} must be 64 hex digits")
        if not self._match(self._digests(body), [digest]):
            raise SignatureError("no secret matches the webhook signature")


def verify(config: SignatureConfig, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
    """
    Verify one request against ``config``; see :meth:`Verifier.verify`.

    Convenience for one-off checks: it prepares the keys on every call, so the
    request path builds one :class:`Verifier` per source instead.
    """
    Verifier(config).verify(headers, body, now)


def sign(
    scheme: Scheme,
    secret: str,
    body: bytes,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
    header: str | None = None,
) -> dict[str, str]:
    """
    The headers that sign ``body`` for ``scheme`` (test sender, demo, benchmarks).

    Args:
        scheme: one of the four schemes.
        secret: ``whsec_<base64>`` for standard-webhooks, else the shared text.
        body: the exact bytes that will be sent.
        msg_id: the standard-webhooks ``webhook-id``; defaults to a digest of the
            body, so resending the same body keeps its id, as a retry should.
        timestamp: Unix seconds; defaults to the current time (the one clock read
            in this module, for callers that just want a fresh request).
        header: the signature header name, for stripe, github and hmac-sha256-hex.

    Raises:
        ValueError: unknown scheme, or a standard-webhooks secret that is not base64.
    """
    if scheme not in DEFAULT_HEADERS:
        raise ValueError(f"unknown signature scheme {scheme!r}")
    name = header or DEFAULT_HEADERS[scheme]
    if scheme == "github":
        digest = hmac.digest(_utf8(secret), body, "sha256").hex()
        return {name: f"sha256={digest}"}
    if scheme == "hmac-sha256-hex":
        return {name: hmac.digest(_utf8(secret), body, "sha256").hex()}
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    if scheme == "stripe":
        digest = hmac.digest(_utf8(secret), f"{stamp}.".encode() + body, "sha256").hex()
        return {name: f"t={stamp},v1={digest}"}
    if msg_id is None:
        msg_id = "msg_" + hashlib.sha256(body).hexdigest()[:24]
    content = _utf8(f"{msg_id}.{stamp}.") + body
    mac = base64.b64encode(hmac.digest(decode_whsec(secret), content, "sha256")).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": f"v1,{mac}"}
