"""
Fault controls of the Layerx402 simulator: drops, raw and oversize frames, rate
limiting, silence, refused handshakes, subscriptions refused once or ended by the server.
A mixin of :class:`.server.Layerx402Simulator`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from listener.dev.simulators.layerx402.feed import Close, Conn, Raw, rate_limited_frame
from listener.dev.simulators.waiting import Waitable

if TYPE_CHECKING:
    from listener.dev.simulators.layerx402.feed import Key


class Faults(Waitable):
    """What a test can do to the simulator's clients."""

    _all: set[Conn]
    _authed: set[Conn]
    _keys: dict[str, Key]
    _running: asyncio.Event
    _pings_on: bool
    _frozen: bool
    _rate_limited_until: float
    _handshake_status: int | None
    refuse_once: dict[str, str | None]

    # --- faults ----------------------------------------------------------------------

    async def drop_all(self, code: int | None = None, reason: str = "") -> None:
        """
        Close every connection and wait until they are gone.

        Args:
            code: close code (e.g. 1011, 4003); ``None`` aborts the TCP connection
                without a close frame, like a network failure.
            reason: close reason sent with ``code``.
        """
        conns = list(self._all)
        if code is None:
            for conn in conns:
                conn.ws.transport.abort()
        else:
            async with asyncio.TaskGroup() as tg:
                for conn in conns:
                    tg.create_task(conn.ws.close(code, reason))
        await self.wait_until(
            lambda: not self._all.intersection(conns), timeout=15.0, what="all dropped"
        )

    def refuse_next(self, channel: str, code: str | None = "RATE_LIMITED") -> None:
        """Answer the next subscribe to ``channel`` with an error of ``code`` (None: not at all)."""
        self.refuse_once[channel] = code

    def end_subscriptions(self, channel: str) -> int:
        """
        End every subscription to ``channel`` from the server's side, each with an
        ``unsubscribed`` frame (no request id); return how many ended.
        """
        ended = 0
        for conn in self._authed:
            for sub_id, key in list(conn.subs.items()):
                if key.channel != channel:
                    continue
                del conn.subs[sub_id]
                key.subscribers.pop(sub_id, None)
                if not key.subscribers:
                    key.active.clear()
                frame = {"type": "unsubscribed", "subscription": sub_id}
                conn.out.put_nowait(orjson.dumps(frame))
                ended += 1
        return ended

    def send_raw(self, payload: str | bytes) -> None:
        """Send ``payload`` as is to every authenticated connection (str: text, bytes: binary)."""
        for conn in self._authed:
            conn.out.put_nowait(Raw(payload))

    def inject_oversize(self, size: int = 2 * 2**20) -> None:
        """Send every authenticated connection a valid JSON frame of ``size`` bytes."""
        head, tail = b'{"type":"notice","padding":"', b'"}'
        frame = head + b"x" * max(size - len(head) - len(tail), 0) + tail
        for conn in self._authed:
            conn.out.put_nowait(frame)

    async def rate_limit(self, retry_after: float = 1.0) -> None:
        """
        Rate-limit for ``retry_after`` seconds: every open connection, and every new one
        until then, gets ``RATE_LIMITED`` with ``retry_after`` and close 4029.
        """
        self._rate_limited_until = asyncio.get_running_loop().time() + retry_after
        conns = list(self._authed)
        for conn in conns:
            conn.out.put_nowait(rate_limited_frame(retry_after))
            conn.out.put_nowait(Close(4029, "rate limited"))
        await self.wait_until(
            lambda: not self._all.intersection(conns), timeout=15.0, what="rate-limited closed"
        )

    def pause(self, *, pings: bool = True) -> None:
        """Stop producing events (and app-level pings, unless ``pings=False``): silence."""
        self._running.clear()
        self._pings_on = not pings

    def freeze(self) -> None:
        """As :meth:`pause`, and stop reading sockets: WebSocket pings go unanswered."""
        self.pause()
        self._frozen = True
        for conn in self._all:
            conn.ws.transport.pause_reading()

    def resume(self) -> None:
        """Undo :meth:`pause` and :meth:`freeze`."""
        self._running.set()
        self._pings_on = True
        if self._frozen:
            self._frozen = False
            for conn in self._all:
                conn.ws.transport.resume_reading()

    def reject_handshakes(self, status: int | None) -> None:
        """Answer new WebSocket handshakes with HTTP ``status`` (``None``: accept again)."""
        self._handshake_status = status


# --- helpers -------------------------------------------------------------------------
