"""
The contract every poll provider handler keeps (CONTRACT §9; STYLE: "a shared contract
test suite"), like :mod:`tests.handlers.contract` for webhook providers.

A provider's test module subclasses :class:`PollProviderContract` and fills in its
class attributes with a resource and recorded answers to its first planned request;
the base class then proves what the poll runtime relies on:

* ``PROVIDER`` satisfies :class:`handlers.polling.PollProvider` and is found as
  ``handlers.<name>.PROVIDER`` (no central list);
* its resource model is frozen and forbids unknown keys; plans are deterministic;
* every valid answer parses to a :class:`Page` whose records have unique keys,
  hashes that are :func:`content_hash` of their content, and publishable data;
* the same content with other key order and whitespace gives the same records;
* change ids are stable, and differ when the previous hash differs;
* bodies that are not JSON are ``invalid_json``; JSON nested deeper than
  ``handlers.MAX_DEPTH`` is ``too_deep``; wrong shapes ``schema_violation``, each with a
  short detail that does not echo the body;
* no input, however broken, makes ``parse``, ``redirect`` or ``reject`` raise.
"""

from __future__ import annotations

import importlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from handlers import Event, Quarantine
from handlers.polling import Page, PollProvider, PollRequest, Record, content_hash, loads_exact

from .contract import PROPERTY

# Routing keys are AMQP shortstrs: at most 255 bytes (AMQP 0-9-1 §4.2.5.3).
_SHORTSTR = 255
# A quarantine detail is a header value for people: short, one line, never the payload.
_MAX_DETAIL = 1000
_ROUTING_KEY = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
OBSERVED = datetime(2026, 11, 24, 10, 30, tzinfo=UTC)

NOT_JSON: tuple[bytes, ...] = (
    b"",
    b" ",
    b"{",
    b"not json",
    b"<html><body>502 Bad Gateway</body></html>",
    b'{"data": [],}',
    b"\xff\xfe\x00",
    b'{"data": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate is not UTF-8
    b'{"data": "\\ud800"}',  # an escaped lone surrogate is not Unicode text
    b"\xef\xbb\xbf{}",  # RFC 8259 §8.1: no byte order mark
    b"NaN",
    b'{"data": [Infinity]}',
    b"[1, 2",
    b"[" * 100_000,
    b"[" * 5_000 + b"]" * 5_000,  # JSON, but nested past the recursion limit
)
# JSON that parses but nests deeper than handlers.MAX_DEPTH: quarantined as too_deep.
TOO_DEEP: tuple[bytes, ...] = (
    b'{"data": ' + b"[" * 100 + b"]" * 100 + b"}",
    b"[" * 65 + b"]" * 65,
    b'{"data": [{"chain": "x", "isin": "x", "extra": ' + b'{"a": ' * 80 + b"1" + b"}" * 80 + b"}]}",
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    """JSON with Decimals written as their exact digits (for bodies built in tests)."""
    return respell(value, indent=None).encode()


def respell(value: Any, *, indent: int | None = 2, level: int = 0) -> str:
    """
    ``value`` as JSON text with every object's keys reversed and other whitespace,
    Decimals written with their exact digits: the same content, spelled differently.
    """
    if isinstance(value, dict):
        parts = [
            f"{json.dumps(k)} :\t{respell(v, indent=indent, level=level + 1)}"
            for k, v in reversed(value.items())
        ]
        return _join("{", parts, "}", indent, level)
    if isinstance(value, list):
        parts = [respell(v, indent=indent, level=level + 1) for v in value]
        return _join("[", parts, "]", indent, level)
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value)


def _join(opening: str, parts: list[str], closing: str, indent: int | None, level: int) -> str:
    if indent is None:
        return opening + ",".join(parts) + closing
    inner = "\n" + " " * indent * (level + 1)
    return opening + inner + ("," + inner).join(parts) + "\n" + " " * indent * level + closing


