"""
The public port holds at most ``http.max_connections``: a connection past it closes the
one quiet the longest (over a second: idle, or a head or body that does not come), else
the one whose request began the longest ago, over a second, else it is refused;
and unfinished requests hold at most ``held.budget`` bytes in all.
Before, any client could keep connections open an hour each (one request on each)
until the process had no file descriptor left for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from listener.fast_http import FastServer
from listener.http_room import Room
from tests.http.test_fast_path import Route, answers, post, serve


async def closed(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    """Whether the server closed this connection (EOF) within ``within`` seconds."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    return False


async def test_a_connection_past_the_limit_closes_the_longest_idle_one() -> None:
    async with serve(Route(), max_connections=3) as svc:
        opened = []
        for name in ("a", "b", "c"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(name))
            assert await answers(reader, 1) == [(200, "fast", name)]
            opened.append((reader, writer))
            await asyncio.sleep(0.01)  # (each idle a little longer than the next)
        await asyncio.sleep(1.1)  # (one answered under a second ago may be a proxy's, reused)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("d"))
        assert await answers(reader, 1) == [(200, "fast", "d")]
        assert await closed(opened[0][0])  # "a": idle the longest
        for still in opened[1:]:
            still[1].write(post("again"))
            assert await answers(still[0], 1) == [(200, "fast", "again")]
        for _, w in [*opened, (reader, writer)]:
            w.close()


async def test_heads_that_do_not_come_make_room_for_one_that_does() -> None:
    """A slowloris holding every slot: connections silent over a second are closed first."""
    async with serve(Route(), max_connections=3) as svc:
        silent = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(3)]
        await asyncio.sleep(1.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("late"))
        assert await answers(reader, 1) == [(200, "fast", "late")]
        assert sum([await closed(r, 0.5) for r, _ in silent]) == 1
        for _, w in [*silent, (reader, writer)]:
            w.close()


async def drip(writer: asyncio.StreamWriter, head: bytes, every: float = 0.2) -> None:
    """Send ``head`` a byte every ``every`` seconds: never quiet, never done."""
    for byte in head:
        writer.write(bytes([byte]))
        await asyncio.sleep(every)


async def test_heads_dripped_a_byte_at_a_time_make_room_for_real_senders() -> None:
    """
    A client holding every slot with heads dripped a byte every 0.2 s (on either path):
    none was ever quiet for a second, so every real sender was refused until
    read_timeout (30 s here) closed them. A sender that keeps sending is never the one
    closed for a new connection: its last answer is recent.
    """
    async with serve(Route(), max_connections=4) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        heads = [post("slow", b"x" * 10)] * 2 + [b"GET /hook HTTP/1.1\r\nHost: x\r\n" * 20]
        drippers = []
        for head in heads:
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            drippers.append((reader, writer, asyncio.create_task(drip(writer, head))))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        sender = (reader, writer)
        deadline = asyncio.get_running_loop().time() + 1.3
        while asyncio.get_running_loop().time() < deadline:  # (a request every 0.1 s)
            writer.write(post("real"))
            assert await answers(reader, 1) == [(200, "fast", "real")]
            await asyncio.sleep(0.1)
        assert len(server._connections) == 1  # (the GET went to aiohttp's path)
        new = []
        for ident in ("new-1", "new-2", "new-3"):  # (each kept open: each needs a slot)
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(ident))
            assert await answers(reader, 1) == [(200, "fast", ident)]
            new.append((reader, writer))
        assert server.refused == 0
        assert [await closed(r, 0.5) for r, _, _ in drippers] == [True, True, True]
        for reader, writer in [sender, *new]:
            writer.write(post("still"))
            assert await answers(reader, 1) == [(200, "fast", "still")]
        for _, w, task in drippers:
            task.cancel()
            w.close()
        for _, w in [sender, *new]:
            w.close()


