"""
Which connection of the public port to close when one more comes at
``http.max_connections`` (:class:`listener.fast_http.FastServer`).

:class:`Room` keeps the port's open connections, on either path (the fast one or
aiohttp's), in two orders, each updated in O(1) as bytes come and answers go:

* by the last byte in or out (``heard``): the one quiet the longest, over a second, is
  closed first (idle after its answer, or a head or body that stopped coming);
* by when its current request began (``begun``: its first byte, else its last answer or
  its opening): when none is quiet, the one whose request began the longest ago, over
  a second. A head or body dripped a byte every 0.9 s is never quiet, and a client so
  holding every slot kept out every real sender until ``read_timeout``; a sender whose
  requests each come within a second is never the one closed.

Never one being answered (its body all came): on the fast path such a connection is out
of both orders until its answer goes (:meth:`Room.busy`), so a scan does not pass over
them one by one; on aiohttp's path it is skipped. When a scan finds none to close, none
can be (give or take an aiohttp-path answer that ends before it is written) before a
second has passed since the first it stopped at (the orders are by time), and until
then the next connection is refused without a scan: at 4,096 connections a scan of them
all took ~2 ms, so a flood of connections at the limit could have taken the whole event
loop.

A connection closed for room is aborted when answers it did not read are still
buffered: a close waits for them to be sent, and a client that never reads kept its
socket open, uncounted, for good (:func:`shut`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol, cast

__all__ = ["QUIET", "Member", "Room", "shut"]

QUIET = 1.0  # seconds without a byte, or since the request began, before it may be closed


class Member(Protocol):
    """A connection's protocol, as the room sees it."""

    def can_close(self) -> bool:
        """Whether it may be closed for room (``False``: its request is being answered)."""
        ...

    def close_for_room(self) -> None:
        """Its own bookkeeping as it is closed (the room shuts its transport after)."""
        ...


def shut(transport: asyncio.BaseTransport) -> None:
    """Close ``transport``: at once (an abort) if it still holds output not sent."""
    writer = cast(asyncio.WriteTransport, transport)  # (uvloop's do not subclass asyncio's)
    if writer.get_write_buffer_size():
        writer.abort()
    else:
        writer.close()


class Room:
    """The open connections of the port in the two orders above, by transport (a
    connection handed from the fast path to aiohttp's keeps its place: :meth:`rebind`)."""

    __slots__ = ("_begun", "_heard", "_members", "_none_until")

    def __init__(self) -> None:
        self._heard: collections.OrderedDict[asyncio.BaseTransport, float] = (
            collections.OrderedDict()
        )
        self._begun: collections.OrderedDict[asyncio.BaseTransport, float] = (
            collections.OrderedDict()
        )
        self._members: dict[asyncio.BaseTransport, Member] = {}
        self._none_until = 0.0

    def __len__(self) -> int:
        return len(self._members)

    def join(self, transport: asyncio.BaseTransport, member: Member, now: float) -> None:
        """A connection opened at ``now``."""
        self._members[transport] = member
        self._heard[transport] = self._begun[transport] = now

    def rebind(self, transport: asyncio.BaseTransport, member: Member) -> None:
        """``transport``'s connection is ``member``'s now (its times unchanged)."""
        if transport in self._members:
            self._members[transport] = member

    def leave(self, transport: asyncio.BaseTransport) -> None:
        """The connection is gone (or closed for room)."""
        self._members.pop(transport, None)
        self.busy(transport)

    def busy(self, transport: asyncio.BaseTransport) -> None:
        """Its request is being answered: out of both orders until :meth:`answered`."""
        self._heard.pop(transport, None)
        self._begun.pop(transport, None)

    def answered(self, transport: asyncio.BaseTransport, now: float) -> None:
        """An answer went at ``now``: last in both orders (back in them, if it was busy)."""
        if transport in self._members:
            for order in (self._heard, self._begun):
                order.pop(transport, None)
                order[transport] = now

    def heard(self, transport: asyncio.BaseTransport, now: float) -> None:
        """A byte came, or an answer went, at ``now``."""
        heard = self._heard
        if transport in heard:
            heard.move_to_end(transport)
            heard[transport] = now

    def begun(self, transport: asyncio.BaseTransport, now: float) -> None:
        """A request began, or one was answered, at ``now``."""
        begun = self._begun
        if transport in begun:
            begun.move_to_end(transport)
            begun[transport] = now

    def make_room(self, now: float) -> bool:
        """Close one connection as the module says; ``False``: none may be closed."""
        if now < self._none_until:
            return False
        limit = now - QUIET
        stopped = now
        for order in (self._heard, self._begun):
            for transport, at in order.items():
                if at >= limit:
                    stopped = min(stopped, at)
                    break
                member = self._members[transport]
                if member.can_close():
                    self.leave(transport)
                    member.close_for_room()
                    shut(transport)
                    return True
        self._none_until = stopped + QUIET
        return False
