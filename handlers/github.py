"""
GitHub webhooks: ``push``, ``release`` and ``issues`` events, signed with
``X-Hub-Signature-256`` (the ``github`` signature scheme of a webhook source).

A small second webhook provider: enough to route and to id. The event type is the
``X-GitHub-Event`` header (for a payload without headers, as redrive replays it, it is
read from the body's shape); the CloudEvent type is ``github.<event>``. The id is a
UUIDv5 of the event name and a SHA-256 of the payload with its keys sorted: a
redelivery, or a captured request replayed (the same body), keeps its id, and two
different events always differ. Fields picked from the payload did not: a release
edited twice (``release.id`` and ``action`` alike) and a ref moved back to a head it
had (``ref`` and ``after`` alike) were dropped as duplicates. ``X-GitHub-Delivery``
would be unique per event too, but the signature does not cover headers: a replay
with another one would pass as new.

=========== ===========================
event       time
=========== ===========================
push        head_commit.timestamp
release     release.published_at
issues      issue.updated_at
=========== ===========================

Quarantine reasons: ``invalid_json``, ``too_deep``, ``schema_violation`` (the detail
names fields, never values), ``unknown_type`` (another GitHub event: subscribe the hook
to these three only). Pure: no I/O, no logging, no clock.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from handlers.base import (
    MAX_DEPTH,
    Event,
    NoSettings,
    Quarantine,
    describe_errors,
    exact_numbers,
    too_deep,
)

__all__ = ["NAMESPACE", "PROVIDER", "GitHub"]

NAME: Final = "github"
# Fixed forever: ids are UUIDv5 in this namespace (RFC 9562 §5.5).
NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://docs.github.com/webhooks#listener-id")
_HEADER: Final = "x-github-event"

Sha = Annotated[StrictStr, StringConstraints(pattern=r"^[0-9a-f]{40}$")]
Text = Annotated[StrictStr, StringConstraints(min_length=1)]


class _Model(BaseModel):
    # Extra fields are allowed and kept (the payload is published as sent).
    model_config = ConfigDict(extra="allow", frozen=True)


class Repository(_Model):
    id: StrictInt
    full_name: Text


class HeadCommit(_Model):
    timestamp: AwareDatetime | None = None


class Push(_Model):
    """``push``: a ref moved to ``after``."""

    ref: Text
    after: Sha
    repository: Repository
    head_commit: HeadCommit | None = None


class Release(_Model):
    id: StrictInt
    tag_name: Text
    published_at: AwareDatetime | None = None


class ReleaseEvent(_Model):
    """``release``: published, created, edited, deleted..."""

    action: Text
    release: Release
    repository: Repository


class Issue(_Model):
    id: StrictInt
    number: StrictInt
    updated_at: AwareDatetime


class IssuesEvent(_Model):
    """``issues``: opened, edited, closed, labeled..."""

    action: Text
    issue: Issue
    repository: Repository


MODELS: Final[Mapping[str, type[_Model]]] = {
    "push": Push,
    "release": ReleaseEvent,
    "issues": IssuesEvent,
}


def _time(event: str, model: Any) -> datetime | None:
    if event == "push":
        return model.head_commit.timestamp if model.head_commit else None
    if event == "release":
        return model.release.published_at  # type: ignore[no-any-return]  # (a pydantic field)
    return model.issue.updated_at  # type: ignore[no-any-return]  # (a pydantic field)


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _event_name(headers: Mapping[str, str], payload: dict[str, Any]) -> str | None:
    for key, value in headers.items():
        if key.lower() == _HEADER:
            return value.strip()
    # No header (a redriven payload): the three events have distinct shapes.
    if "pusher" in payload and "after" in payload:
        return "push"
    if "release" in payload:
        return "release"
    if "issue" in payload and "comment" not in payload:
        return "issues"
    return None


class GitHub:
    """The GitHub webhook provider (satisfies :class:`handlers.WebhookProvider`)."""

    name: str = NAME
    kind: Literal["webhook"] = "webhook"
    data_models: Mapping[str, type[BaseModel]] = {f"{NAME}.{e}": m for e, m in MODELS.items()}
    settings_model: type[NoSettings] = NoSettings

    def parse(
        self, body: bytes, settings: NoSettings, headers: Mapping[str, str]
    ) -> Event | Quarantine:
        """Turn a verified delivery into an event or a quarantine verdict; never raises."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return Quarantine("invalid_json", f"not JSON: {exc}")
        if not isinstance(payload, dict):
            return Quarantine("schema_violation", "(payload): expected a JSON object")
        if too_deep(payload, raw=body):
            return Quarantine("too_deep", f"nested deeper than {MAX_DEPTH} levels")
        event = _event_name(headers, payload)
        model = MODELS.get(event or "")
        if event is None or model is None:
            shown = repr(event[:64]) if event else "none"
            return Quarantine(
                "unknown_type", f"GitHub event {shown}: expected push, release or issues"
            )
        try:
            parsed = model.model_validate(payload)
        except ValidationError as exc:
            return Quarantine("schema_violation", describe_errors(exc))
        data = exact_numbers(payload, raw=body)
        return Event(
            id=str(uuid.uuid5(NAMESPACE, f"{event}:{_digest(data)}")),
            type=f"{NAME}.{event}",
            time=_time(event, parsed),
            data=data,
        )


PROVIDER: Final = GitHub()
