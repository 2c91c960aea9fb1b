"""
The contract every stream (WebSocket) provider handler keeps, as
:mod:`tests.handlers.contract` is for webhook providers (FastStream's one abstract
suite per backend). A provider's test module subclasses :class:`StreamProviderContract`
with recorded frames; the base class proves what ``listener/sources/websocket.py``
relies on:

* ``PROVIDER`` satisfies :class:`handlers.StreamProvider`, is found by name, declares
  its channels, event types and settings model, and says what close codes mean;
* the frames it sends are JSON text; ``subscription_key`` ignores params order;
* every valid event frame parses to an :class:`~handlers.frames.EventFrame` with an
  Event of a declared type and a stable id; each control sample to its frame type;
* a frame nested too deep keeps its seq with a ``too_deep`` verdict;
* ``parse_frame`` never raises, whatever arrives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, get_args

import orjson
from hypothesis import given
from hypothesis import strategies as st

from handlers import MAX_DEPTH, Event, Quarantine, StreamProvider, load_provider
from handlers.base import CloseKind
from handlers.frames import ErrorFrame, ErrorKind, EventFrame, ServerFrame, Unparseable

from .contract import PROPERTY, json_values

_REASON = re.compile(r"^[a-z][a-z_]*$")


class StreamProviderContract:
    """
    Base class of every stream provider's test class (not collected on its own).

    Subclasses set ``provider``, ``event_frames`` (recorded event frames, each a distinct
    event), ``control_frames`` (``(raw, frame type)`` pairs), ``close_codes`` (code →
    expected kind) and ``subscription`` (a ``(channel, params)`` the provider takes).
    """

    provider: ClassVar[StreamProvider]
    event_frames: ClassVar[Sequence[bytes]]
    control_frames: ClassVar[Sequence[tuple[bytes, type]]]
    close_codes: ClassVar[dict[int | None, CloseKind | None]]
    subscription: ClassVar[tuple[str, dict[str, str]]]

    def test_satisfies_protocol(self) -> None:
        """PROVIDER is a StreamProvider of kind websocket with a settings model and types."""
        assert isinstance(self.provider, StreamProvider)
        assert self.provider.kind == "websocket"
        assert load_provider(self.provider.name) is self.provider
        assert self.provider.channels and self.provider.data_models
        assert all(t.startswith(f"{self.provider.name}.") for t in self.provider.data_models)
        self.provider.settings_model.model_validate({})

    def test_sent_frames_are_json_text(self) -> None:
        """auth, subscribe (with and without since_seq), unsubscribe and pong are JSON objects."""
        channel, params = self.subscription
        frames = [
            self.provider.auth_frame("key"),
            self.provider.subscribe_frame("r1", channel, params),
            self.provider.subscribe_frame("r1", channel, params, 41),
            self.provider.unsubscribe_frame("r1", "sub_1"),
            self.provider.pong_frame(1700000000000),
        ]
        for frame in frames:
            assert isinstance(frame, str)
            assert isinstance(orjson.loads(frame), dict)
        assert "41" in frames[2] and "41" not in frames[1]

    def test_subscription_key_ignores_params_order(self) -> None:
        """The cursor's key is the same whatever the order of the params."""
        channel, params = self.subscription
        reordered = dict(reversed(list(params.items())))
        key = self.provider.subscription_key(channel, params)
        assert key == self.provider.subscription_key(channel, reordered)
        assert channel in key

    def test_event_frames_are_events(self) -> None:
        """Every recorded event frame is an EventFrame with an Event of a declared type."""
        ids = []
        for raw in self.event_frames:
            frame = self.provider.parse_frame(raw)
            assert isinstance(frame, EventFrame), (raw, frame)
            assert isinstance(frame.result, Event), frame.result
            assert frame.result.type in self.provider.data_models
            again = self.provider.parse_frame(bytes(raw))
            assert isinstance(again, EventFrame) and again.result == frame.result
            orjson.dumps(dict(frame.result.data))
            # The AsyncAPI document's schema for the type is this model's.
            self.provider.data_models[frame.result.type].model_validate(dict(frame.result.data))
            ids.append(frame.result.id)
        assert len(set(ids)) == len(ids)

    def test_control_frames(self) -> None:
        """Each control sample parses to its frame type; error frames say what they mean."""
        for raw, kind in self.control_frames:
            frame = self.provider.parse_frame(raw)
            assert isinstance(frame, kind), (raw, frame)
            if isinstance(frame, ErrorFrame):
                assert frame.kind in get_args(ErrorKind)

    def test_close_codes(self) -> None:
        """close_kind maps the provider's close codes; others are ordinary drops."""
        for code, kind in self.close_codes.items():
            assert self.provider.close_kind(code) == kind
        assert self.provider.close_kind(1006) is None

    def test_deep_event_keeps_its_seq(self) -> None:
        """An event frame nested past MAX_DEPTH is quarantined as too_deep, its seq kept."""
        raw = self.event_frames[0]
        deep = b"[" * (MAX_DEPTH + 10) + b"]" * (MAX_DEPTH + 10)
        frame = orjson.loads(raw)
        text = orjson.dumps(frame)
        hostile = text[:-1] + b',"deep_extra":' + deep + b"}"
        parsed = self.provider.parse_frame(hostile)
        assert isinstance(parsed, EventFrame | Unparseable)
        verdict = parsed.result if isinstance(parsed, EventFrame) else parsed.verdict
        assert isinstance(verdict, Quarantine) and verdict.reason == "too_deep"

    @PROPERTY
    @given(raw=st.binary(max_size=300))
    def test_never_raises_on_bytes(self, raw: bytes) -> None:
        """Arbitrary bytes give a frame or an Unparseable verdict, never an exception."""
        self._check(self.provider.parse_frame(raw))

    @PROPERTY
    @given(value=json_values)
    def test_never_raises_on_json(self, value: Any) -> None:
        """Arbitrary JSON gives a frame or an Unparseable verdict, never an exception."""
        self._check(self.provider.parse_frame(orjson.dumps(value)))

    @PROPERTY
    @given(data=st.data())
    def test_never_raises_on_damaged_events(self, data: st.DataObject) -> None:
        """A recorded event frame with one field replaced gives a verdict, never an exception."""
        frame = orjson.loads(data.draw(st.sampled_from(self.event_frames), label="sample"))
        target = frame["data"] if data.draw(st.booleans(), label="in data") else frame
        key = data.draw(st.sampled_from(sorted(target)), label="key")
        target[key] = data.draw(json_values, label="value")
        self._check(self.provider.parse_frame(orjson.dumps(frame)))

    @staticmethod
    def _check(frame: ServerFrame) -> None:
        verdict = frame.verdict if isinstance(frame, Unparseable) else None
        if isinstance(frame, EventFrame) and isinstance(frame.result, Quarantine):
            verdict = frame.result
        if verdict is not None:
            assert _REASON.match(verdict.reason), verdict
            assert len(verdict.detail) <= 1000
