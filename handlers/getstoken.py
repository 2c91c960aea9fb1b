"""
Get Smart Token webhooks (CONTRACT §5): payload models and the parse function.

A verified body is the envelope::

    {"id": "evt_...", "type": "badge.issued", "created_at": "<RFC 3339>",
     "environment": "production", "data": {...}}

and becomes an :class:`~handlers.Event` with the payload's ``id``, the type
``getstoken.<type>``, the time ``created_at`` and ``data`` exactly as sent (extra
fields kept; amounts stay decimal strings). Input that does not fit becomes a
:class:`~handlers.Quarantine` with one of these reasons:

* ``invalid_json`` - not JSON (or not UTF-8);
* ``schema_violation`` - the envelope or a known type's ``data`` does not fit;
  the detail names the fields, never their values;
* ``environment_mismatch`` - ``environment`` is not the source's;
* ``unknown_type`` - a type not in the table, when the source says to quarantine.

Pure: no I/O, no logging, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationError,
)

from handlers.base import (
    MAX_DEPTH,
    Event,
    Quarantine,
    describe_errors,
    exact_numbers,
    too_deep,
)

__all__ = [
    "DATA_MODELS",
    "PROVIDER",
    "AchievementCompleted",
    "AchievementProgressed",
    "BadgeData",
    "Envelope",
    "GetSmartToken",
    "OtherData",
    "Settings",
    "TokenMinted",
    "TokenTransferred",
    "UserData",
]

NAME = "getstoken"

# RFC 3339 §5.6 date-time, "T" or space (its note) and any fraction length. Checked
# before pydantic parses it, because pydantic would also take Unix times and dates.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)
# Decimal strings as the provider sends amounts: no sign, exponent or float
# spelling; they stay strings end to end so no precision is lost.
# (pydantic's patterns run on Rust's regex, where "$" is the very end; Python's "$"
# also matches before a final newline, hence fullmatch on the unanchored form.)
_DECIMAL = r"[0-9]+(?:\.[0-9]+)?"
_DECIMAL_RE = re.compile(_DECIMAL, re.ASCII)


def _rfc3339(value: object) -> object:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time such as 2026-11-22T10:00:00Z")
    # A leap second (RFC 3339 allows second 60; Python's datetime does not) is read as
    # the second before it, for the CloudEvent's time; data keeps it as sent.
    return value[:17] + "59" + value[19:] if value[17:19] == "60" else value


def _in_utc_range(value: datetime) -> datetime:
    # 9999-12-31T23:59:59-23:59 parses, but is past the last instant UTC can hold
    # (datetime.max): the CloudEvent time could not be written.
    try:
        value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("out of range: must convert to UTC within years 1 to 9999") from None
    return value


def _progress(value: object) -> Decimal:
    # A fraction 0..1, as a JSON number or a decimal string. bool is an int in
    # Python; true/false are not progress.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a number or decimal string from 0 to 1")
    if isinstance(value, str):
        if not _DECIMAL_RE.fullmatch(value):
            raise ValueError("expected a number or decimal string from 0 to 1")
        number = Decimal(value)
    else:
        number = Decimal(value)  # exact, also for floats
    if not number.is_finite() or not 0 <= number <= 1:
        raise ValueError("must be from 0 to 1")
    return number


# Ids are non-empty text; numbers are refused (pydantic does not coerce them to str).
Id = Annotated[str, StringConstraints(min_length=1)]
Amount = Annotated[str, StringConstraints(pattern=f"^{_DECIMAL}$")]
Progress = Annotated[Decimal, BeforeValidator(_progress)]
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc_range)]


class _Data(BaseModel):
    """Base of the ``data`` models: extra fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", frozen=True)


class UserData(_Data):
    """``user.created``, ``user.updated``."""

    user_id: Id


class TokenMinted(_Data):
    """``token.minted``."""

    tx_id: Id
    user_id: Id
    amount: Amount


class TokenTransferred(_Data):
    """``token.transferred``."""

    tx_id: Id
    from_user_id: Id
    to_user_id: Id
    amount: Amount


class BadgeData(_Data):
    """``badge.issued``, ``badge.revoked``."""

    badge_id: Id
    user_id: Id
    badge_type: Id


