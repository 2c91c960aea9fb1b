"""
The value types of the configuration: durations, sizes, rates, and the frozen base
model whose unknown keys are errors (CONTRACT §3).
"""

from __future__ import annotations

import math
import re
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

__all__ = [
    "Duration",
    "Exchange",
    "Model",
    "PositiveDuration",
    "PositiveSize",
    "Secret",
    "Size",
    "check_amqp_url",
    "mask_url",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "url_secrets",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Parse ``500ms``/``30s``/``5m``/``2h``/``7d`` (or a number of seconds) into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s, 5m, 2h or 7d")
    if isinstance(value, int | float):
        return float(value) if abs(value) < 1e300 else math.inf  # (float() of 10**400 raises)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ValueError(f"expected a duration such as 500ms, 30s, 5m, 2h or 7d, got {value!r}")


def parse_size(value: object) -> int:
    """Parse ``512KiB``/``1MiB``/``1GiB`` (or a number of bytes) into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB, 1MiB or 1GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        size = float(match[1]) * _SIZE_UNITS[match[2]]
        return int(size) if size <= MAX_BYTES else MAX_BYTES + 1  # (int() of inf raises)
    raise ValueError(f"expected a size such as 512KiB, 1MiB or 1GiB, got {value!r}")


# Past ten years a timer overflows (`.inf` in YAML is a float): no key means that much.
MAX_SECONDS = 3650 * 86400.0
MAX_BYTES = 1 << 50  # 1 PiB


def _bounded(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError("expected a duration of at most 3650d")
    return seconds


def _sized(size: int) -> int:
    if size > MAX_BYTES:
        raise ValueError("expected a size of at most 1048576GiB")
    return size


def _filled(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value().strip():
        raise ValueError("must not be empty")
    return secret


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0), AfterValidator(_bounded)]
# Where zero would mean "never wait" (a hot loop) or "time out at once".
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), Field(gt=0), AfterValidator(_bounded)
]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0), AfterValidator(_sized)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0), AfterValidator(_sized)]


def _exchange(name: str) -> str:
    if name.startswith("amq."):
        raise ValueError("names starting with amq. are reserved by RabbitMQ")
    return name


# The daemon names queues after it (`<exchange>.quarantine`, and in a cluster
# `<exchange>.cursor.<unit>`, up to 188 bytes more), and RabbitMQ takes up to 255.
Exchange = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_exchange)]
# A required secret: an empty one (`${VAR}` set to "", an empty file) is a mistake.
Secret = Annotated[SecretStr, AfterValidator(_filled)]


class Model(BaseModel):
    """Frozen; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")


def parse_rate(value: object) -> tuple[int, float]:
    """``800/1m`` → (800 requests, 60.0 seconds); also ``90/60s``, ``5/1s``."""
    if isinstance(value, list | tuple) and len(value) == 2:  # (as dumped: a SIGHUP's check)
        if isinstance(value[0], bool) or not isinstance(value[0], int | str):
            raise ValueError("expected requests per window, such as 800/1m or 90/60s")
        count, window = int(value[0]), parse_duration(value[1])
    elif isinstance(value, str) and (match := _RATE.match(value)) is not None:
        count, window = int(match[1]), parse_duration(match[2])
    else:
        raise ValueError("expected requests per window, such as 800/1m or 90/60s")
    if count < 1 or not window > 0:  # (also NaN)
        raise ValueError("the budget needs at least 1 request in a window longer than 0s")
    return count, _bounded(window)


def check_amqp_url(url: str) -> None:
    """
    Refuse a broker URL that would not parse as written, without echoing it.

    A password holding an unencoded ``#``, ``/``, ``?`` or ``@`` makes the URL parse as
    something else (a fragment, a path...), and the host part then shows the password.

    Raises:
        ValueError: saying what to percent-encode; never the URL or the password.
    """
    parts = urlsplit(url)
    if parts.scheme not in {"amqp", "amqps"}:
        raise ValueError("expected an amqp:// or amqps:// URL")
    rest = url.split("://", 1)[1] if "://" in url else ""
    authority = rest.split("@")[0] if rest.count("@") == 1 else None
    if (
        parts.fragment
        or rest.count("@") > 1
        or (authority is not None and any(c in authority for c in "/?#"))
    ):
        raise ValueError(
            "the user or password holds a character that must be percent-encoded"
            " ('#' as %23, '/' as %2F, '?' as %3F, '@' as %40)"
        )
    if not parts.hostname:
        raise ValueError("no host in the URL (amqp://user:password@host:5672/vhost)")
    try:
        parts.port  # noqa: B018 - parsing the port raises on a bad one
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None


def mask_url(url: str, *, query: bool = False) -> str:
    """
    ``amqp://user:pass@host/`` → ``amqp://user:***@host/``; with ``query``, every query
    value is ``***`` as well (``wss://host/ws?token=***``: a provider's URL may carry a key).
    """
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if query and parts.query:
        fields = (field.partition("=") for field in parts.query.split("&"))
        parts = parts._replace(query="&".join(k + ("=***" if eq else "") for k, eq, _ in fields))
    masked = urlunsplit(parts)
    return url if masked == urlunsplit(urlsplit(url)) else masked


def url_secrets(url: str) -> list[str]:
    """What :func:`mask_url` hides in ``url`` (password, query values), for log redaction."""
    parts = urlsplit(url)
    values = [v for f in parts.query.split("&") if len(v := f.partition("=")[2]) >= 8]
    return [parts.password, *values] if parts.password else values
