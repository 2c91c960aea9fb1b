"""The shared handler helpers (handlers.base)."""

from __future__ import annotations

import orjson

from handlers.base import MAX_DEPTH, too_deep


def test_too_deep_counts_levels_not_brackets() -> None:
    """Nesting decides, at exactly the limit and past it, whatever the strings hold."""
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    past = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    brackets_in_strings = orjson.dumps({"a": "[{" * 500, "b": [{"c": ["[" * 100]}]})
    for raw, deep in ((at_limit, False), (past, True), (brackets_in_strings, False)):
        value = orjson.loads(raw)
        assert too_deep(value, raw=raw) is deep
        assert too_deep(value, raw=raw.encode() if isinstance(raw, str) else raw) is deep
