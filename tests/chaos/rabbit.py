"""
Broker-side faults through ``rabbitmqctl`` (needs the local node and the rights to
control it, e.g. root on a development box).

Every fault is a context manager that undoes itself in ``finally``, so a failing or
timed-out test still leaves the shared broker running and unalarmed; :func:`restore`
is also run once at the end of the session as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator

from tests.conftest import unavailable

__all__ = ["BrokerApp", "available", "broker_app", "memory_alarm", "rabbitmqctl", "restore"]

DEFAULT_WATERMARK = "0.4"
# What this session changed and must put back, even after a crash of a test.
_dirty: dict[str, str] = {}


def available() -> bool:
    """Whether ``rabbitmqctl`` can control the local node."""
    return shutil.which("rabbitmqctl") is not None and os.geteuid() == 0


def require() -> None:
    """Skip the test (fail under ``CI=true``) when the broker cannot be controlled."""
    if not available():
        unavailable("rabbitmqctl not usable here (needs the local node and root)")


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    """Run ``rabbitmqctl -q <args>``; raise with its output when it fails."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}: {text}")
    return text


async def _watermark() -> str:
    """The node's current ``vm_memory_high_watermark`` as ``set_vm_memory_high_watermark`` takes it."""
    with contextlib.suppress(RuntimeError, ValueError, KeyError, TimeoutError):
        status = json.loads(await rabbitmqctl("status", "--formatter", "json"))
        setting = status["vm_memory_high_watermark_setting"]
        if "relative" in setting:
            return str(setting["relative"])
    return DEFAULT_WATERMARK


class BrokerApp:
    """Stop and start the RabbitMQ application (the Erlang node stays up)."""

    async def stop(self) -> None:
        """``rabbitmqctl stop_app``: every connection is closed, the port refuses."""
        _dirty["app"] = "stopped"
        await rabbitmqctl("stop_app")

    async def start(self) -> None:
        """``rabbitmqctl start_app``, then wait until the node accepts connections."""
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup", timeout=120)
        _dirty.pop("app", None)


@contextlib.asynccontextmanager
async def broker_app() -> AsyncIterator[BrokerApp]:
    """A :class:`BrokerApp`; the application is started again on exit, whatever happened."""
    app = BrokerApp()
    try:
        yield app
    finally:
        if "app" in _dirty:
            await app.start()


@contextlib.asynccontextmanager
async def memory_alarm(watermark: str = "0.0000001") -> AsyncIterator[None]:
    """Raise a memory alarm (every publishing connection is blocked); always lowered on exit."""
    previous = _dirty.get("watermark") or await _watermark()
    _dirty["watermark"] = previous
    try:
        await rabbitmqctl("set_vm_memory_high_watermark", watermark)
        yield
    finally:
        await rabbitmqctl("set_vm_memory_high_watermark", previous)
        _dirty.pop("watermark", None)


async def restore() -> None:
    """Undo whatever a test left behind (the session's safety net)."""
    if "app" in _dirty:
        await BrokerApp().start()
    if "watermark" in _dirty:
        await rabbitmqctl("set_vm_memory_high_watermark", _dirty.pop("watermark"))
