"""
Shared fixtures: a real RabbitMQ on 127.0.0.1:5672 (per-test exchange names), a tap
queue that reads back what reached the exchange, and the real service in-process.

Under ``CI=true`` a test that needs the broker fails when none is reachable;
elsewhere it is skipped with one line saying how to start one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import aiohttp
import hypothesis  # noqa: F401 - imported up front, see below
import pytest
from aio_pika.tools import OneShotCallback

from handlers.layerx402 import subscription_key
from handlers.polling import loads_exact
from listener.broker.topology import Topology
from listener.cluster.leases import Names
from listener.config import Config
from listener.dev.replicas import MINTS
from listener.service import Service
from tests import wire

# hypothesis's pytest plugin otherwise imports hypothesis lazily in the terminal summary,
# when pytest's assertion rewriter compiles it while garbage from closed aiormq
# connections raises warnings: CPython 3.11's compiler then fails with "AST constructor
# recursion depth mismatch" and the run exits 1 after passing.

# aio-pika runs a connection's and a channel's close callbacks as tasks. One still
# pending when its test's event loop closed is a connection the code under test left
# open, nobody to close it (the garbage collector then ran the callback on a closed
# loop: "Event loop is closed", reported against whichever later test it ran in). Each
# test is checked for those at its teardown, so the one that leaked fails.
_close_callbacks: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
_run_close_callback = OneShotCallback.__call__


def _recording_close_callback(self: OneShotCallback, *args: Any, **kwargs: Any) -> Any:
    started = _run_close_callback(self, *args, **kwargs)
    if isinstance(started, asyncio.Future):
        _close_callbacks.add(started)
    return started


OneShotCallback.__call__ = _recording_close_callback  # type: ignore[method-assign]  # (the check above)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    yield  # (the test's event loop is closed by now)
    left = [f for f in _close_callbacks if not f.done() and f.get_loop().is_closed()]
    _close_callbacks.clear()
    if left:
        pytest.fail(f"{item.nodeid} left {len(left)} broker connection(s) open: {left[0]!r}")


# Child processes (the daemon, the CLI, the simulators) import this tree, not whatever
# the venv's editable install points at: a copy or a worktree sharing the venv ran its
# children on another tree's code, and its tests judged that.
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/"
# One scalable time unit for every timeout in the suite (slow machines: raise it).
UNIT = float(os.environ.get("LISTENER_TEST_UNIT", "1.0"))


def broker_reachable() -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_available() -> bool:
    return broker_reachable()


def unavailable(message: str) -> NoReturn:
    """What a test needs is not here: it fails under ``CI=true``, else it is skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def broker_url(broker_available: bool) -> str:
    """The real broker's URL; fails under CI=true when it is down, else skips."""
    if not broker_available:
        unavailable(
            "RabbitMQ not reachable on 127.0.0.1:5672; start one with: rabbitmq-server -detached"
        )
    return BROKER_URL


@pytest.fixture
def exchange_name() -> str:
    """A fresh exchange name per test so tests never collide."""
    return f"t.{uuid.uuid4().hex[:12]}"


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until ``predicate`` holds, polling, with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout * UNIT
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout * UNIT:.1f}s waiting for {what or predicate}"
            )
        await asyncio.sleep(0.02)


class Answer:
    """An HTTP response, read whole (the REST simulators' tests)."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return loads_exact(self.body)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client with a deadline on every request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10 * UNIT)) as session:
        yield session


class Tap:
    """
    An exclusive queue bound ``#`` to an exchange, collecting every message.

    Each message is also checked against the AsyncAPI document of the service that
    published it (:mod:`tests.wire`); ``wire_problems`` collects what does not fit, and
    the tap fails its test with them when its block ends.
    """

    def __init__(self) -> None:
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.wire_problems: list[str] = []

    @property
    def ids(self) -> list[str]:
        return [m.message_id or "" for m in self.messages]

    async def wait_count(self, n: int, timeout: float = 15.0) -> None:
        await wait_for(lambda: len(self.messages) >= n, timeout=timeout, what=f"{n} messages")

    async def wait_ids(self, ids: set[str], timeout: float = 30.0) -> None:
        await wait_for(lambda: ids <= set(self.ids), timeout=timeout, what=f"{len(ids)} ids")


@contextlib.asynccontextmanager
async def tap(url: str, exchange: str, routing_key: str = "#") -> AsyncIterator[Tap]:
    """Declare ``exchange`` (topic) and tap it for the duration of the block."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(ex, routing_key)
        result = Tap()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            result.messages.append(message)
            problems = wire.check(message)
            if problems and len(result.wire_problems) < 20:
                result.wire_problems.append(f"{message.routing_key}: {'; '.join(problems)}")
            await message.ack()

        await queue.consume(on_message)
        yield result
    finally:
        await connection.close()
    assert not result.wire_problems, "\n".join(
        ["messages that do not fit the AsyncAPI document:", *result.wire_problems]
    )


# The units replicas hold in the cluster tests (the dev replicas' three trades
# subscriptions, the Token Terminal poll): their cursor queues are durable, by design.
CLUSTER_UNITS = (*(f"lx.{subscription_key('trades', {'mint': m})}" for m in MINTS), "tt")


async def delete_topology(url: str, exchange: str) -> None:
    """
    Remove what a test's service declared (exchange, quarantine, archive, and the
    replicas' cursor queues and presence exchange), so no run leaves queues or
    exchanges on the developer's broker.
    """
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        names, declared = Names(exchange), Topology(exchange)
        cursors = [names.cursor(unit) for unit in CLUSTER_UNITS]
        for queue in (declared.quarantine_queue, declared.archive_queue, *cursors):
            await channel.queue_delete(queue)
        for name in (exchange, declared.quarantine_exchange, names.presence):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


@pytest.fixture
async def cleanup_topology(broker_url: str, exchange_name: str) -> AsyncIterator[None]:
    yield
    with contextlib.suppress(Exception):
        await delete_topology(broker_url, exchange_name)


def config_data(
    tmp_path: Path,
    *,
    broker_url: str = BROKER_URL,
    exchange: str = "events",
    sources: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A configuration's content: ephemeral ports, journal under ``tmp_path``; overrides merge."""
    raw: dict[str, Any] = {
        "http": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "broker": {
            "url": broker_url,
            "exchange": exchange,
            "heartbeat": "2s",
            "publish_timeout": "3s",
            "retry_initial": "100ms",
            "retry_max": "1s",
            "connect_timeout": "2s",
        },
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": sources or [],
        "shutdown_timeout": "5s",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def make_config(
    tmp_path: Path,
    *,
    broker_url: str = BROKER_URL,
    exchange: str = "events",
    sources: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> Config:
    """A service configuration on ephemeral ports with a journal under ``tmp_path``."""
    data = config_data(
        tmp_path, broker_url=broker_url, exchange=exchange, sources=sources, **overrides
    )
    return Config.model_validate(data)


@contextlib.asynccontextmanager
async def running(config: Config, *, config_file: Path | None = None) -> AsyncIterator[Service]:
    """Run the real service in this loop for the duration of the block."""
    wire.register(config)
    service = Service(config, config_file=config_file)
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10 * UNIT):
            waiter = asyncio.create_task(service.started.wait())
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()
        yield service
    finally:
        service.stop()
        async with asyncio.timeout(30 * UNIT):
            await task