async def test_a_request_begun_on_an_old_keep_alive_connection_is_not_the_one_closed() -> None:
    """
    Its last answer long ago, a connection (a proxy's, pooled) begins a request whose
    body comes in a second read: ranked by its last answer, it was closed before a
    head dripped for over a second; ranked by when its request began, it is not.
    """
    async with serve(Route(read_timeout=5.0), max_connections=2) as svc:
        kept = await asyncio.open_connection("127.0.0.1", svc.port)
        kept[1].write(post("first"))
        assert await answers(kept[0], 1) == [(200, "fast", "first")]
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        dripper = (reader, writer, asyncio.create_task(drip(writer, post("slow", b"x" * 50))))
        await asyncio.sleep(1.3)
        request = post("second", b"y" * 100)
        kept[1].write(request[:-40])  # (the head and most of the body)
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("new"))
        assert await answers(reader, 1) == [(200, "fast", "new")]
        assert await closed(dripper[0], 0.5)
        kept[1].write(request[-40:])
        assert await answers(kept[0], 1) == [(200, "fast", "second")]
        dripper[2].cancel()
        for w in (dripper[1], kept[1], writer):
            w.close()


async def test_a_connection_closed_for_room_that_reads_nothing_is_closed_at_once() -> None:
    """
    A client that does not read its answers: a close waits for them to be sent, so its
    socket stayed open for good, no longer counted, each such eviction one more.
    """
    async with serve(Route(), max_connections=1) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        _, hoarder = await asyncio.open_connection("127.0.0.1", svc.port)
        hoarder.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not server.fast:
            await asyncio.sleep(0.01)
        (conn,) = server.fast
        assert conn._transport is not None
        conn._transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        hoarder.write(post("p") * 100_000)  # (answers far past what the kernel buffers)
        for _ in range(200):  # (until its answers back up: then it stops reading)
            if conn._writing_held:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.3)  # (quiet since)
        assert conn._transport is not None and conn._transport.get_write_buffer_size() > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("new"))
        assert await answers(reader, 1) == [(200, "fast", "new")]
        assert conn._transport is None  # its close was seen: the socket is gone
        for w in (hoarder, writer):
            w.close()


class _Member:
    def __init__(self) -> None:
        self.asked = 0

    def can_close(self) -> bool:
        self.asked += 1
        return False  # (being answered)

    def close_for_room(self) -> None:
        raise AssertionError("never closed")


def test_a_scan_that_found_none_to_close_is_not_repeated_within_the_second() -> None:
    """At 4,096 connections a scan took ~2 ms: a flood at the limit took the loop."""
    room = Room()
    members = [_Member() for _ in range(100)]
    for i, member in enumerate(members):
        room.join(object(), member, now=100.0 + i / 1000)  # type: ignore[arg-type] # keys only
    assert not room.make_room(now=105.0)
    assert {m.asked for m in members} == {2}  # (in both orders)
    assert not room.make_room(now=105.9)
    assert {m.asked for m in members} == {2}  # not asked again
    assert not room.make_room(now=106.01)
    assert {m.asked for m in members} == {4}


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class _Closable:
    def can_close(self) -> bool:
        return True

    def close_for_room(self) -> None:
        pass


def test_a_connection_being_answered_is_out_of_the_orders_until_its_answer() -> None:
    """Answers pending for over a second sat at the front: every scan passed them over."""
    room = Room()
    oldest, older, newer = _Transport(), _Transport(), _Transport()
    for at, transport in ((100.0, oldest), (100.1, older), (100.2, newer)):
        room.join(transport, _Closable(), now=at)  # type: ignore[arg-type] # its methods only
    room.busy(oldest)  # type: ignore[arg-type]
    assert room.make_room(now=105.0)
    assert (oldest.closed, older.closed, newer.closed) == (False, True, False)
    room.answered(oldest, now=105.0)  # type: ignore[arg-type] # last now: the newest
    assert room.make_room(now=106.5)
    assert (oldest.closed, newer.closed) == (False, True)
    assert len(room) == 1