class AchievementProgressed(_Data):
    """``achievement.progressed``."""

    achievement_id: Id
    user_id: Id
    progress: Progress


class AchievementCompleted(_Data):
    """``achievement.completed``."""

    achievement_id: Id
    user_id: Id


class OtherData(_Data):
    """A type outside the table, published as sent (``unknown_types: publish``)."""


# The table of CONTRACT §5: a known type → the model of its data.
DATA_MODELS: dict[str, type[_Data]] = {
    "user.created": UserData,
    "user.updated": UserData,
    "token.minted": TokenMinted,
    "token.transferred": TokenTransferred,
    "badge.issued": BadgeData,
    "badge.revoked": BadgeData,
    "achievement.progressed": AchievementProgressed,
    "achievement.completed": AchievementCompleted,
}


class Envelope(BaseModel):
    """The payload around every event's ``data``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # The id becomes the AMQP message_id, a shortstr of at most 255 bytes
    # (AMQP 0-9-1 §4.2.5.3): printable ASCII keeps bytes = characters.
    id: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,255}$")]
    # The type becomes the routing key "getstoken.<type>": dot-separated words
    # (RabbitMQ topic exchanges), the whole at most 255 bytes.
    type: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$", max_length=245)
    ]
    created_at: Rfc3339
    environment: Literal["production", "sandbox"]
    data: dict[str, Any]


class Settings(BaseModel):
    """The source keys of a ``provider: getstoken`` webhook source (CONTRACT §5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Events of the other environment are quarantined (``environment_mismatch``).
    environment: Literal["production", "sandbox"] = "production"
    #: Publish types outside CONTRACT §5's table as they are, or quarantine them.
    unknown_types: Literal["publish", "quarantine"] = "publish"


class GetSmartToken:
    """The Get Smart Token webhook provider (satisfies :class:`handlers.WebhookProvider`)."""

    name: str = NAME
    kind: Literal["webhook"] = "webhook"
    data_models: Mapping[str, type[BaseModel]] = {f"{NAME}.{t}": m for t, m in DATA_MODELS.items()}
    settings_model: type[Settings] = Settings

    def other_data_models(self, settings: Settings) -> Mapping[str, type[BaseModel]]:
        """Types outside the table go out as ``getstoken.<type>`` unless quarantined."""
        return {f"{NAME}.{{type}}": OtherData} if settings.unknown_types == "publish" else {}

    def parse(
        self, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None
    ) -> Event | Quarantine:
        """
        Turn a verified webhook body into an event or a quarantine verdict.

        Args:
            body: the raw request body.
            settings: the source's environment (other events are quarantined) and what
                to do with types outside the table.
            headers: not used: everything is in the body.
        """
        environment, unknown_types = settings.environment, settings.unknown_types
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return Quarantine("invalid_json", f"not JSON: {exc}")
        if not isinstance(payload, dict):
            return Quarantine("schema_violation", "(payload): expected a JSON object")
        if too_deep(payload, raw=body):
            return Quarantine("too_deep", f"nested deeper than {MAX_DEPTH} levels")
        try:
            envelope = Envelope.model_validate(payload)
        except ValidationError as exc:
            return Quarantine("schema_violation", describe_errors(exc))
        if envelope.environment != environment:
            return Quarantine(
                "environment_mismatch",
                f"event environment {envelope.environment!r} differs from the "
                f"source's {environment!r}",
            )
        # The raw object, not the validated copy: Event.data is the data as sent.
        data: dict[str, Any] = payload["data"]
        model = DATA_MODELS.get(envelope.type)
        if model is None:
            if unknown_types == "quarantine":
                return Quarantine("unknown_type", f"unknown event type {envelope.type!r}")
        else:
            try:
                model.model_validate(data)
            except ValidationError as exc:
                return Quarantine("schema_violation", describe_errors(exc, prefix="data"))
        return Event(
            id=envelope.id,
            type=f"{NAME}.{envelope.type}",
            time=envelope.created_at,
            data=exact_numbers(payload, raw=body)["data"],
        )


PROVIDER = GetSmartToken()
