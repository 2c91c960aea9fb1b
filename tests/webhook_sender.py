"""A signing Get Smart Token webhook sender for tests (real HTTP over loopback)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp
import orjson

from listener.sources.signatures import sign

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def gst_event(
    event_id: str | None = None,
    *,
    type_: str = "badge.issued",
    environment: str = "production",
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A valid Get Smart Token payload."""
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "type": type_,
        "created_at": "2026-11-22T10:00:00Z",
        "environment": environment,
        "data": data
        if data is not None
        else {"badge_id": "b_1", "user_id": "u_1", "badge_type": "gold", "extra": "kept"},
    }


class Sender:
    """Posts signed webhooks to a running service."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        secret: str = WHSEC,
        scheme: str = "standard-webhooks",
        header: str | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.secret = secret
        self.scheme = scheme
        self.header = header

    async def post(
        self,
        payload: dict[str, Any] | bytes,
        *,
        timestamp: int | None = None,
        headers: dict[str, str] | None = None,
        secret: str | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        signed = sign(
            self.scheme,
            secret or self.secret,
            body,
            msg_id=f"msg_{uuid.uuid4().hex}",
            timestamp=timestamp if timestamp is not None else int(time.time()),
            header=self.header,
        )
        async with self.session.post(
            self.url, data=body, headers={**signed, **(headers or {})}
        ) as response:
            content = await response.read()
            parsed = orjson.loads(content) if content else {}
            return response.status, parsed, dict(response.headers)
