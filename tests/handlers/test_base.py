"""The shared handler helpers (handlers.base)."""

from __future__ import annotations

import orjson
import pytest

from handlers.base import MAX_DEPTH, exact_numbers, too_deep


def test_too_deep_counts_levels_not_brackets() -> None:
    """Nesting decides, at exactly the limit and past it, whatever the strings hold."""
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    past = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    brackets_in_strings = orjson.dumps({"a": "[{" * 500, "b": [{"c": ["[" * 100]}]})
    for raw, deep in ((at_limit, False), (past, True), (brackets_in_strings, False)):
        value = orjson.loads(raw)
        assert too_deep(value, raw=raw) is deep
        assert too_deep(value, raw=raw.encode() if isinstance(raw, str) else raw) is deep


# -- numbers kept with their digits ------------------------------------------------------

LONG = (
    b'{"big": 123456789012345678901234567890, "low": -9223372036854775809,'
    b' "u64": 18446744073709551615, "fine": 1.10, "digits": 0.12345678901234567891,'
    b' "tiny": 1e-400, "text": "1234567890123456789", "nested": [[98765432109876543210]]}'
)


def test_numbers_orjson_cannot_hold_are_written_back_as_sent() -> None:
    """orjson reads them as the nearest double; exact_numbers keeps the digits."""
    parsed = orjson.loads(LONG)
    assert orjson.dumps(parsed["big"]) == b"1.2345678901234568e+29"  # what went out before
    kept = exact_numbers(parsed, raw=LONG)
    assert orjson.loads(orjson.dumps(kept)) == orjson.loads(orjson.dumps(parsed))  # (shape)
    out = orjson.dumps(kept)
    for digits in (
        b'"big":123456789012345678901234567890',
        b'"low":-9223372036854775809',
        b'"u64":18446744073709551615',
        b'"digits":0.12345678901234567891',
        b'"tiny":1e-400',
        b'"text":"1234567890123456789"',
        b'"nested":[[98765432109876543210]]',
    ):
        assert digits in out, (digits, out)
    assert b'"fine":1.1' in out  # the same value, written shorter: no need to keep it
    assert exact_numbers(parsed, raw=LONG.decode()) is not parsed  # str input too


@pytest.mark.parametrize(
    "raw",
    [
        b'{"ts": 1764000000000, "price": "1.25", "id": "12345678901234567890"}',  # no float
        b'{"ts": 1764000000000, "price": 1.25, "n": [123456789012345]}',  # no long number
    ],
)
def test_what_orjson_held_exactly_is_not_parsed_again(raw: bytes) -> None:
    parsed = orjson.loads(raw)
    assert exact_numbers(parsed, raw=raw) is parsed


def test_a_long_integer_is_kept_as_text_never_converted() -> None:
    """(int() of a long digit string is slow, and refused past 4,300 digits.)"""
    raw = b'{"n": ' + b"7" * 300 + b"}"  # (orjson takes it as a double, 7.7e299)
    assert orjson.dumps(exact_numbers(orjson.loads(raw), raw=raw)) == b'{"n":' + b"7" * 300 + b"}"
