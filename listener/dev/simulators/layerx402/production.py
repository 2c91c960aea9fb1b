"""
Event production of the Layerx402 simulator: per subscription key, paced, flat out
(as fast as subscribers read) or manual (:meth:`Production.emit`). A mixin of
:class:`.server.Layerx402Simulator`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping
from typing import Any

import orjson

from handlers.layerx402 import subscription_key
from listener.dev.simulators.layerx402.feed import CHANNELS, HIGH, MAX_BURST, Key, Rate
from listener.dev.simulators.waiting import Waitable


class Production(Waitable):
    """What produces events, and the ledger of what was produced."""

    rate: Rate | Mapping[str, Rate]
    buffer_size: int
    time_base_ms: int
    record: bool
    produced: dict[str, list[dict[str, Any]]]
    _keys: dict[str, Key]
    _tg: asyncio.TaskGroup | None
    _producers: set[asyncio.Task[None]]
    _running: asyncio.Event
    _stopping: asyncio.Event

    # --- producing -------------------------------------------------------------------

    def _rate_of(self, channel: str) -> Rate:
        if isinstance(self.rate, Mapping):
            return self.rate.get(channel, "manual")
        return self.rate

    def _key(self, channel: str, params: Mapping[str, str]) -> Key:
        name = subscription_key(channel, params)
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = Key(channel, params, self.buffer_size)
            self._start_producer(key)
        return key

    def _start_producer(self, key: Key) -> None:
        rate = self._rate_of(key.channel)
        if rate == "manual" or self._tg is None:
            return
        task = self._tg.create_task(self._produce(key, float(rate)), name=f"produce {key.name}")
        self._producers.add(task)
        task.add_done_callback(self._producers.discard)

    def emit(self, channel: str, params: Mapping[str, str], n: int = 1) -> list[dict[str, Any]]:
        """Produce ``n`` events for this key now (any rate mode); returns their records."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {sorted(CHANNELS)}")
        key = self._key(channel, params)
        records = [self._emit_one(key) for _ in range(n)]
        self._pulse()
        return records

    def emit_data(
        self, channel: str, params: Mapping[str, str], data_json: bytes
    ) -> dict[str, Any]:
        """
        Produce one event with exactly ``data_json`` as its data (a hostile or huge
        payload); it is retained and resent after ``since_seq`` like any other.
        """
        key = self._key(channel, params)
        record = self._emit_one(key, data_json)
        self._pulse()
        return record

    def _emit_one(self, key: Key, data_json: bytes | None = None) -> dict[str, Any]:
        key.seq += 1
        seq = key.seq
        data: Any
        if data_json is None:
            data = key.generate(seq, self.time_base_ms)
            data_json = orjson.dumps(data)
        else:
            data = {"raw": data_json[:200].decode("utf-8", "replace"), "size": len(data_json)}
        key.buffer.append((seq, data_json))
        record = {"seq": seq, "channel": key.channel, "data": data}
        if self.record:
            self.produced.setdefault(key.name, []).append(record)
        for sub_id, conn in key.subscribers.items():
            conn.out.put_nowait(key.frame(sub_id, seq, data_json))
        return record

    async def _room(self, key: Key) -> None:
        # Backpressure: wait for every subscriber's queue to drain below HIGH.
        for conn in list(key.subscribers.values()):
            while conn.out.qsize() >= HIGH and not conn.closed.is_set():
                conn.room.clear()
                await conn.room.wait()

    async def _idle(self, delay: float) -> None:
        # An interruptible pause: ends early when the simulator stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    async def _produce(self, key: Key, rate: float) -> None:
        if rate <= 0:
            await self._produce_flat_out(key)
        else:
            await self._produce_paced(key, rate)

    async def _produce_flat_out(self, key: Key) -> None:
        # As fast as the subscribers read; nothing while nobody listens.
        for turn in itertools.count(1):
            await key.active.wait()
            await self._running.wait()
            await self._room(key)
            if key.subscribers and self._running.is_set():
                self._emit_one(key)
            if turn % 64 == 0:
                self._pulse()
                # Awaiting a set event does not yield, so yield to the loop here, or
                # a producer whose subscribers just closed would starve their cleanup.
                await asyncio.sleep(0)

    async def _produce_paced(self, key: Key, rate: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        next_at = loop.time()
        while not self._stopping.is_set():
            if not self._running.is_set():
                await self._running.wait()
                next_at = loop.time()  # no burst of the time spent paused
            now = loop.time()
            if now < next_at:
                await self._idle(next_at - now)
                continue
            burst = 0
            while next_at <= now and burst < MAX_BURST:
                self._emit_one(key)
                next_at += interval
                burst += 1
            if burst == MAX_BURST:
                next_at = now + interval
            self._pulse()
            await self._room(key)
