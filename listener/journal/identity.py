"""
Whether the journal's files are still the ones the daemon writes.

A journal file deleted or replaced while the daemon runs (``rm``, a restore, a ``mv``
over it) does not stop SQLite: it goes on writing to the open, unlinked file, and
whatever it commits there is gone at the next start. So after each commit the path
and its WAL are checked to be the files opened (device and inode, two ``stat`` calls):
when not, the commit counts as failed, no 2xx is given for it, and the journal reports
an error until the daemon is restarted on a journal that is there.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

__all__ = ["FileIdentity"]

log = structlog.get_logger("listener.journal")


class FileIdentity:
    """The journal file and its WAL as first seen; :meth:`lost` says when that changes."""

    def __init__(self, path: Path) -> None:
        self._files = (path, path.with_name(path.name + "-wal"))
        self._seen: dict[Path, tuple[int, int]] = {}
        self._said = False

    def lost(self) -> str | None:
        """Why the files on disk are no longer the journal being written, if they are not."""
        for file in self._files:
            try:
                stat = os.stat(file)
            except FileNotFoundError:
                if file not in self._seen:
                    continue  # (not created yet)
                return self._say(f"{file} was deleted")
            found = (stat.st_dev, stat.st_ino)
            if self._seen.setdefault(file, found) != found:
                return self._say(f"{file} was replaced")
        return None

    def _say(self, what: str) -> str:
        problem = (
            f"the journal file {what} while the daemon ran: what it commits would be lost"
            " at the next start; restart the daemon (events still pending in the old file"
            " are published while it runs)"
        )
        if not self._said:
            self._said = True
            log.error("journal_file_lost", problem=problem)
        return problem
