"""
A deadline that holds whatever the awaited operation does with its cancellation.

``asyncio.timeout`` cancels the waiting task once, and counts on the cancellation
coming back out. aio-pika and aiormq catch ``CancelledError`` in places (closing a
channel whose call was cancelled, closing a connection) and go on awaiting a socket that
a blackholed broker never drains: the deadline passed and nothing happened. After a
blackhole, the publisher closing the dead connection waited so for over a minute,
publishing nothing (the chaos test of a blackholed broker, now and then, under load).
:func:`within` runs the operation as a task of its own and waits for it with
``asyncio.wait``: at the deadline the task is given up on (cancelled, or left to
finish: a close) and kept referenced until it ends, and ``TimeoutError`` is raised at
once; :func:`settle` gives those still running a last moment before the service returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["quietly", "settle", "within"]

_T = TypeVar("_T")

# Operations given up on, until they end (a task nobody references may be collected).
_abandoned: set[asyncio.Future[Any]] = set()


async def within(operation: Awaitable[_T], seconds: float, *, finish: bool = False) -> _T:
    """
    ``await operation``, for ``seconds`` at most.

    ``finish``: an operation given up on (the deadline, or the caller cancelled) is left
    to finish, not cancelled (a close: cut short, aio-pika's close callbacks were left
    pending on a loop about to close). :func:`settle` waits for it before the exit.

    Raises:
        TimeoutError: not done in time (cancelled unless ``finish``; not waited for).
    """
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task, cancel=not finish)
        raise
    if not done:
        _abandon(task, cancel=not finish)
        raise TimeoutError(f"not done within {seconds:g} s")
    return task.result()


async def quietly(operation: Awaitable[object], seconds: float) -> bool:
    """
    :func:`within`, left to finish at the deadline (a close); ``False``: it failed or is
    late. A ``CancelledError`` of the operation's own (aiormq cancels what waits on a
    connection that closed) is a failure too; the caller's task being cancelled is not.
    """
    try:
        await within(operation, seconds, finish=True)
    except asyncio.CancelledError:
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise
        return False  # (it ended the publisher: a close cancelled by the connection's loss)
    except Exception:  # (the deadline, or what the operation raised)
        return False
    return True


async def settle(seconds: float) -> None:
    """
    Give this loop's operations given up on ``seconds`` to end, then cancel them (one a
    closed loop left to the garbage collector would run on a closed loop).
    """
    loop = asyncio.get_running_loop()
    pending = {t for t in _abandoned if not t.done() and t.get_loop() is loop}
    if pending:
        await asyncio.wait(pending, timeout=seconds)
        for task in pending:
            task.cancel()


def _abandon(task: asyncio.Future[Any], *, cancel: bool) -> None:
    if cancel:
        task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # (retrieved: no "exception was never retrieved" at exit)
