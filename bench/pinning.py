"""
A diagnostic for goal 3 (accept latency): the listener on a core of its own.

On the 2-core machine the bench runs on, three processes share the cores during the
paced run: the listener, the load generator and the broker. :func:`own_core` gives
the listener core 0 and moves the broker and this process (the generator is its child
and inherits the mask) to the others, every thread of each (a thread's affinity is its
own: ``sched_setaffinity`` of a pid moves only that thread; threads started later
inherit their creator's). On leaving, every thread it moved gets its old mask back.

It changes nothing of what the listener does, only where the kernel runs it: the run
tells a tail made by waiting for a core from one made by the daemon's own work. The
goal's verdict stays on the run where all share the cores. It needs Linux, two cores
or more, a local broker (a RabbitMQ ``beam.smp``) and the right to move its threads
(root, or the broker's own user); otherwise it says why and pins nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psutil

from bench.common import broker_pid

__all__ = ["NotPinned", "own_core"]

Masks = dict[int, set[int]]  # thread id -> its CPU mask before


class NotPinned(Exception):
    """The cores could not be split here; the message says why."""


def _threads(pid: int) -> list[int]:
    try:
        return [t.id for t in psutil.Process(pid).threads()]
    except psutil.Error:
        return []


def _pin(pid: int, cpus: set[int], saved: Masks) -> None:
    """Move every thread of ``pid`` to ``cpus``, keeping each one's mask in ``saved``."""
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):  # (a thread that just ended)
            before = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
            saved.setdefault(tid, before)


def _restore(saved: Masks) -> None:
    for tid, cpus in saved.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


def _why_not(listener: int) -> str | int:
    """Why pinning cannot be done here, or the broker's pid."""
    if not hasattr(os, "sched_setaffinity"):
        return "no CPU affinity on this platform"
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or min(cpus) != 0:
        return f"needs cores 0 and another free to use (this process may use {sorted(cpus)})"
    if not _threads(listener):
        return "the listener is not running"
    broker = broker_pid()
    if broker is None:
        return "no local RabbitMQ process (beam.smp) found"
    return broker


@contextlib.contextmanager
def own_core(listener: int) -> Iterator[str | None]:
    """
    Run the block with ``listener`` alone on core 0 and the broker and this process on
    the others; yield ``None``, or why it could not (and then nothing was moved).
    """
    found = _why_not(listener)
    if isinstance(found, str):
        yield found
        return
    others = os.sched_getaffinity(0) - {0}
    saved: Masks = {}
    try:
        _pin(found, others, saved)
        _pin(os.getpid(), others, saved)
        _pin(listener, {0}, saved)
    except PermissionError:
        _restore(saved)
        yield "not allowed to move the broker's threads (run as root or as its user)"
        return
    try:
        yield None
    finally:
        _restore(saved)
