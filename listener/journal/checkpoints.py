"""
Checkpoints of a cluster unit (CONTRACT §10): what a new holder of a stream subscription
or a poll source needs to go on where the last one stopped, read from the journal and
merged into it. A mixin of :class:`listener.journal.store.Journal`.

* A stream subscription's checkpoint is its cursor: ``{"seq": n}``; or, from a first
  holder that has no position yet, ``{"seq": null, "resend_all": true}``: resume with
  ``since_seq`` 0 (all the provider still holds) where this journal has no cursor.
* A poll source's is its state: the content seen per key, renamed items, primed
  resources, each with the time it was written.

:meth:`Checkpoints.checkpoint` reads the state and the journal's last ``seq`` (the
*watermark*) in one read transaction: every event the state covers is at or below it.
:meth:`Checkpoints.confirmed_through` says when every event of the source up to a
watermark is published (confirmed), which is when the checkpoint may be handed over.
:meth:`Checkpoints.adopt` merges one into this journal, keeping whichever is newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from listener.exceptions import JournalError
from listener.journal.reads import Reads
from listener.journal.schema import BUSY_TIMEOUT_MS

_W = TypeVar("_W")


__all__ = ["Checkpoint", "Checkpoints"]

_UNCONFIRMED = (
    "SELECT EXISTS (SELECT 1 FROM events WHERE status = 0 AND seq <= ? AND source = ?)"
    " OR EXISTS (SELECT 1 FROM events WHERE status = 3 AND seq <= ? AND source = ?)"
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A unit's state as of ``watermark`` (the journal's last event ``seq`` then)."""

    watermark: int
    state: Mapping[str, Any]


def _read_checkpoint(conn: sqlite3.Connection, source: str, key: str | None) -> Checkpoint:
    conn.execute("BEGIN")  # one snapshot for the state and the watermark
    try:
        ((watermark,),) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchall()
        state: dict[str, Any]
        if key is not None:
            row = conn.execute(
                "SELECT seq FROM cursors WHERE source = ? AND key = ?", (source, key)
            ).fetchone()
            state = {"seq": int(row[0]) if row else None}
        else:
            state = {
                "states": [
                    [k, h, bytes(c).decode(), at]
                    for k, h, c, at in conn.execute(
                        "SELECT key, hash, content, updated_at FROM poll_state WHERE source = ?",
                        (source,),
                    )
                ],
                # Apart from "states" (an older replica reads those and ignores this).
                "changes": conn.execute(
                    "SELECT key, changes FROM poll_state WHERE source = ? AND changes > 0",
                    (source,),
                ).fetchall(),
                "aliases": conn.execute(
                    "SELECT item, current, updated_at FROM poll_aliases WHERE source = ?",
                    (source,),
                ).fetchall(),
                "primed": conn.execute(
                    "SELECT resource, primed_at, polled_at FROM poll_resources WHERE source = ?",
                    (source,),
                ).fetchall(),
            }
    finally:
        conn.execute("COMMIT")
    return Checkpoint(int(watermark), state)


def _version(conn: sqlite3.Connection, source: str, key: str | None) -> tuple[Any, ...]:
    if key is not None:
        row = conn.execute(
            "SELECT seq FROM cursors WHERE source = ? AND key = ?", (source, key)
        ).fetchone()
        return (row[0] if row else None,)
    return tuple(
        conn.execute(
            "SELECT (SELECT max(updated_at) FROM poll_state WHERE source = ?1),"
            " (SELECT count(*) FROM poll_state WHERE source = ?1),"
            " (SELECT max(updated_at) FROM poll_aliases WHERE source = ?1),"
            " (SELECT count(*) FROM poll_resources WHERE source = ?1),"
            " (SELECT max(polled_at) FROM poll_resources WHERE source = ?1)",
            (source,),
        ).fetchone()
    )


def _adopt(conn: sqlite3.Connection, source: str, key: str | None, state: Mapping[str, Any]) -> int:
    """
    Merge ``state`` in, newer wins; return how many rows changed.

    Raises:
        ValueError: ``state`` is not a checkpoint of this shape (nothing is merged).
    """
    try:
        return _merge(conn, source, key, state)
    except (TypeError, ValueError, AttributeError, sqlite3.InterfaceError) as exc:
        raise ValueError(f"not a checkpoint: {type(exc).__name__}: {exc}") from exc


