"""
Signals noted from the start of ``listener run`` (as soon as its entry point runs, before
it has imported anything: a few hundred milliseconds) until its event loop handles them,
and ignored again once the loop is closed. The default actions end the process: a
reload sent while the daemon starts (a deploy's config push) killed it (exit 129), a
SIGTERM then ended it with 143 or a ``KeyboardInterrupt`` traceback, and a signal in the
milliseconds between the loop's close and the exit turned a clean shutdown's 0 into 143
or 129. The daemon reloads for a SIGHUP noted (:func:`hung_up`) and stops at once for a
SIGTERM or SIGINT noted (:func:`stopped`); the other commands keep the defaults. (A
signal before Python has run the entry point at all still has its default action.)
"""

from __future__ import annotations

import signal

__all__ = ["hung_up", "ignore", "note", "stopped"]

_hangups: list[int] = []
_stops: list[int] = []
_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def note() -> None:
    """From now on, SIGHUP, SIGTERM and SIGINT are noted (until the loop's handlers)."""
    signal.signal(signal.SIGHUP, lambda signum, _: _hangups.append(signum))
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, _: _stops.append(signum))


def hung_up() -> bool:
    """Whether a SIGHUP came before the daemon's loop could handle it."""
    return bool(_hangups)


def stopped() -> bool:
    """Whether a SIGTERM or SIGINT came before the daemon's loop could handle it."""
    return bool(_stops)


def ignore() -> None:
    """The daemon has shut down: a signal now changes nothing (nor the exit code)."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
