"""
Which stored events an operator means: times, type patterns, and the journal query.

Shared by ``listener replay`` (CONTRACT §2), the admin API's ``/v1/events`` and
``POST /v1/replays`` (§7), the journal's queries and the archive reader, so a window or
a pattern means the same everywhere. Pure: no SQL, no I/O.

* Times (``T``) are ISO-8601 (``2026-11-22T10:00:00Z``; without a zone, UTC) or
  relative to now (``15m``, ``2h``, ``1d``; also ``30s``, ``1w``).
* A window is half-open, ``since <= time < until``, on the CloudEvent ``time`` (when
  the provider says the event happened, else when it was received; CONTRACT §4). The
  journal keeps it in the ``time`` column; archived messages carry it in their body.
* Type patterns are AMQP topic patterns
  (https://www.rabbitmq.com/docs/exchanges#topic): words separated by ``.``, ``*``
  stands for exactly one word and ``#`` for zero or more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "EventFilter",
    "TopicPattern",
    "parse_time",
]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d|w)", re.ASCII)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# Cached pattern verdicts per pattern; routing keys are few (one per event type).
_CACHE_MAX = 10_000


def parse_time(value: str, *, now: float) -> float:
    """
    Unix seconds from ISO-8601 or a relative ``<n><s|m|h|d|w>`` (that long before ``now``).

    Raises:
        ValueError: neither form; the message shows both.
    """
    text = value.strip()
    if match := _RELATIVE.fullmatch(text):
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither ISO-8601 (2026-11-22T10:00:00Z) nor relative (15m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class TopicPattern:
    """An AMQP topic pattern such as ``getstoken.badge.*`` or ``layerx402.#``."""

    def __init__(self, pattern: str) -> None:
        """
        Raises:
            ValueError: an empty word, or ``*``/``#`` inside a word.
        """
        words = tuple(pattern.split("."))
        if not pattern or any(not w for w in words):
            raise ValueError(f"{pattern!r} has an empty word; words are separated by single dots")
        for word in words:
            if word not in {"*", "#"} and ("*" in word or "#" in word):
                raise ValueError(f"{pattern!r}: '*' and '#' stand for whole words, as in a.*.c")
        self.pattern = pattern
        self.literal = not any(w in {"*", "#"} for w in words)
        self._words = words
        self._cache: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"TopicPattern({self.pattern!r})"

    def matches(self, key: str) -> bool:
        """Whether routing key ``key`` matches, as a topic exchange binding would."""
        found = self._cache.get(key)
        if found is None:
            found = self._match(key.split("."))
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _match(self, key: list[str]) -> bool:
        # The positions in ``key`` reachable after each pattern word; ``#`` reaches
        # every position from the first one reachable so far.
        reachable = {0}
        for word in self._words:
            if word == "#":
                reachable = set(range(min(reachable), len(key) + 1))
            else:
                reachable = {i + 1 for i in reachable if i < len(key) and word in {"*", key[i]}}
            if not reachable:
                return False
        return len(key) in reachable


@dataclass(frozen=True, slots=True)
class EventFilter:
    """A selection of events by source, type pattern and ``[since, until)`` window."""

    source: str | None = None
    types: TopicPattern | None = None
    since: float | None = None
    until: float | None = None

    def accepts(self, *, source: str, type_: str, moment: float) -> bool:
        """Whether an event (its source, CloudEvent type and time) is selected."""
        if self.source is not None and source != self.source:
            return False
        if self.since is not None and moment < self.since:
            return False
        if self.until is not None and moment >= self.until:
            return False
        return self.types is None or self.types.matches(type_)
