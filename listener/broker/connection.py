"""
The one way the listener connects to RabbitMQ (the daemon's publisher, replay, redrive).

* A short heartbeat, so a dead broker is noticed in seconds (NOTES: the default 60 s
  takes ~3 minutes).
* Our own deadline around the whole attempt (DNS, TCP, AMQP handshake, channel).
* :func:`connect` makes one attempt and raises :class:`BrokerUnreachable` naming the
  masked URL; :func:`connect_retrying` keeps trying with jittered backoff (the daemon:
  events wait in the journal meanwhile). Neither is aio-pika's robust connection: the
  publisher reconnects by itself, under these same deadlines, when a connection is
  lost (a robust reconnect has no deadline of ours around its channel restore).
* ``broker.urls`` (the nodes of a cluster): each attempt tries the nodes in order,
  from a given one on, and moves on when one fails (CONTRACT §10).
* An attempt that fails closes what it opened: ``aio_pika.connect()`` leaves a failed
  connection to the garbage collector, whose ``__del__`` can only schedule its close on
  a running loop (without one, the close is dropped with "coroutine never awaited").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from aio_pika.connection import make_url

from listener.broker.deadline import within as deadline
from listener.broker.topology import raw_connection
from listener.config import BrokerConfig, mask_url
from listener.exceptions import BrokerUnreachable
from listener.retry import backoff, stop_if_cancelled

__all__ = ["blocked", "close_quietly", "confirm_channel", "connect", "connect_retrying"]


async def connect(config: BrokerConfig, *, name: str) -> AbstractConnection:
    """
    One connection attempt per node, the nodes in order, each under ``connect_timeout``
    (twice, for the whole handshake).

    Raises:
        BrokerUnreachable: no node answered or each refused us (the last one named).
    """
    connection, _ = await _attempt(config, name=name, start=0)
    return connection


async def connect_retrying(
    config: BrokerConfig,
    *,
    name: str,
    on_failure: Callable[[BaseException, float, int], None],
    start: int = 0,
) -> tuple[AbstractConnection, int]:
    """
    Connect, retrying forever with backoff; ``on_failure(error, retry_in, attempt)`` is
    called after each round in which no node answered. Each round tries the nodes in
    order from ``start`` on. Returns the connection and the index of its node.
    """
    delays = backoff(config.retry_initial, config.retry_max)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _attempt(config, name=name, start=start)
        except BrokerUnreachable as exc:
            stop_if_cancelled(exc)
            delay = next(delays)
            on_failure(exc.__cause__ or exc, delay, attempt)
            await asyncio.sleep(delay)


async def _attempt(
    config: BrokerConfig, *, name: str, start: int
) -> tuple[AbstractConnection, int]:
    """One round over the nodes from ``start`` on; the connection and its node's index."""
    nodes = config.nodes
    heartbeat = max(int(config.heartbeat), 1)
    failure: BrokerUnreachable | None = None
    for step in range(len(nodes)):
        index = (start + step) % len(nodes)
        url = nodes[index].get_secret_value()
        # What aio_pika.connect() builds, kept here so that a failed attempt is closed.
        connection = aio_pika.Connection(
            make_url(url, heartbeat=heartbeat),
            client_properties={"connection_name": name},
            heartbeat=heartbeat,
        )
        try:
            # In this task, not under deadline(): a connect given up on that went on and
            # succeeded would leave an open connection nobody closes.
            async with asyncio.timeout(config.connect_timeout * 2):
                await connection.connect(timeout=config.connect_timeout)
        except BaseException as exc:
            await close_quietly(connection, within=1.0)
            if not isinstance(exc, Exception):  # cancelled: closed, and on its way
                raise
            stop_if_cancelled(exc)
            # Any failure to connect is retried (aiormq raises many kinds).
            failure = BrokerUnreachable(mask_url(url), f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        else:
            return connection, index
    assert failure is not None  # config.nodes is never empty
    raise failure


async def close_quietly(connection: AbstractConnection, *, within: float = 5.0) -> str | None:
    """
    Close, within ``within`` s; return the error when closing a broken connection failed.
    A close given up on (the deadline, or the caller cancelled) is left to finish.
    """
    try:
        await deadline(connection.close(), within, finish=True)
    except Exception as exc:  # closing a broken connection may fail in many ways; it is gone
        return f"{type(exc).__name__}: {exc}"
    return None


async def blocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """Whether the broker blocked the connection (a resource alarm: Connection.Blocked)."""
    try:
        async with asyncio.timeout(0.001):
            await connection.ready()
    except TimeoutError:
        return True
    return False


async def confirm_channel(connection: AbstractConnection, within: float) -> aiormq.Channel:
    """The publisher's channel (confirms on, returns raised), open within ``within`` s."""
    raw = raw_connection(connection)
    channel = await deadline(raw.channel(publisher_confirms=True, on_return_raises=True), within)
    assert isinstance(channel, aiormq.Channel)  # (the confirm window writes frames to it)
    return channel
