"""
Units held by exactly one replica (CONTRACT §10): every stream subscription and every
poll source is a unit, run (supervised) only while this replica holds its lease.

* **Taking**: every ``lease_retry`` (±25%), while the publisher's connection is up,
  the coordinator tries free units, one at a time, as long as it holds no more units
  than the least loaded replica it hears on the presence exchange (so three replicas
  and three units end up one each; no replica takes a second unit while another holds
  none, give or take one). A replica that holds two more than the least loaded one
  releases its newest unit (the hand-over below).
* **Hand-over**: after taking a lease, the unit's cursor in RabbitMQ is merged into the
  journal (the newer wins) before the unit starts; while it runs, its checkpoint is
  written to RabbitMQ once every event up to it is confirmed (checked every second).
* **Fencing**: when the connection is lost, every unit is stopped at once (before the
  publisher reconnects; the broker drops the leases with the connection). A broker
  that has not answered a probe for two heartbeats counts as lost (aiormq itself
  waits three heartbeats and more; the broker drops a silent peer after about two):
  the units stop, and are taken again only once it answers. A lease found gone
  (deleted by hand) stops its unit too. On shutdown, :meth:`stop` stops the
  units and releases their leases as soon as intake stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiormq
import structlog
from aiormq.abc import AbstractConnection

from listener.broker.publisher import Publisher
from listener.cluster import leases
from listener.cluster.checkpointing import AMQP_ERRORS, Checkpointing, our_cancel
from listener.cluster.units import Unit, source_views
from listener.config import BrokerConfig, ClusterConfig
from listener.journal import Journal
from listener.logs import redact
from listener.metrics import Metrics
from listener.sources.supervisor import supervised

__all__ = ["Coordinator"]

log = structlog.get_logger("listener.cluster")

# A replica not heard for this many lease_retry is gone.
PRESENCE_TTL = 3
# Waiting for a stopping unit (a stream says goodbye within 2 s).
STOP_TIMEOUT = 5.0


class Coordinator(Checkpointing):
    """Takes, runs, checkpoints and gives up this replica's units."""

    def __init__(
        self,
        *,
        units: Sequence[Unit],
        cluster: ClusterConfig,
        broker: BrokerConfig,
        journal: Journal,
        publisher: Publisher,
        metrics: Metrics,
    ) -> None:
        self.units = list(units)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self._retry = cluster.lease_retry
        self._heartbeat = max(broker.heartbeat, 0.5)
        # A connection that stopped answering: nothing is taken on it until it answers.
        self._suspect: AbstractConnection | None = None
        self._gave_up_at = 0.0  # (monotonic) the last rebalance
        self._queue_type = broker.queue_type
        self._names = leases.Names(broker.exchange)
        self._journal = journal
        self._publisher = publisher
        self._metrics = metrics
        self._conn: AbstractConnection | None = None
        # Lease queues taken on that connection and not released: a fence that leaves
        # the connection open (the watchdog's) leaves them held; _round gives them back.
        self._taken: tuple[AbstractConnection | None, set[str]] = (None, set())
        self._presence: leases.Presence | None = None
        self._peers: dict[str, tuple[float, frozenset[str]]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        for unit in self.units:
            metrics.lease_held.labels(unit.name).set(0)
        publisher.watch(self._on_broker)

    # -- views --------------------------------------------------------------------------

    def held(self) -> list[Unit]:
        """The units this replica holds now."""
        return [u for u in self.units if u.held]

    def unit_of(self, runtime: object) -> Unit | None:
        """The unit a runtime belongs to."""
        return next((u for u in self.units if u.runtime is runtime), None)

    def views(self) -> dict[str, dict[str, Any]]:
        """Each unit source's state, with each unit's holder (:func:`source_views`)."""
        return source_views(self.units)

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Take and keep units until cancelled (then everything held is stopped)."""
        loops = [
            asyncio.create_task(self._lease_loop(), name="cluster:leases"),
            asyncio.create_task(self._checkpoint_loop(), name="cluster:checkpoints"),
            asyncio.create_task(self._watchdog(), name="cluster:watchdog"),
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            # aiormq can swallow a cancel that lands in a channel operation while the
            # connection closes: the loops also end on _stopping, and are cancelled
            # again until they have (a TaskGroup would wait forever for such a one).
            self._stopping = True
            while pending := [t for t in loops if not t.done()]:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
            self._fence("stopped")
            running = {u.task for u in self.units if u.task is not None and not u.task.done()}
            if running:  # before the journal closes under them
                await asyncio.wait(running, timeout=STOP_TIMEOUT)

    async def stop(self) -> None:
        """
        Shutdown: stop every unit (all at once) and release its lease (CONTRACT §10),
        within ``STOP_TIMEOUT`` for each step; never raises.
        """
        self._stopping = True
        conn = self._conn
        held = self.held()
        await self._stop_units(held)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                if conn is not None and not conn.is_closed:
                    for unit in held:
                        await leases.release(conn, self._names.lease(unit.name))
                    await self._announce(leaving=True)
        except (*AMQP_ERRORS, asyncio.CancelledError) as exc:
            if our_cancel(exc):
                raise
            log.warning("lease_release_failed", error=f"{type(exc).__name__}: {exc}")
        log.info("cluster_released", units=[u.name for u in held])

    def _on_broker(self, up: bool) -> None:
        if up:
            self._wake.set()
        else:
            self._fence("broker connection lost")

    def _fence(self, why: str) -> None:
        """Stop every unit now: without the connection, no lease is ours any more."""
        stopped = [u.name for u in self.units if u.held]
        for unit in self.units:
            if unit.task is not None and not unit.task.done():
                unit.task.cancel()
            self._set_held(unit, held=False)
        self._conn = None  # (the presence channel is closed when joining again)
        if stopped:
            log.warning("cluster_fenced", reason=why, stopped=stopped)

    async def _lease_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()  # (a wake-up during the round is kept)
            conn = self._publisher.raw_connection()
            if conn is not None and conn is self._suspect:
                conn = None
            try:
                if conn is not None and conn is not self._conn:
                    await self._join(conn)
                if conn is not None and self._conn is conn:
                    await self._round(conn)
            except AMQP_ERRORS as exc:
                log.warning("cluster_round_failed", error=f"{type(exc).__name__}: {exc}")
            except asyncio.CancelledError as exc:
                if our_cancel(exc):
                    raise
                log.warning("cluster_round_failed", error="the connection closed")
            except Exception:  # a bug or the journal failing: logged, tried again next round
                log.exception("cluster_round_failed")
            delay = self._retry * random.uniform(0.75, 1.25)  # noqa: S311 - jitter
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _watchdog(self) -> None:
        """Fence when the broker has not answered for two heartbeats (see the docstring)."""
        last_ok = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(self._heartbeat / 3)
            conn = self._publisher.raw_connection()
            if conn is None:
                last_ok = time.monotonic()
                continue
            # Probe with what is left of two heartbeats: fenced at 2 x heartbeat, before
            # the broker frees our leases for others (it drops a silent peer after that).
            left = 2 * self._heartbeat - (time.monotonic() - last_ok)
            if not await self._answers(conn, max(left, self._heartbeat / 6)):
                silent = time.monotonic() - last_ok
                if silent > 2 * self._heartbeat and self._suspect is not conn:
                    self._suspect = conn
                    self._fence(f"the broker has not answered for {silent:.1f}s")
            else:
                last_ok = time.monotonic()
                if self._suspect is conn:
                    self._suspect = None
                    self._wake.set()

    async def _answers(self, conn: AbstractConnection, within: float) -> bool:
        try:
            if await leases.blocked(conn):
                return True  # a resource alarm: the broker is there (it said so)
            async with asyncio.timeout(within):
                await leases.probe(conn)
        except (*AMQP_ERRORS, asyncio.CancelledError) as exc:
            if our_cancel(exc):
                raise
            return False
        except Exception:  # not a broker answer either; logged, counted as silence
            log.exception("cluster_probe_failed")
            return False
        return True

    async def _join(self, conn: AbstractConnection) -> None:
        self._fence("a new broker connection")  # nothing held from before survives it
        self._peers.clear()
        if self._presence is not None:
            await self._presence.close()
        self._presence = await leases.Presence.join(conn, self._names.presence, self._heard)
        self._conn = conn
        await self._announce(hello=True)
        await asyncio.sleep(min(self._retry / 4, 0.5))  # the peers' answers come in

    def _heard(self, body: dict[str, Any]) -> None:
        replica = body.get("replica")
        if not isinstance(replica, str) or replica == self.replica:
            return
        units = frozenset(str(u) for u in body.get("held", ()) if isinstance(u, str))
        if body.get("leaving"):
            self._peers.pop(replica, None)
        else:
            known = replica in self._peers
            self._peers[replica] = (time.monotonic(), units)
            if body.get("hello") and not known:
                self._wake.set()  # answer a newcomer at once (the next round announces)
        until = time.monotonic() + PRESENCE_TTL * self._retry
        for unit in self.units:
            if unit.name in units and not unit.held:
                unit.other_until = until

    async def _announce(self, *, hello: bool = False, leaving: bool = False) -> None:
        conn = self._conn
        if conn is None or await leases.blocked(conn):
            return  # a publish would turn a blocking connection into a blocked one
        try:
            if self._presence is None:  # its channel failed: open another
                self._presence = await leases.Presence.join(conn, self._names.presence, self._heard)
            held = [] if leaving else [u.name for u in self.held()]
            body = {"replica": self.replica, "held": held, "hello": hello, "leaving": leaving}
            await self._presence.say(body)
        except AMQP_ERRORS as exc:  # presence is advice; the leases are what count
            presence, self._presence = self._presence, None
            if presence is not None:
                await presence.close()
            log.warning("cluster_presence_failed", error=f"{type(exc).__name__}: {exc}")

    def _least_loaded_peer(self, *, heard_since: float = 0.0) -> int | None:
        """
        The fewest units a live peer holds; ``None`` when none is heard (or, with
        ``heard_since``, when one has not spoken since then: its count may be stale).
        """
        now = time.monotonic()
        ttl = PRESENCE_TTL * self._retry
        alive = [(seen, len(units)) for seen, units in self._peers.values() if now - seen < ttl]
        if not alive or any(seen <= heard_since for seen, _ in alive):
            return None
        return min(count for _, count in alive)

    async def _round(self, conn: AbstractConnection) -> None:
        await self._release_stranded(conn)
        for unit in self.held():  # a lease deleted under us: stop its unit
            if not await leases.still_held(conn, self._names.lease(unit.name)):
                log.warning("lease_lost", unit=unit.name)
                await self._stop_unit(unit)
        await self._announce()
        held = self.held()
        # Give one up only on counts every peer said after the last give-up (else the
        # one taking it has not said so yet, and a second would go too).
        fresh = self._least_loaded_peer(heard_since=self._gave_up_at)
        if fresh is not None and len(held) >= fresh + 2:
            newest = max(held, key=lambda u: u.acquired_at)
            await self._give_up(conn, newest)
            self._gave_up_at = time.monotonic()
            return
        least = self._least_loaded_peer()
        now = time.monotonic()
        free = [u for u in self.units if not u.held and now >= u.not_before]
        random.shuffle(free)
        for unit in free:
            if self._stopping or (least is not None and len(self.held()) > least):
                return
            if unit.task is not None and not unit.task.done():
                continue  # still stopping from before
            if await leases.take(conn, self._names.lease(unit.name)):
                self._note_taken(conn, self._names.lease(unit.name))
                await self._start_unit(conn, unit)
                await self._announce()
                if least is not None:
                    least = self._least_loaded_peer()
            else:
                unit.other_until = now + PRESENCE_TTL * self._retry

    def _note_taken(self, conn: AbstractConnection, lease: str, *, taken: bool = True) -> None:
        on, names = self._taken
        if on is not conn:  # (the last connection's went with it)
            self._taken = on, names = conn, set()
        (names.add if taken else names.discard)(lease)

    async def _release_stranded(self, conn: AbstractConnection) -> None:
        """
        Give back the leases this connection holds for units not running here: fenced
        while the connection stayed open (the broker silent for two heartbeats), they
        stayed held, no other replica could take their units, and this one took back
        only its share: a unit was run by none until the connection closed.
        """
        on, names = self._taken
        if on is not conn:
            return
        running = {  # (one still stopping keeps its lease until it has: never run twice)
            self._names.lease(u.name)
            for u in self.units
            if u.held or (u.task is not None and not u.task.done())
        }
        for lease in sorted(names - running):
            with contextlib.suppress(aiormq.exceptions.ChannelLockedResource):  # (not ours)
                await leases.release(conn, lease)
            names.discard(lease)
            log.info("lease_released", lease=lease, reason="held on a fenced connection")

    async def _start_unit(self, conn: AbstractConnection, unit: Unit) -> None:
        queue = self._names.cursor(unit.name)
        try:
            cursor = await leases.read_cursor(conn, queue, queue_type=self._queue_type)
            adopted = 0
            if cursor is not None and isinstance(state := cursor.get("state"), Mapping):
                try:
                    adopted = await self._journal.adopt(unit.source, unit.key, state)
                except ValueError as exc:  # not a checkpoint of ours: go on from the journal
                    log.warning("cursor_unusable", unit=unit.name, error=redact(str(exc))[:200])
            elif unit.key is not None:
                # The first holder ever: before it subscribes, say that a holder began
                # without a position, so one taking over before its first cursor is
                # written resumes from all the provider still holds (since_seq 0), not
                # from "now" (what this one journaled meanwhile may not be published).
                marker = {"seq": None, "resend_all": True}
                await leases.write_cursor(
                    conn, queue, self._cursor_body(unit, marker), queue_type=self._queue_type
                )
        except BaseException:
            with contextlib.suppress(*AMQP_ERRORS):  # gone with the connection otherwise
                await leases.release(conn, self._names.lease(unit.name))
                self._note_taken(conn, self._names.lease(unit.name), taken=False)
            raise
        if self._conn is not conn:  # fenced meanwhile: the lease went with the connection
            return
        if self._stopping:  # shutdown began meanwhile: give it back at once
            await leases.release(conn, self._names.lease(unit.name))
            self._note_taken(conn, self._names.lease(unit.name), taken=False)
            return
        self._set_held(unit, held=True)
        unit.acquired_at = time.monotonic()
        unit.written, unit.candidate = None, None
        unit.task = asyncio.create_task(
            supervised(unit.runtime, metrics=self._metrics), name=f"unit:{unit.name}"
        )
        log.info(
            "lease_taken",
            unit=unit.name,
            replica=self.replica,
            cursor_from=cursor.get("replica") if cursor else None,
            adopted=adopted,
        )

    async def _give_up(self, conn: AbstractConnection, unit: Unit) -> None:
        """Rebalance: write the checkpoint if it is confirmed, stop, release."""
        await self._checkpoint(conn, unit)
        await self._stop_unit(unit)
        await leases.release(conn, self._names.lease(unit.name))
        self._note_taken(conn, self._names.lease(unit.name), taken=False)
        unit.not_before = time.monotonic() + PRESENCE_TTL * self._retry
        log.info("lease_given_up", unit=unit.name, reason="rebalance")

    async def _stop_unit(self, unit: Unit) -> None:
        await self._stop_units([unit])

    async def _stop_units(self, units: Sequence[Unit]) -> None:
        """Cancel the units' runtimes together and wait for them (bounded)."""
        tasks = set()
        for unit in units:
            self._set_held(unit, held=False)
            if unit.task is not None and not unit.task.done():
                unit.task.cancel()
                tasks.add(unit.task)
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    def _set_held(self, unit: Unit, *, held: bool) -> None:
        unit.held = held
        self._metrics.lease_held.labels(unit.name).set(1 if held else 0)