class PollProviderContract:
    """
    Base class of every poll provider's test class (not collected on its own).

    Subclasses set:

    * ``provider`` - the module's ``PROVIDER``;
    * ``resource`` - one valid ``resources:`` entry, as read from YAML;
    * ``invalid_resources`` - entries the resource model must refuse;
    * ``today`` - the date plans are made on;
    * ``valid_bodies`` - recorded 2xx answers to the first planned request, each
      with at least one record;
    * ``invalid_bodies`` - JSON answers of the wrong shape (``schema_violation``).
    """

    provider: ClassVar[PollProvider]
    resource: ClassVar[Mapping[str, Any]]
    invalid_resources: ClassVar[Sequence[Mapping[str, Any]]]
    today: ClassVar[date] = date(2026, 11, 24)
    valid_bodies: ClassVar[Sequence[bytes]]
    invalid_bodies: ClassVar[Sequence[bytes]]

    # --- helpers -------------------------------------------------------------------

    def model(self) -> BaseModel:
        return self.provider.resource_model.model_validate(self.resource)

    def request(self) -> PollRequest:
        return self.provider.plan(self.model(), aliases={}, today=self.today)[0]

    def page(self, body: bytes) -> Page:
        result = self.provider.parse(self.request(), body)
        assert isinstance(result, Page), f"{body[:200]!r} was quarantined: {result}"
        return result

    def records(self, body: bytes) -> list[Record]:
        records = list(self.page(body).records)
        assert records, "a valid sample must hold at least one record"
        return records

    # --- the provider ---------------------------------------------------------------

    def test_satisfies_protocol(self) -> None:
        """PROVIDER is a PollProvider of kind poll with a lower-case name and event types."""
        provider = self.provider
        assert isinstance(provider, PollProvider)
        assert provider.kind == "poll"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", provider.name)
        assert issubclass(provider.resource_model, BaseModel)
        assert provider.data_models
        for event_type in provider.data_models:
            assert _ROUTING_KEY.fullmatch(event_type), event_type
            assert event_type.startswith(f"{provider.name}.")
            assert len(event_type.encode()) <= _SHORTSTR

    def test_found_by_module_name(self) -> None:
        """handlers/<name>.py defines PROVIDER: the runtime finds it with no central list."""
        module = importlib.import_module(f"handlers.{self.provider.name}")
        assert module.PROVIDER is self.provider

    def test_has_samples(self) -> None:
        """The subclass gives valid and invalid resources and bodies."""
        assert self.valid_bodies
        assert self.invalid_bodies
        assert self.invalid_resources

    def test_resource_model_is_frozen_and_forbids_unknown_keys(self) -> None:
        """The resource model refuses unknown keys and cannot be changed once made."""
        model = self.model()
        with pytest.raises(ValidationError):
            self.provider.resource_model.model_validate({**self.resource, "surprise": 1})
        field = next(iter(type(model).model_fields))
        with pytest.raises(ValidationError):
            setattr(model, field, getattr(model, field))

    def test_invalid_resources_are_refused(self) -> None:
        """Every invalid resource entry is a ValidationError naming where it is wrong."""
        for entry in self.invalid_resources:
            with pytest.raises(ValidationError) as caught:
                self.provider.resource_model.model_validate(entry)
            assert all(error["loc"] for error in caught.value.errors()), entry

    def test_plan_is_deterministic_and_well_formed(self) -> None:
        """plan gives the same requests every time: relative targets, items, JSON bodies."""
        first = self.provider.plan(self.model(), aliases={}, today=self.today)
        assert first
        assert first == self.provider.plan(self.model(), aliases={}, today=self.today)
        for request in first:
            assert request.method in ("GET", "POST")
            assert request.target.startswith("/")
            assert request.items
            assert (request.body is not None) == (request.method == "POST")
            if request.body is not None:
                orjson.loads(request.body)

    def test_describe_is_a_short_stable_label(self) -> None:
        """describe is one short line, the same every time."""
        label = self.provider.describe(self.model())
        assert label
        assert label == self.provider.describe(self.model())
        assert "\n" not in label
        assert len(label) <= 1000

    def test_auth_headers_carry_the_key(self) -> None:
        """auth_headers puts the API key in a header."""
        headers = self.provider.auth_headers("k-123")
        assert any("k-123" in value for value in headers.values())

    # --- answers ----------------------------------------------------------------------

    def test_valid_bodies_parse_to_records(self) -> None:
        """Valid answers give records with unique keys, content hashes and publishable data."""
        for body in self.valid_bodies:
            records = self.records(body)
            assert len({r.key for r in records}) == len(records)
            for record in records:
                assert record.key
                assert record.hash == content_hash(record.content)
                orjson.dumps(dict(record.data))
                orjson.dumps(dict(record.content))
            assert self.page(body) == self.page(bytes(body))

    def test_key_order_and_whitespace_do_not_matter(self) -> None:
        """The same content spelled with other key order and whitespace gives the same records."""
        for body in self.valid_bodies:
            respelled = respell(loads_exact(body)).encode()
            assert respelled != body
            assert self.page(respelled).records == self.page(body).records

    def test_change_ids_are_stable_and_follow_the_previous_hash(self) -> None:
        """A change id is the same every time, and differs when the previous hash differs."""
        for body in self.valid_bodies:
            for record in self.records(body):
                first = self.provider.change_event(record, None, observed=OBSERVED)
                assert first == self.provider.change_event(record, None, observed=OBSERVED)
                assert first.type in self.provider.data_models
                assert first.time == OBSERVED
                uuid.UUID(first.id)
                orjson.dumps(dict(first.data))
                ids = {first.id}
                self.provider.data_models[first.type].model_validate(dict(first.data))
                for other in ("0" * 64, "f" * 64):
                    previous = Record(record.key, {}, {"x": other}, other)
                    event = self.provider.change_event(record, previous, observed=OBSERVED)
                    orjson.dumps(dict(event.data))
                    self.provider.data_models[event.type].model_validate(dict(event.data))
                    ids.add(event.id)
                assert len(ids) == 3
                # From a key's third change on the count of changes before it is in the
                # id too (a value flipping back and forth repeated ids): each count its own.
                other = "0" * 64
                counted = {
                    self.provider.change_event(
                        record,
                        Record(record.key, {}, {"x": other}, other, changes=n),
                        observed=OBSERVED,
                    ).id
                    for n in range(5)
                }
                assert len(counted) == 4  # (0 and 1: the contract's id; 2, 3, 4: their own)
                assert counted & ids

    def test_first_sight_names_every_compared_field(self) -> None:
        """On first sight, changed lists every compared field and previous is null."""
        for body in self.valid_bodies:
            for record in self.records(body):
                data = self.provider.change_event(record, None, observed=OBSERVED).data
                assert data["changed"] == sorted(record.content)
                assert data["previous"] is None

    def test_not_json_is_invalid_json(self) -> None:
        """Bytes that are not JSON, not UTF-8, or not publishable JSON are invalid_json."""
        for body in NOT_JSON:
            result = self.provider.parse(self.request(), body)
            assert isinstance(result, Quarantine), body[:40]
            assert result.reason == "invalid_json", (body[:40], result)
            self._check_detail(result, body)

    def test_deep_json_is_too_deep(self) -> None:
        """JSON nested deeper than handlers.MAX_DEPTH is quarantined as too_deep."""
        for body in TOO_DEEP:
            result = self.provider.parse(self.request(), body)
            assert isinstance(result, Quarantine), body[:40]
            assert result.reason == "too_deep", (body[:40], result)
            self._check_detail(result, body)
        within = b'{"data": [], "x": ' + b"[" * 60 + b"]" * 60 + b"}"
        assert isinstance(self.provider.parse(self.request(), within), Page)

    def test_wrong_shapes_are_schema_violations(self) -> None:
        """Every invalid sample is a schema_violation with a short detail not echoing it."""
        for body in self.invalid_bodies:
            result = self.provider.parse(self.request(), body)
            assert isinstance(result, Quarantine), body
            assert result.reason == "schema_violation", (body, result)
            self._check_detail(result, body)

    def test_a_redirect_elsewhere_is_not_a_rename(self) -> None:
        """A Location that names no new id of the same endpoint is not a rename."""
        for location in ("https://example.invalid/elsewhere", "/", "", "/login?next=/v2"):
            assert self.provider.redirect(self.request(), location) is None

    def test_an_unreadable_rejection_names_no_item(self) -> None:
        """A 400/422 body that is not the provider's error shape names no item."""
        for body in (b"", b"not json", b"{}", b"[]", b'{"errors": "x"}', b'{"errors": [1]}'):
            for status in (400, 422):
                assert self.provider.reject(self.request(), status, body) is None

    # --- never raises -------------------------------------------------------------------

    @PROPERTY
    @given(body=st.binary(max_size=300))
    def test_parse_never_raises_on_bytes(self, body: bytes) -> None:
        """Arbitrary bytes give a Page or a Quarantine with a code, never an exception."""
        self._check_verdict(self.provider.parse(self.request(), body))

    @PROPERTY
    @given(value=json_values)
    def test_parse_never_raises_on_json(self, value: Any) -> None:
        """Arbitrary JSON gives a Page or a Quarantine with a code, never an exception."""
        self._check_verdict(self.provider.parse(self.request(), dumps(value)))

    @PROPERTY
    @given(data=st.data())
    def test_parse_never_raises_on_damaged_samples(self, data: st.DataObject) -> None:
        """A valid answer with one field replaced or removed gives a verdict, never an exception."""
        body = data.draw(st.sampled_from(self.valid_bodies), label="sample")
        payload = loads_exact(body)
        target = payload
        rows = payload.get("data")
        if isinstance(rows, list) and rows and data.draw(st.booleans(), label="in a row"):
            target = rows[data.draw(st.integers(0, len(rows) - 1), label="row")]
        if isinstance(target, dict) and target:
            key = data.draw(st.sampled_from(sorted(target)), label="key")
            if data.draw(st.booleans(), label="remove"):
                del target[key]
            else:
                target[key] = data.draw(json_values, label="value")
        self._check_verdict(self.provider.parse(self.request(), dumps(payload)))

    @PROPERTY
    @given(
        body=st.binary(max_size=200) | json_values.map(dumps), status=st.sampled_from([400, 422])
    )
    def test_reject_never_raises(self, body: bytes, status: int) -> None:
        """reject on any body gives Rejected or None, never an exception."""
        result = self.provider.reject(self.request(), status, body)
        if result is not None:
            assert result.items
            assert set(result.items) <= set(self.request().items)

    @PROPERTY
    @given(location=st.text(max_size=120))
    def test_redirect_never_raises(self, location: str) -> None:
        """redirect on any Location gives a Renamed or None, never an exception."""
        renamed = self.provider.redirect(self.request(), location)
        if renamed is not None:
            assert renamed.follow.items == self.request().items
            assert renamed.follow.target.startswith("/")

    # --- checks ---------------------------------------------------------------------------

    @staticmethod
    def _check_detail(result: Quarantine, body: bytes) -> None:
        assert result.detail
        assert len(result.detail) <= _MAX_DETAIL
        assert "\n" not in result.detail
        if len(body) > 64:
            assert body.decode(errors="replace") not in result.detail

    def _check_verdict(self, result: object) -> None:
        assert isinstance(result, Page | Quarantine), result
        if isinstance(result, Quarantine):
            assert result.reason in ("invalid_json", "too_deep", "schema_violation"), result
            assert result.detail
            assert len(result.detail) <= _MAX_DETAIL
            assert "\n" not in result.detail
            return
        for warning in result.warnings:
            assert "\n" not in warning
        for record in result.records:
            assert record.hash == content_hash(record.content)
            event = self.provider.change_event(record, None, observed=OBSERVED)
            assert isinstance(event, Event)
            orjson.dumps(dict(event.data))  # publishable