async def test_when_every_connection_is_busy_the_next_is_refused() -> None:
    gate = asyncio.Event()
    async with serve(Route(gate=gate), max_connections=2) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        counted: list[int] = []
        server.on_refused = lambda: counted.append(1)  # (the service's metric, exported)
        busy = []
        for name in ("a", "b"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(name))
            busy.append((reader, writer))
        while len(svc.route.fast) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.1)  # (quiet, but being answered: never closed for room)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        assert await closed(reader)
        assert server.refused == 1 and counted == [1]
        gate.set()
        for (r, _), name in zip(busy, ("a", "b"), strict=True):
            assert await answers(r, 1) == [(200, "fast", name)]
        for _, w in [*busy, (reader, writer)]:
            w.close()


async def test_idle_connections_on_aiohttps_path_make_room_too() -> None:
    """A connection handed to aiohttp (any request not plain) was never closed for room."""
    async with serve(Route(), max_connections=3) as svc:
        handed = []
        for name in ("a", "b", "c"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(name, **{"Content-Encoding": "identity"}))
            assert await answers(reader, 1) == [(200, "aiohttp", name)]
            handed.append((reader, writer))
        await asyncio.sleep(1.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("d"))
        assert await answers(reader, 1) == [(200, "fast", "d")]
        assert await closed(handed[0][0])  # the oldest
        for _, w in [*handed, (reader, writer)]:
            w.close()


async def test_a_burst_of_connections_stays_within_the_limit() -> None:
    """
    A burst past the limit: every new connection of it "made room" by closing the same
    aiohttp-path connection again (still listed until its close was seen, and still
    quiet), and the new ones were counted only once made. 30 at once against a limit of
    4 left 31 (uvloop) or 43 (asyncio) open, and each burst more, up to the file limit.
    """
    async with serve(Route(), max_connections=4) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        handed = []
        for name in ("a", "b", "c", "d"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(name, **{"Content-Encoding": "identity"}))
            assert await answers(reader, 1) == [(200, "aiohttp", name)]
            handed.append((reader, writer))
        await asyncio.sleep(1.1)
        burst = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", svc.port) for _ in range(30))
        )
        assert all([await closed(r) for r, _ in handed])  # each closed once, for one
        assert sum([await closed(r, 0.2) for r, _ in burst]) == 26 == server.refused
        assert len(server.fast) + len(server._connections) == 4
        for _, w in [*handed, *burst]:
            w.close()


async def test_bodies_that_do_not_come_make_room_too() -> None:
    """Heads sent, bodies never: 4,200 such connections held the port for read_timeout."""
    async with serve(Route(read_timeout=30.0), max_connections=3) as svc:
        stalled = []
        for name in ("a", "b", "c"):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post(name, b"x" * 100)[:-50])  # (the head, half the body)
            stalled.append((reader, writer))
        await asyncio.sleep(1.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("d"))
        assert await answers(reader, 1) == [(200, "fast", "d")]
        assert sum([await closed(r, 0.5) for r, _ in stalled]) == 1
        for _, w in [*stalled, (reader, writer)]:
            w.close()


async def test_the_bytes_held_are_capped_the_biggest_holder_closed() -> None:
    """1,100 connections each holding most of a 1 MiB body: RSS 112 MB to 1.2 GB."""
    async with serve(Route(max_body=200_000)) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        server.held.budget = 300_000
        holders = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(post("big", b"x" * 200_000)[:-1000])
            await writer.drain()
            holders.append((reader, writer))
        await asyncio.sleep(0.3)
        assert server.held.total <= 300_000
        assert sum([await closed(r, 0.5) for r, _ in holders]) >= 2
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(post("small"))
        assert await answers(reader, 1) == [(200, "fast", "small")]
        for _, w in [*holders, (reader, writer)]:
            w.close()
        await asyncio.sleep(0.1)
        assert server.held.total == 0


async def test_answers_a_client_does_not_read_stop_its_requests_being_read() -> None:
    """A pipelining client that never reads: 40 MB of requests took RSS to 767 MB."""
    async with serve(Route()) as svc:
        server = svc.runner.server
        assert isinstance(server, FastServer)
        _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(post("p") * 100_000)  # (answers far past what the kernel buffers)
        await asyncio.sleep(1.0)
        assert len(svc.route.fast) < 100_000  # it stopped: its answers are not read
        (conn,) = server.fast
        transport = conn._transport
        assert transport is not None and transport.get_write_buffer_size() < 2**20
        writer.close()
