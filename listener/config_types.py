"""
The value types of the configuration: durations, sizes, rates, and the frozen base
model whose unknown keys are errors (CONTRACT §3).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["Duration", "Model", "Size", "parse_duration", "parse_rate", "parse_size"]

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
        return float(value)
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
        return int(float(match[1]) * _SIZE_UNITS[match[2]])
    raise ValueError(f"expected a size such as 512KiB, 1MiB or 1GiB, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class Model(BaseModel):
    """Frozen; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")


def parse_rate(value: object) -> tuple[int, float]:
    """``800/1m`` → (800 requests, 60.0 seconds); also ``90/60s``, ``5/1s``."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), parse_duration(value[1])
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected requests per window, such as 800/1m or 90/60s")
    count, window = int(match[1]), parse_duration(match[2])
    if count < 1 or window <= 0:
        raise ValueError("the budget needs at least 1 request in a window longer than 0s")
    return count, window
