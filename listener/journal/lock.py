"""
One daemon per journal file: an exclusive ``flock`` on ``<journal>.lock``.

Two daemons on one journal (an overlapping rolling deploy) would publish each other's
pending rows and skew each other's counts. The lock is taken when the daemon's journal
opens and released when the process ends, however it ends (the kernel drops a flock
with its last descriptor, so a SIGKILL leaves no stale lock). The file holds the
holder's pid and host, for the error the second daemon prints. Commands other than
``run`` (replay, quarantine) do not take it: they work beside a running daemon.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from listener.exceptions import JournalError, JournalLocked

__all__ = ["JournalLock"]


class JournalLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, journal_path: Path) -> None:
        self.journal_path = journal_path
        self.path = journal_path.with_name(journal_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """
        Raises:
            JournalLocked: another process holds it; the message names the holder.
            JournalError: the lock file cannot be made (a read-only or full disk, a
                file where the directory should be): one line naming it, exit 2.
        """
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"the journal lock {self.path} cannot be created: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown pid"
            os.close(fd)
            raise JournalLocked(self.journal_path, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"the journal lock {self.path} cannot be written: {exc}") from exc
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
