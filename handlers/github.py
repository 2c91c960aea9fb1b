"""
GitHub webhooks: ``push``, ``release`` and ``issues`` events, signed with
``X-Hub-Signature-256`` (the ``github`` signature scheme of a webhook source).

A small second webhook provider: enough to route and to id. The event type is the
``X-GitHub-Event`` header (for a payload without headers, as redrive replays it, it is
read from the body's shape); the CloudEvent type is ``github.<event>``. Ids are
UUIDv5 over what identifies each event in its payload, so a redelivery (same body)
keeps its id:

=========== ================================================ ==========================
event       id from                                          time
=========== ================================================ ==========================
push        repository.id, ref, after (the new head sha)     head_commit.timestamp
release     repository.id, release.id, action                release.published_at
issues      repository.id, issue.id, action, issue.updated_at issue.updated_at
=========== ================================================ ==========================

Quarantine reasons: ``invalid_json``, ``too_deep``, ``schema_violation`` (the detail
names fields, never values), ``unknown_type`` (another GitHub event: subscribe the hook
to these three only). Pure: no I/O, no logging, no clock.
"""

from __future__ import annotations

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


def _identity(event: str, model: Any) -> tuple[list[str | int], datetime | None]:
    if event == "push":
        head = model.head_commit
        return [model.repository.id, model.ref, model.after], head.timestamp if head else None
    if event == "release":
        release = model.release
        return [model.repository.id, release.id, model.action], release.published_at
    issue = model.issue
    return [model.repository.id, issue.id, model.action, issue.updated_at.isoformat()], (
        issue.updated_at
    )


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
        parts, moment = _identity(event, parsed)
        name = orjson.dumps([event, *parts]).decode()
        return Event(
            id=str(uuid.uuid5(NAMESPACE, name)),
            type=f"{NAME}.{event}",
            time=moment,
            data=exact_numbers(payload, raw=body),
        )


PROVIDER: Final = GitHub()
