"""
A diagnostic for goal 3 (accept latency): the listener on a core of its own.

On the 2-core machine the bench runs on, three processes share the cores during the
paced run: the listener, the load generator and the broker. :func:`own_core` gives
the listener core 0 and moves the broker's VM (``beam.smp``; not its helper processes)
and this process (the generator is its child and inherits the mask) to the others,
every thread of each: a thread's affinity is its own, ``sched_setaffinity`` of a pid
moves only that thread, and a thread started later inherits its creator's. On leaving,
every thread it moved gets its old mask back (RabbitMQ may bind its schedulers to cores,
``+stbt``: each thread's own mask is kept, not one for all); a thread started meanwhile
keeps the mask it inherited. A bench killed during the run leaves the broker on the
other cores: restart it.

It changes nothing of what the listener does, only where the kernel runs it: the run
tells a tail made by waiting for a core from one made by the daemon's own work. The
goal's verdict stays on the run where all share the cores. It needs Linux, two cores
or more, a local broker and the right to move its threads (root, or the broker's own
user): :func:`unavailable` says which is missing before anything starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psutil

from bench.common import broker_pid, say

__all__ = ["NotPinned", "own_core", "unavailable"]

Masks = dict[int, set[int]]  # thread id → its CPU mask before


class NotPinned(Exception):
    """The cores could not be split here; the message says why."""


def _broker() -> int | str:
    """The local broker's pid, or why the listener cannot be given a core of its own."""
    if not hasattr(os, "sched_setaffinity"):
        return "no CPU affinity on this platform"
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or 0 not in cpus:
        return f"needs core 0 and another (this process may use {sorted(cpus)})"
    broker = broker_pid()
    if broker is None:
        return "no local RabbitMQ process (beam.smp) found"
    try:
        owner = psutil.Process(broker).uids().real
    except psutil.Error as exc:
        return f"the broker's process cannot be read ({exc})"
    if os.geteuid() not in (0, owner):
        return "moving the broker's threads needs root or the broker's user"
    return broker


def unavailable() -> str | None:
    """Why the listener cannot be given a core of its own here, or ``None``."""
    found = _broker()
    return found if isinstance(found, str) else None


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
    """Give every thread in ``saved`` its mask back; say so where one could not be."""
    failed = 0
    for tid, cpus in saved.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # (ended meanwhile: the listener's, after it stopped)
        except OSError:
            failed += 1
    saved.clear()
    if failed:
        say(f"pinning: {failed} threads kept their moved CPU mask; restart the broker")


@contextlib.contextmanager
def own_core(listener: int) -> Iterator[None]:
    """
    Run the block with ``listener`` alone on core 0 and the broker and this process on
    the others.

    Raises:
        NotPinned: it cannot be done here (what :func:`unavailable` checks, a listener
            that is gone, or a move the kernel refused); nothing stays moved.
    """
    broker = _broker()
    if isinstance(broker, str):
        raise NotPinned(broker)
    if not _threads(listener):
        raise NotPinned("the listener is no longer running")
    others = os.sched_getaffinity(0) - {0}
    saved: Masks = {}
    try:
        try:
            _pin(broker, others, saved)
            _pin(os.getpid(), others, saved)
            _pin(listener, {0}, saved)
        except OSError as exc:
            raise NotPinned(f"the kernel refused to move a thread: {exc.strerror}") from exc
        yield
    finally:
        _restore(saved)
