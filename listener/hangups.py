"""
A SIGHUP noted from the process's first instant, before ``listener run`` has imported
anything (a few hundred milliseconds) and until its event loop handles the signal. The
default action ends the process: a reload sent while the daemon starts (a deploy's
config push) would kill it. The daemon reloads once its loop handles SIGHUP
(:func:`hung_up`); the other commands keep the default.
"""

from __future__ import annotations

import signal

__all__ = ["hung_up", "note"]

_hangups: list[int] = []


def note() -> None:
    """From now on, a SIGHUP is noted (until the loop's handler replaces this one)."""
    signal.signal(signal.SIGHUP, lambda signum, _: _hangups.append(signum))


def hung_up() -> bool:
    """Whether a SIGHUP came before the daemon's loop could handle it."""
    return bool(_hangups)
