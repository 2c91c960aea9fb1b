"""
One daemon per journal file: an exclusive ``flock`` on ``<journal>.lock``.

Two daemons on one journal (an overlapping rolling deploy) would publish each other's
pending rows and skew each other's counts. The lock is taken when the daemon's journal
opens and released when the process ends, however it ends (the kernel drops a flock
with its last descriptor, so a SIGKILL leaves no stale lock). The file holds the
holder's pid and host, for the error the second daemon prints. Commands other than
``run`` (replay, quarantine) do not take it: they work beside a running daemon.

SQLite's own write lock is another matter: any process may hold it for a transaction
(a command's, a ``sqlite3`` shell left in one). :func:`writable` opens the daemon's
writer connection in short waits for it, saying what it waits for, and can be
stopped between them (a SIGTERM during a start held up so was ignored for 30 s).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog

from listener.exceptions import JournalError, JournalLocked
from listener.journal.schema import BUSY_TIMEOUT_MS, error_code

__all__ = ["JournalLock", "writable"]

log = structlog.get_logger("listener.journal")

_T = TypeVar("_T")
OPEN_STEP_MS = 500  # each attempt's wait for another process's write lock


async def writable(path: Path, attempt: Callable[[int], Awaitable[_T]]) -> _T:
    """
    ``attempt(busy_ms)`` (open the writer connection, waiting ``busy_ms`` at most for
    another process's write lock) again until it is not held up, ``BUSY_TIMEOUT_MS`` at
    most; the first wait is logged. Cancellable between attempts.

    Raises:
        JournalError: still held up after that (naming the file and what to look for).
    """
    began, told = time.monotonic(), False
    while True:
        try:
            return await attempt(OPEN_STEP_MS)
        except JournalError as exc:
            cause = exc.__cause__
            if not isinstance(cause, sqlite3.Error) or error_code(cause) != sqlite3.SQLITE_BUSY:
                raise
            waited = time.monotonic() - began
            if waited * 1000 >= BUSY_TIMEOUT_MS:
                raise JournalError(
                    f"the journal {path} stayed locked by another process's write"
                    f" transaction for {waited:.0f} s (a sqlite3 shell, a listener command)"
                ) from cause
            if not told:
                told = True
                log.warning(
                    "journal_busy",
                    path=str(path),
                    note="another process holds the journal's write lock; waiting for it",
                    wait_max=BUSY_TIMEOUT_MS // 1000,
                )


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
