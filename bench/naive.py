"""
A naive peer: what a webhook-to-RabbitMQ bridge written the obvious way does per
request, measured beside the listener (issue: performance, goal 1).

``python -m bench.naive serve --port N --exchange X`` runs (uvloop, in a process of its
own) an aiohttp handler that, per request, verifies the Standard Webhooks signature
(the ``standardwebhooks`` library), validates the payload with the provider's pydantic
envelope, publishes one persistent message with aio-pika's ordinary API on a
confirm-mode channel, awaits the confirm, and answers 200. No journal: an event is
only as safe as that one publish. Driven by :func:`bench.loadgen.run_load` with the
very requests of the end-to-end run, so every 2xx is one confirmed message.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.ceilings import drive
from bench.common import (
    BROKER_URL,
    CONCURRENCY,
    WHSEC,
    cleanup_topology,
    declare_tap,
    free_port,
    python_module,
    queue_count,
    run_uvloop,
    serve_post,
    unique,
)
from bench.loadgen import LoadResult, RequestSet

__all__ = ["naive_peer"]


async def _serve(port: int, exchange_name: str) -> None:
    import aio_pika  # noqa: PLC0415 - the server process only
    import orjson  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415
    from standardwebhooks import Webhook  # noqa: PLC0415
    from standardwebhooks.webhooks import WebhookVerificationError  # noqa: PLC0415

    from handlers.getstoken import Envelope  # noqa: PLC0415

    webhook = Webhook(WHSEC)
    connection = await aio_pika.connect(BROKER_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            webhook.verify(body, dict(request.headers))
            event = Envelope.model_validate(orjson.loads(body))
        except (WebhookVerificationError, ValidationError, orjson.JSONDecodeError):
            return web.Response(status=400)
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=event.id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=f"getstoken.{event.type}",
        )
        return web.Response(status=200, body=b'{"success": true}')

    try:
        await serve_post(receive, port)
    finally:
        await connection.close()


def naive_peer(
    requests: RequestSet, *, seconds: float, concurrency: int = CONCURRENCY
) -> tuple[LoadResult, dict[str, float], int]:
    """Run the naive peer and drive it: the load, the CPU per role, messages in the queue."""
    exchange, queue = unique("bench.naive"), unique("bench.naive")
    asyncio.run(declare_tap(exchange, queue))
    port = free_port()
    try:
        argv = python_module("bench.naive", "serve", "--port", str(port), "--exchange", exchange)
        load, cores = drive(
            argv, port, "naive peer", requests, seconds=seconds, concurrency=concurrency
        )
        queued = asyncio.run(queue_count(queue))
    finally:
        asyncio.run(cleanup_topology(exchange, queue))
    return load, cores, queued


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the naive peer's server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--exchange", required=True)
    args: Any = parser.parse_args(argv)
    run_uvloop(lambda: _serve(args.port, args.exchange))


if __name__ == "__main__":
    main()
