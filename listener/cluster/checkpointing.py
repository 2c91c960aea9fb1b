"""
The checkpoints of the units a replica holds (CONTRACT §10), a mixin of
:class:`listener.cluster.coordinator.Coordinator`: each unit's cursor is written to its
queue in RabbitMQ once every event up to it is confirmed, checked every
:data:`CHECKPOINT_INTERVAL`; the next holder merges it into its journal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiormq
import structlog
from aiormq.abc import AbstractConnection

from listener.cluster import leases
from listener.cluster.units import Unit
from listener.journal import Journal

__all__ = ["AMQP_ERRORS", "CHECKPOINT_INTERVAL", "Checkpointing", "our_cancel"]

log = structlog.get_logger("listener.cluster")

CHECKPOINT_INTERVAL = 1.0
AMQP_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError)


def our_cancel(exc: BaseException) -> bool:
    """
    Whether ``exc`` is this task being cancelled, not aiormq cancelling what waited on
    a connection that closed (it raises CancelledError into the waiters).
    """
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() > 0


class Checkpointing:
    """Writing the held units' cursors (the coordinator's state, declared here)."""

    replica: str
    _stopping: bool
    _conn: AbstractConnection | None
    _journal: Journal
    _names: leases.Names
    _queue_type: str

    def held(self) -> list[Unit]:
        raise NotImplementedError  # (the coordinator's)

    async def _checkpoint_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            conn = self._conn
            if conn is None or await leases.blocked(conn):
                continue
            for unit in self.held():
                try:
                    await self._checkpoint(conn, unit)
                except (*AMQP_ERRORS, asyncio.CancelledError) as exc:
                    if our_cancel(exc):
                        raise
                    log.warning("cursor_write_failed", unit=unit.name, error=repr(exc)[:200])
                    break
                except Exception:  # the journal failing: the cursor waits for the next round
                    log.exception("cursor_write_failed", unit=unit.name)
                    break

    async def _checkpoint(self, conn: AbstractConnection, unit: Unit) -> None:
        """Write the unit's checkpoint to RabbitMQ once every event up to it is confirmed."""
        journal = self._journal
        if unit.candidate is None:
            version = await journal.checkpoint_version(unit.source, unit.key)
            if version == unit.written:
                return
            unit.candidate = (version, await journal.checkpoint(unit.source, unit.key))
        version, checkpoint = unit.candidate
        if unit.key is not None and checkpoint.state.get("seq") is None:
            unit.written, unit.candidate = version, None
            return  # no position yet: the marker written when it was taken stays
        if not await journal.confirmed_through(unit.source, checkpoint.watermark):
            return
        if not unit.held or self._conn is not conn:
            return  # only the holder writes, on the connection that holds the lease
        body = self._cursor_body(unit, checkpoint.state)
        await leases.write_cursor(
            conn, self._names.cursor(unit.name), body, queue_type=self._queue_type
        )
        unit.written, unit.candidate = version, None

    def _cursor_body(self, unit: Unit, state: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "unit": unit.name,
            "source": unit.source,
            "key": unit.key,
            "replica": self.replica,
            "written_at": time.time(),
            "state": dict(state),
        }