def _merge(conn: sqlite3.Connection, source: str, key: str | None, state: Mapping[str, Any]) -> int:
    now = time.time()
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        changed = 0
        if key is not None:
            seq = state.get("seq")
            if seq is None and state.get("resend_all"):
                seq = 0  # a holder began without a position: all the provider holds
            if isinstance(seq, int):
                cur.execute(
                    "INSERT INTO cursors (source, key, seq, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (source, key) DO UPDATE SET seq = excluded.seq,"
                    " updated_at = excluded.updated_at WHERE excluded.seq > cursors.seq",
                    (source, key, seq, now),
                )
                changed += cur.rowcount
        else:
            # A key's change count only grows (a change id names it): one from a
            # replica that counts fewer (an older release's: none) is not taken.
            counts = {str(k): int(n) for k, n in state.get("changes", ())}
            for k, h, content, at in state.get("states", ()):
                cur.execute(
                    "INSERT INTO poll_state (source, key, hash, content, updated_at, changes)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source, key) DO UPDATE SET"
                    " hash = excluded.hash, content = excluded.content,"
                    " updated_at = excluded.updated_at,"
                    " changes = max(poll_state.changes, excluded.changes)"
                    " WHERE excluded.updated_at > poll_state.updated_at",
                    (source, k, h, str(content).encode(), float(at), counts.get(str(k), 0)),
                )
                changed += cur.rowcount
            for item, current, at in state.get("aliases", ()):
                cur.execute(
                    "INSERT INTO poll_aliases (source, item, current, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (source, item) DO UPDATE SET"
                    " current = excluded.current, updated_at = excluded.updated_at"
                    " WHERE excluded.updated_at > poll_aliases.updated_at",
                    (source, item, current, float(at)),
                )
                changed += cur.rowcount
            for resource, at, *polled in state.get("primed", ()):
                # (a checkpoint of an earlier release has no polled_at)
                polled_at = float(polled[0]) if polled and polled[0] is not None else None
                cur.execute(
                    "INSERT INTO poll_resources (source, resource, primed_at, polled_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (source, resource) DO UPDATE SET"
                    " polled_at = excluded.polled_at WHERE excluded.polled_at >"
                    " coalesce(poll_resources.polled_at, 0)",
                    (source, resource, float(at), polled_at),
                )
                changed += cur.rowcount
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return changed


class Checkpoints(Reads):
    """Read, confirm and merge unit checkpoints (see the module docstring)."""

    _writer: sqlite3.Connection | None
    _write_thread: ThreadPoolExecutor
    #: Held by every use of the writer connection (commits may run on the loop's thread).
    _writing: asyncio.Lock

    async def _on_writer(self, fn: Callable[..., _W], *args: Any) -> _W:
        """
        Run ``fn(*args)`` on the writer thread, between commits.

        Raises:
            JournalError: SQLite failed (as :meth:`~listener.journal.reads.Reads._on`).
        """

        def job() -> _W:
            # An inline commit left the connection waiting only INLINE_BUSY_MS for another
            # process's write lock (a redrive's); on this thread it may wait its full time.
            self._busy_timeout(BUSY_TIMEOUT_MS)
            return fn(*args)

        async with self._writing:
            try:
                return await self._writer_job(job)
            except sqlite3.Error as exc:
                raise JournalError(f"journal write failed: {exc}") from exc

    def _busy_timeout(self, ms: int) -> None:
        raise NotImplementedError  # (the Journal's)

    async def _writer_job(self, fn: Callable[..., _W], *args: Any) -> _W:
        """
        Run ``fn(*args)`` on the writer thread (the caller holds ``_writing``); when
        cancelled, still wait for it to end before raising, so the caller's lock on the
        writer connection is held until the thread lets go of it (a cancelled await
        does not stop the thread).
        """
        job = asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            while not job.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job})
            raise

    async def checkpoint(self, source: str, key: str | None) -> Checkpoint:
        """The unit's state and watermark (``key``: a subscription; ``None``: a poll source)."""
        return await self._on(self._read_thread, _read_checkpoint, self._reader, source, key)

    async def checkpoint_version(self, source: str, key: str | None) -> tuple[Any, ...]:
        """Something that changes whenever the unit's checkpoint does (cheap to read)."""
        return await self._on(self._read_thread, _version, self._reader, source, key)

    async def confirmed_through(self, source: str, watermark: int) -> bool:
        """Whether every event of ``source`` up to ``watermark`` is published."""

        def read(conn: sqlite3.Connection) -> bool:
            ((open_,),) = conn.execute(
                _UNCONFIRMED, (watermark, source, watermark, source)
            ).fetchall()
            return not open_

        return await self._on(self._read_thread, read, self._reader)

    async def adopt(self, source: str, key: str | None, state: Mapping[str, Any]) -> int:
        """
        Merge a checkpoint from another replica in (newer wins); rows changed.

        Raises:
            ValueError: it is not a checkpoint (nothing merged).
        """
        return await self._on_writer(_adopt, self._writer, source, key, state)
