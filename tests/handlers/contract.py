"""
The contract every webhook provider handler keeps (STYLE: "a shared contract test
suite", like FastStream's ``tests/brokers/base``).

A provider's test module subclasses :class:`WebhookProviderContract` and fills in
its class attributes with recorded sample bodies; the base class then proves what
the runtime relies on:

* ``PROVIDER`` satisfies :class:`handlers.WebhookProvider` and is found by name;
* every valid sample parses to an :class:`handlers.Event` whose id is stable (same
  input, same id), whose type is ``<provider>.<event type>`` and fits a routing key,
  and whose data is JSON-serialisable;
* bytes that are not JSON are quarantined as ``invalid_json``; each invalid sample is
  quarantined with its expected reason and a short detail that does not echo it;
* no input, however broken, makes ``parse`` raise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers import MAX_DEPTH, Event, Quarantine, WebhookProvider, load_provider

# Routing keys and AMQP message ids are shortstrs: at most 255 bytes (AMQP 0-9-1 §4.2.5.3).
_SHORTSTR = 255
# A quarantine detail is a header value for people: short, never the payload.
_MAX_DETAIL = 1000
_REASON = re.compile(r"^[a-z][a-z_]*$")

NOT_JSON: tuple[bytes, ...] = (
    b"",
    b" ",
    b"{",
    b"not json",
    b'{"id": "evt_1",}',
    b"\xff\xfe\x00",
    b'{"id": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate is not UTF-8
    b"NaN",
    b"[1, 2",
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

# The same inherited property runs once per provider class: hypothesis sees one method
# called from several executors, which is the design here (each run is independent).
PROPERTY = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)


class WebhookProviderContract:
    """
    Base class of every webhook provider's test class (not collected on its own).

    Subclasses set:

    * ``provider`` - the module's ``PROVIDER``;
    * ``settings`` - the source keys the samples belong to (validated by the
      provider's own ``settings_model``), and ``strict_settings`` - the keys that make
      the provider refuse the most (the invalid samples are checked under them);
    * ``headers`` (or :meth:`headers_for`) - the headers a sample came with;
    * ``valid_bodies`` - recorded bodies of known event types, each a distinct event;
    * ``invalid_bodies`` - ``(body, reason)`` pairs, JSON but not acceptable.
    """

    provider: ClassVar[WebhookProvider]
    settings: ClassVar[Mapping[str, Any]] = {}
    strict_settings: ClassVar[Mapping[str, Any]] = {}
    valid_bodies: ClassVar[Sequence[bytes]]
    invalid_bodies: ClassVar[Sequence[tuple[bytes, str]]]

    headers: ClassVar[Mapping[str, str]] = {}

    def headers_for(self, body: bytes) -> Mapping[str, str]:
        """The request headers a sample came with (default: :attr:`headers`)."""
        return self.headers

    def parse(self, body: bytes, *, strict: bool = False) -> Event | Quarantine:
        keys = {**self.settings, **(self.strict_settings if strict else {})}
        settings = self.provider.settings_model.model_validate(keys)
        return self.provider.parse(body, settings, self.headers_for(body))

    def event(self, body: bytes) -> Event:
        result = self.parse(body)
        assert isinstance(result, Event), f"{body!r} was quarantined: {result}"
        return result

    def test_satisfies_protocol(self) -> None:
        """PROVIDER is a WebhookProvider of kind webhook with a lower-case name."""
        assert isinstance(self.provider, WebhookProvider)
        assert self.provider.kind == "webhook"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", self.provider.name)

    def test_found_by_name(self) -> None:
        """load_provider finds PROVIDER by its name, with no central list."""
        assert load_provider(self.provider.name) is self.provider

    def test_has_samples(self) -> None:
        """The subclass gives valid and invalid samples."""
        assert self.valid_bodies
        assert self.invalid_bodies

    def test_valid_bodies_are_events(self) -> None:
        """Every valid sample becomes an Event typed <provider>.<type>, JSON-serialisable."""
        for body in self.valid_bodies:
            event = self.event(body)
            assert event.type.startswith(f"{self.provider.name}.")
            assert len(event.type.encode()) <= _SHORTSTR
            assert isinstance(event.id, str)
            assert 0 < len(event.id.encode()) <= _SHORTSTR
            assert event.time is None or event.time.utcoffset() is not None
            assert isinstance(event.data, Mapping)
            orjson.dumps(dict(event.data))

    def test_data_models_describe_every_event(self) -> None:
        """Every sample is of a declared type, and its data validates against that type's model."""
        for body in self.valid_bodies:
            event = self.event(body)
            self.provider.data_models[event.type].model_validate(dict(event.data))

    def test_ids_are_stable(self) -> None:
        """The same body always yields the same event and id (consumers dedupe on it)."""
        for body in self.valid_bodies:
            first, second = self.event(body), self.event(bytes(body))
            assert first.id == second.id
            assert first == second

    def test_distinct_events_have_distinct_ids(self) -> None:
        """Different sample events get different ids."""
        ids = [self.event(body).id for body in self.valid_bodies]
        assert len(set(ids)) == len(ids)

    def test_settings_model_refuses_unknown_keys(self) -> None:
        """The provider's settings model refuses keys it does not know (a typo is an error)."""
        with pytest.raises(pydantic.ValidationError):
            self.provider.settings_model.model_validate({**self.settings, "no_such_key": 1})

    def test_valid_bodies_pass_strict_settings(self) -> None:
        """Valid samples of known types are events under the strictest settings too."""
        for body in self.valid_bodies:
            assert isinstance(self.parse(body, strict=True), Event)

    @PROPERTY
    @given(depth=st.integers(min_value=MAX_DEPTH + 1, max_value=400))
    def test_deep_nesting_is_too_deep(self, depth: int) -> None:
        """A valid sample with a field nested past MAX_DEPTH is quarantined as too_deep."""
        body = self.valid_bodies[0]
        deep = b"[" * depth + b"]" * depth
        payload = body[:-1] + b',"deep_extra":' + deep + b"}"
        result = self.parse(payload)
        assert isinstance(result, Quarantine) and result.reason == "too_deep", result

    def test_not_json_is_invalid_json(self) -> None:
        """Bytes that are not JSON (or not UTF-8) are quarantined as invalid_json."""
        for body in NOT_JSON:
            result = self.parse(body)
            assert isinstance(result, Quarantine), body
            assert result.reason == "invalid_json", (body, result)
            assert result.detail

    def test_invalid_bodies_are_quarantined(self) -> None:
        """Every invalid sample is quarantined with its reason and a short detail."""
        for body, reason in self.invalid_bodies:
            result = self.parse(body, strict=True)
            assert isinstance(result, Quarantine), body
            assert result.reason == reason, (body, result)
            assert result.detail
            assert len(result.detail) <= _MAX_DETAIL
            assert "\n" not in result.detail
            if len(body) > 64:
                assert body.decode(errors="replace") not in result.detail

    @PROPERTY
    @given(body=st.binary(max_size=200))
    def test_never_raises_on_bytes(self, body: bytes) -> None:
        """Arbitrary bytes give an Event or a Quarantine with a code, never an exception."""
        self._check_verdict(self.parse(body))

    @PROPERTY
    @given(value=json_values)
    def test_never_raises_on_json(self, value: Any) -> None:
        """Arbitrary JSON gives an Event or a Quarantine with a code, never an exception."""
        self._check_verdict(self.parse(orjson.dumps(value)))

    @PROPERTY
    @given(data=st.data())
    def test_never_raises_on_damaged_samples(self, data: st.DataObject) -> None:
        """A valid sample with one field replaced or removed gives a verdict, never an exception."""
        body = data.draw(st.sampled_from(self.valid_bodies), label="sample")
        payload = orjson.loads(body)
        target = payload
        if isinstance(payload.get("data"), dict) and data.draw(st.booleans(), label="in data"):
            target = payload["data"]
        if target:
            key = data.draw(st.sampled_from(sorted(target)), label="key")
            if data.draw(st.booleans(), label="remove"):
                del target[key]
            else:
                target[key] = data.draw(json_values, label="value")
        for strict in (False, True):
            self._check_verdict(self.parse(orjson.dumps(payload), strict=strict))

    @staticmethod
    def _check_verdict(result: object) -> None:
        assert isinstance(result, Event | Quarantine)
        if isinstance(result, Quarantine):
            assert _REASON.match(result.reason), result
            assert result.reason != "invalid_json" or result.detail
            assert len(result.detail) <= _MAX_DETAIL
        else:
            orjson.dumps(dict(result.data))
