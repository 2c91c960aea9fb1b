"""
The one way the listener connects to RabbitMQ (the daemon's publisher, replay, redrive).

* A short heartbeat, so a dead broker is noticed in seconds (NOTES: the default 60 s
  takes ~3 minutes).
* Our own deadline around the whole attempt (DNS, TCP, AMQP handshake, channel).
* :func:`connect` makes one attempt and raises :class:`BrokerUnreachable` naming the
  masked URL; :func:`connect_retrying` keeps trying with jittered backoff (the daemon:
  events wait in the journal meanwhile) and returns a robust connection, which
  aio-pika reconnects by itself afterwards.
* ``broker.urls`` (the nodes of a cluster): each attempt tries the nodes in order,
  from a given one on, and moves on when one fails (CONTRACT §10).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from listener.config import BrokerConfig, mask_url
from listener.exceptions import BrokerUnreachable
from listener.retry import backoff

__all__ = ["connect", "connect_retrying"]


async def connect(config: BrokerConfig, *, name: str) -> AbstractConnection:
    """
    One connection attempt under ``connect_timeout`` (twice, for the whole handshake)
    per node, the nodes in order.

    Raises:
        BrokerUnreachable: no node answered or each refused us (the last one named).
    """
    failure: BrokerUnreachable | None = None
    for node in config.nodes:
        url = node.get_secret_value()
        try:
            async with asyncio.timeout(config.connect_timeout * 2):
                return await aio_pika.connect(
                    url,
                    timeout=config.connect_timeout,
                    heartbeat=max(int(config.heartbeat), 1),
                    client_properties={"connection_name": name},
                )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            failure = BrokerUnreachable(mask_url(url), f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
    assert failure is not None  # config.nodes is never empty
    raise failure


async def connect_retrying(
    config: BrokerConfig,
    *,
    name: str,
    on_failure: Callable[[BaseException, float, int], None],
    start: int = 0,
) -> tuple[AbstractRobustConnection, int]:
    """
    Connect, retrying forever with backoff; ``on_failure(error, retry_in, attempt)`` is
    called after each round in which no node answered. Each round tries the nodes in
    order from ``start`` on. Returns a robust connection and the index of its node.
    """
    nodes = config.nodes
    delays = backoff(config.retry_initial, config.retry_max)
    attempt = 0
    while True:
        attempt += 1
        failure: BaseException | None = None
        for step in range(len(nodes)):
            index = (start + step) % len(nodes)
            try:
                async with asyncio.timeout(config.connect_timeout * 2):
                    connection = await aio_pika.connect_robust(
                        nodes[index].get_secret_value(),
                        heartbeat=max(int(config.heartbeat), 1),
                        timeout=config.connect_timeout,
                        reconnect_interval=config.retry_initial,
                        client_properties={"connection_name": name},
                    )
            except Exception as exc:  # any failure to connect is retried (aiormq raises many kinds)
                failure = exc
            else:
                return connection, index
        assert failure is not None  # config.nodes is never empty
        delay = next(delays)
        on_failure(failure, delay, attempt)
        await asyncio.sleep(delay)


async def close_quietly(connection: AbstractConnection) -> str | None:
    """Close, within 5 s; return the error when closing a broken connection failed."""
    try:
        async with asyncio.timeout(5):
            await connection.close()
    except Exception as exc:  # closing a broken connection may fail in many ways; it is gone
        return f"{type(exc).__name__}: {exc}"
    return None
