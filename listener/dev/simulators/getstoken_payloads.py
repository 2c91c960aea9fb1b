"""
What the Get Smart Token sender sends (CONTRACT §5): event types with their share of
traffic, and the payload of event ``n``, derived from ``(seed, n)`` alone so runs are
reproducible, with optional bad payloads. :mod:`.getstoken` sends them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

__all__ = ["BAD_KINDS", "EVENT_TYPES", "MAX_RETRY_WAIT", "BadKind", "make_payload"]

# CONTRACT §5 table, with the share of traffic each type gets (weights).
EVENT_TYPES: Final[Mapping[str, int]] = {
    "user.created": 8,
    "user.updated": 8,
    "token.minted": 16,
    "token.transferred": 24,
    "badge.issued": 12,
    "badge.revoked": 3,
    "achievement.progressed": 20,
    "achievement.completed": 9,
}
_TYPES: Final = tuple(EVENT_TYPES)
_WEIGHTS: Final = tuple(EVENT_TYPES.values())
_USERS: Final = 500
_NAMES: Final = ("satoshi", "ada", "grace", "linus", "ken", "barbara", "alan", "margaret")
_COUNTRIES: Final = ("DE", "FR", "US", "BR", "JP", "NG", "IN", "GB", "ES", "KR")
_BADGES: Final = ("early_adopter", "diamond_hands", "whale", "streak_7d", "referrer", "og")
_TIERS: Final = ("bronze", "silver", "gold", "platinum")
_ACHIEVEMENTS: Final = ("first_trade", "hodl_30d", "ten_referrals", "mint_100", "daily_login")
_MINT_REASONS: Final = ("purchase", "reward", "airdrop", "staking")
BAD_KINDS: Final = ("invalid_json", "amount_number", "missing_field", "progress_range")
# Largest Retry-After honoured between attempts, so stop() is never held up for long.
MAX_RETRY_WAIT: Final = 2.0

BadKind = Literal["invalid_json", "amount_number", "missing_field", "progress_range"]


def _hex(text: str, size: int = 8) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def _decimal(units: int, places: int) -> str:
    """``units`` of 10**-places as a decimal string (CONTRACT §5: amounts are strings)."""
    whole, frac = divmod(units, 10**places)
    return f"{whole}.{frac:0{places}d}"


def _user(index: int) -> str:
    return f"usr_{_hex(f'user/{index}', 6)}"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def _data(event_type: str, n: int, rng: random.Random) -> dict[str, Any]:
    """Realistic ``data`` for ``event_type``: the required fields plus a few extras."""
    user_index = rng.randrange(_USERS)
    user = _user(user_index)
    if event_type in {"user.created", "user.updated"}:
        name = f"{rng.choice(_NAMES)}_{user_index}"
        data: dict[str, Any] = {
            "user_id": user,
            "username": name,
            "country": rng.choice(_COUNTRIES),
        }
        if event_type == "user.created":
            data["email"] = f"{name}@example.com"
            data["referrer_id"] = _user(rng.randrange(_USERS)) if rng.random() < 0.3 else None
        else:
            data["changed"] = rng.sample(["username", "country", "avatar_url"], k=rng.randint(1, 2))
        return data
    if event_type == "token.minted":
        return {
            "tx_id": f"tx_{_hex(f'tx/{n}', 12)}",
            "user_id": user,
            "amount": _decimal(rng.randrange(1, 5_000_000_000), 6),
            "symbol": "GST",
            "reason": rng.choice(_MINT_REASONS),
        }
    if event_type == "token.transferred":
        receiver = _user((user_index + rng.randrange(1, _USERS)) % _USERS)
        return {
            "tx_id": f"tx_{_hex(f'tx/{n}', 12)}",
            "from_user_id": user,
            "to_user_id": receiver,
            "amount": _decimal(rng.randrange(1, 2_000_000_000), 6),
            "fee": _decimal(rng.randrange(100, 10_000), 6),
            "symbol": "GST",
        }
    if event_type in {"badge.issued", "badge.revoked"}:
        data = {
            "badge_id": f"bdg_{_hex(f'badge/{n}', 6)}",
            "user_id": user,
            "badge_type": rng.choice(_BADGES),
            "tier": rng.choice(_TIERS),
        }
        if event_type == "badge.revoked":
            data["reason"] = rng.choice(("expired", "abuse", "downgrade"))
        return data
    achievement = rng.choice(_ACHIEVEMENTS)
    if event_type == "achievement.progressed":
        steps = rng.randint(2, 20)
        step = rng.randint(1, steps - 1)
        return {
            "achievement_id": f"ach_{achievement}",
            "user_id": user,
            "progress": round(step / steps, 4),
            "step": step,
            "steps_total": steps,
        }
    return {
        "achievement_id": f"ach_{achievement}",
        "user_id": user,
        "reward_amount": _decimal(rng.randrange(1, 500) * 1_000_000, 6),
    }


def make_payload(
    n: int,
    *,
    seed: int = 0,
    id_prefix: str = "evt_",
    environment: str = "production",
    created_at: datetime | None = None,
    bad: BadKind | None = None,
) -> tuple[str, str, bytes]:
    """
    The webhook body of event ``n``: ``(event id, event type, body bytes)``.

    The type and data depend on ``(seed, n)`` only. ``bad`` spoils the body on
    purpose: ``invalid_json`` truncates it; the others break the schema of §5.
    """
    rng = random.Random(f"{seed}/{n}")  # noqa: S311 - reproducible test data, not secrets
    event_type = rng.choices(_TYPES, weights=_WEIGHTS)[0]
    event_id = f"{id_prefix}{n}"
    data = _data(event_type, n, rng)
    if bad == "amount_number":
        event_type = "token.minted"
        data = {"tx_id": f"tx_{_hex(f'tx/{n}', 12)}", "user_id": _user(0), "amount": 12.5}
    elif bad == "missing_field":
        data.pop("user_id", None)
        data.pop("from_user_id", None)
    elif bad == "progress_range":
        event_type = "achievement.progressed"
        data = {"achievement_id": "ach_first_trade", "user_id": _user(1), "progress": 1.5}
    payload = {
        "id": event_id,
        "type": event_type,
        "created_at": _rfc3339(created_at or datetime.now(UTC)),
        "environment": environment,
        "data": data,
    }
    body = orjson.dumps(payload)
    if bad == "invalid_json":
        body = body[: len(body) // 2]  # still holds the id, so it stays unique per n
    return event_id, event_type, body
