"""
A cancellation that a library swallows does not leave a retry loop running: Python
3.11's ``asyncio.wait_for`` (inside aio-pika and aiormq) raises the awaited operation's
own error instead of ``CancelledError`` when both come at once. The publisher's connect
loop then retried the broker for ever, and the service's TaskGroup waited for it: a
daemon whose port was taken never exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import SecretStr

from listener.broker import publisher as publisher_module
from listener.broker.connection import connect_retrying
from listener.broker.deadline import settle, within
from listener.broker.topology import raw_connection
from listener.config import BrokerConfig
from listener.metrics import Metrics
from listener.retry import stop_if_cancelled
from listener.sources.supervisor import supervised
from tests.conftest import make_config, running


async def swallowing_connect(*_: Any, **__: Any) -> None:
    """What wait_for does when the connect fails as the cancel lands: the error, not the cancel."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise ConnectionRefusedError(111, "Connection refused") from None


async def test_the_broker_connect_loop_stops_when_cancelled_even_if_the_cancel_was_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio_pika.Connection, "connect", swallowing_connect)
    config = BrokerConfig(
        url=SecretStr("amqp://guest:guest@127.0.0.1:1/"), retry_initial=0.01, retry_max=0.01
    )
    failures: list[BaseException] = []
    task = asyncio.create_task(
        connect_retrying(config, name="test", on_failure=lambda e, *_: failures.append(e))
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)  # (before: still retrying after 5 s)
    assert failures == []  # the swallowed cancel is not counted as a failed attempt


@pytest.mark.broker
async def test_a_service_stopped_while_its_channel_opens_closes_the_connection(
    tmp_path: Path,
    broker_url: str,
    exchange_name: str,
    cleanup_topology: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A stop while the publisher opens its channel closes its new connection (was left open:
    aio-pika's close callback for it then ran on a closed loop, CI's unraisable warnings).
    """
    opening = asyncio.Event()
    seen: list[aiormq.abc.AbstractConnection] = []

    async def slow_channel(connection: AbstractConnection, within: float) -> None:
        seen.append(raw_connection(connection))
        opening.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(publisher_module, "confirm_channel", slow_channel)
    async with running(make_config(tmp_path, broker_url=broker_url, exchange=exchange_name)):
        await asyncio.wait_for(opening.wait(), 10)
    assert len(seen) == 1
    assert seen[0].is_closed


async def test_a_supervised_source_whose_cancel_became_an_error_is_not_restarted() -> None:
    runs = 0

    class Source:
        name = "swallower"

        async def run(self) -> None:
            nonlocal runs
            runs += 1
            await swallowing_connect()

    task = asyncio.create_task(supervised(Source(), metrics=Metrics(), initial=0.01))  # type: ignore[arg-type]  # a SourceRuntime in all the supervisor uses
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert runs == 1


async def test_stop_if_cancelled_raises_only_for_a_task_asked_to_stop() -> None:
    stop_if_cancelled()  # not asked: nothing
    asked = asyncio.Event()

    async def loop() -> None:
        while True:
            try:
                await swallowing_connect()
            except ConnectionRefusedError as exc:
                asked.set()
                stop_if_cancelled(exc)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert asked.is_set()


async def test_a_deadline_holds_when_the_operation_swallows_its_cancellation() -> None:
    """
    aio-pika and aiormq catch CancelledError in places and go on waiting (closing a
    connection to a blackholed broker): asyncio.timeout cancels once, and its deadline
    passed with nothing happening; the publisher did not reconnect for over a minute.
    """
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed += 1
            await asyncio.sleep(0.8)  # (goes on waiting, as a close on a dead socket does)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(stubborn(), 0.2)
    assert time.monotonic() - started < 0.6
    await asyncio.sleep(0.05)
    assert swallowed == 1  # (it was cancelled, and went on)
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.2):  # (what it was: the deadline came 0.6 s late)
            await stubborn()
    assert time.monotonic() - started >= 0.8
    assert await within(asyncio.sleep(0, result=7), 1.0) == 7
    await asyncio.sleep(0.9)  # (the operation given up on has ended by itself)


async def test_operations_given_up_on_are_settled_before_the_loop_closes() -> None:
    """One still pending when the loop closed ran aio-pika's callbacks on a closed loop."""
    ended = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            ended.set()

    with pytest.raises(TimeoutError):
        await within(stubborn(), 0.05)
    started = time.monotonic()
    await settle(2.0)
    assert ended.is_set() and time.monotonic() - started < 1.0
