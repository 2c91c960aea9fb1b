"""
A stream source's appends in flight: the intake step, pipelined.

Frames are handed to the journal without waiting (up to ``journal_window`` at once,
so one fsync covers many), each with its subscription's cursor as a compare-and-set
on the position before it. Outcomes are read in done callbacks: a durable one is
counted once (the intake step) and moves the subscription's durable position; the
first failure is kept in :attr:`Appends.error`, and the runtime ends its connection
on it at once, so nothing after it is taken on a position that is not on disk.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time

import structlog

from handlers import Event, Quarantine
from listener.envelope import Entry
from listener.exceptions import JournalError
from listener.journal import Cursor, Journal
from listener.sources.intake import Intake
from listener.sources.websocket_policy import Subscription

__all__ = ["Appends"]

log = structlog.get_logger("listener.streams")


class Appends:
    """The pipelined appends of one stream source."""

    def __init__(self, *, source: str, journal: Journal, intake: Intake) -> None:
        self._source = source
        self._journal = journal
        self.intake = intake
        self._in_flight: collections.deque[asyncio.Future[list[bool]]] = collections.deque()
        #: The first failed append since :meth:`reset`.
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._in_flight)

    def reset(self) -> None:
        """A new connection: forget the last one's failure (its cursors were reloaded)."""
        self.error = None

    def event(
        self,
        sub: Subscription,
        seq: int | None,
        result: Event | Quarantine,
        payload: bytes,
        now: float,
    ) -> None:
        """
        Journal one event frame's result with its subscription's cursor at ``seq``
        (``None``: a frame at or below the cursor, which stays).
        """
        entry = self.intake.build(result, raw=payload, received_at=now)
        if seq is None:
            future = self._journal.submit([entry])
            future.add_done_callback(functools.partial(self._appended, entry, None, None))
            self._in_flight.append(future)
            return
        cursor = Cursor(self._source, sub.key, seq, prev=sub.last_seq)
        sub.last_seq = seq
        future = self._journal.submit([entry], cursors=[cursor])
        future.add_done_callback(functools.partial(self._appended, entry, sub, seq))
        self._in_flight.append(future)

    def quarantine(self, payload: bytes, verdict: Quarantine, *, keep: int | None = None) -> None:
        """
        Journal input that is no event of a subscription (no cursor moves); of a payload
        over ``keep`` bytes (taken on a raised frame limit), its head.

        Raises:
            JournalFull: the journal is over its limit.
        """
        entry = self.intake.build(verdict, raw=payload, received_at=time.time(), keep=keep)
        future = self._journal.submit([entry])
        future.add_done_callback(functools.partial(self._appended, entry, None, None))
        self._in_flight.append(future)

    def refused(self, size: int, max_size: int) -> None:
        """Keep a record of a frame over ``size`` bytes the connection refused (1009)."""
        now = time.time()
        detail = f"a frame over {size} bytes was refused (max_size {max_size})"
        payload = f'{{"error": "frame_too_large", "max_size": {size}, "at": {now}}}'.encode()
        try:
            self.quarantine(payload, Quarantine("frame_too_large", detail))
        except JournalError as exc:
            log.warning("stream_quarantine_failed", source=self._source, error=str(exc))

    def _appended(
        self,
        entry: Entry,
        sub: Subscription | None,
        seq: int | None,
        future: asyncio.Future[list[bool]],
    ) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if self.error is None:
                self.error = error
            return
        (new,) = future.result()
        self.intake.record(entry, new=new)
        if sub is not None and self.error is None:
            # No earlier append of this connection failed: the stored cursor is here.
            sub.durable_seq = seq

    async def settle(self) -> str | None:
        """Wait for every append in flight; return the last failure's text, if any."""
        failed = None
        while self._in_flight:
            future = self._in_flight.popleft()
            try:
                await future
            except JournalError as exc:
                failed = str(exc)
        return failed

    async def settle_some(self, count: int) -> None:
        """
        Wait for the oldest ``count`` appends.

        Raises:
            JournalError: one failed (the connection ends; cursors reload after).
        """
        for _ in range(min(count, len(self._in_flight))):
            await self._in_flight.popleft()
