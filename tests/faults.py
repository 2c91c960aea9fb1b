"""
Fault toolkit for tests: a TCP proxy on 127.0.0.1 that can cut, blackhole, slow
down, and close mid-stream after N bytes; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TcpProxy:
    """
    Forward ``127.0.0.1:<port>`` to ``target_host:target_port``.

    * :meth:`cut` aborts every open connection (both sides see a reset);
    * :meth:`blackhole` keeps connections open but moves no more bytes, and new
      connections are accepted and never answered;
    * :meth:`refuse` closes new connections at once (the peer is down);
    * :meth:`restore` goes back to forwarding;
    * ``delay`` slows every chunk; ``close_after`` cuts a connection after N bytes
      from the target (mid-frame); ``stall_after_frames`` lets a new connection's first
      N AMQP frames from the target through, then nothing (3: the handshake completes,
      and a channel never opens).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        self.close_after: int | None = None
        self.stall_after_frames: int | None = None
        self._mode = "forward"  # forward | blackhole | refuse
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    def url(self, scheme: str, path: str = "/", userinfo: str = "") -> str:
        """A URL pointing at the proxy."""
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}{path}"

    def cut(self) -> None:
        """Abort every open connection."""
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        self._writers.clear()

    def blackhole(self) -> None:
        """Stop moving bytes; connections stay open and silent."""
        self._mode = "blackhole"
        self._flowing.clear()

    def refuse(self) -> None:
        """Cut everything and close new connections immediately."""
        self._mode = "refuse"
        self.cut()

    def restore(self) -> None:
        """Forward again."""
        self._mode = "forward"
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "refuse":
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.add(writer)
        await self._flowing.wait()
        try:
            async with asyncio.timeout(5):
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        budget = [self.close_after]
        downstream = (
            self._pipe(up_reader, writer, budget)
            if self.stall_after_frames is None
            else self._stall(up_reader, writer, self.stall_after_frames)
        )
        tasks = {
            asyncio.create_task(self._pipe(reader, up_writer, None)),
            asyncio.create_task(downstream),
        }
        self._pipes |= tasks
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._pipes -= tasks
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        budget: list[int | None] | None,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                if budget is not None and budget[0] is not None:
                    if len(chunk) >= budget[0]:
                        writer.write(chunk[: budget[0]])
                        writer.transport.abort()
                        return
                    budget[0] -= len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    @staticmethod
    async def _stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: int
    ) -> None:
        """Forward ``frames`` AMQP frames, then hold the connection open and silent."""
        try:
            for _ in range(frames):
                header = await reader.readexactly(7)  # type, channel, payload size
                size = int.from_bytes(header[3:7], "big")
                writer.write(header + await reader.readexactly(size + 1))  # (+ frame end)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        await asyncio.Event().wait()  # until cut or closed


@contextlib.asynccontextmanager
async def proxy(host: str, port: int) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` to ``host:port`` for the duration of the block."""
    async with TcpProxy(host, port) as p:
        yield p
