"""
Where the journal's next commit runs: on the event loop's thread, or on the writer thread.

A commit on the loop's thread blocks the loop for its duration, about half a
millisecond with its fsync; on the writer thread each SQLite call gives up Python's
lock and must win it back from the busy loop, which makes a commit several times
longer (:meth:`listener.journal.store.Journal._commit`). So commits run inline while
the disk is quick, and go to the thread for ``PAUSE`` seconds when it is not:

* a batch over ``MAX_BYTES`` always goes to the thread;
* one commit over ``STALL`` (a disk that hangs), or ``SLOW_COUNT`` commits over
  ``SLOW`` within ``PAUSE`` seconds (a slow disk), send the commits there;
* another process holding the write lock sends them there at once (:meth:`pause`).

One commit over ``SLOW`` alone does not: SQLite's automatic WAL checkpoint (it runs
inside the commit that fills the log, several times a second at a few hundred commits
per second) took 20-30 ms now and then on a virtual disk, and each sent every commit
to the thread for 10 s, where the accept latency's p99 at half load rose from ~15 to
~30 ms (bench/README.md).
"""

from __future__ import annotations

import collections

__all__ = ["InlineCommits"]

MAX_BYTES = 256 * 1024
SLOW = 0.02
SLOW_COUNT = 3
STALL = 0.1
PAUSE = 10.0


class InlineCommits:
    """The policy above; ``now`` is ``time.monotonic()``, passed in (tests)."""

    __slots__ = ("_slow", "_until")

    def __init__(self) -> None:
        self._until = 0.0
        self._slow: collections.deque[float] = collections.deque(maxlen=SLOW_COUNT)

    def allowed(self, nbytes: int, now: float) -> bool:
        """Whether a commit of ``nbytes`` of event bodies may run on the loop's thread now."""
        return now >= self._until and nbytes <= MAX_BYTES

    def took(self, seconds: float, now: float) -> None:
        """An inline commit ended at ``now`` after ``seconds``."""
        if seconds > STALL:
            self.pause(now)
        elif seconds > SLOW:
            self._slow.append(now)
            if len(self._slow) == SLOW_COUNT and now - self._slow[0] <= PAUSE:
                self.pause(now)

    def pause(self, now: float) -> None:
        """Send the commits to the writer thread for ``PAUSE`` seconds from ``now``."""
        self._until = now + PAUSE
        self._slow.clear()
