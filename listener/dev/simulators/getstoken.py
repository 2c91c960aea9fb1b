"""
A Get Smart Token webhook sender (CONTRACT §5) for tests, the demo and ``listener simulate``.

::

    async with GetSmartTokenSimulator(url=URL, secret=WHSEC, rate=20) as sim:
        await sim.wait_until(lambda: sim.sent >= 100)
    sim.accepted        # event id → its delivery, for every id answered 2xx as an event

or, in the foreground: ``await GetSmartTokenSimulator(...).run(seconds=5)``.

Every request is signed (standard-webhooks by default; any scheme through
:func:`listener.signatures.sign`) with a fresh timestamp. Event ``n`` has the id
``evt_<n>`` (``id_prefix`` + n) and data derived from ``(seed, n)`` alone, so runs are
reproducible; ``created_at`` is the send time. Optional shares of

* bad payloads: invalid JSON or schema violations (the listener answers 200 and
  quarantines them), and
* redeliveries: the same body and ``webhook-id`` again, as a provider retries
  (the listener answers 200 with ``"duplicate": true``).

The ledger records what the listener answered: :attr:`accepted` (events it took),
:attr:`quarantined`, :attr:`duplicates`, :attr:`rejected` by status, :attr:`errors`.

The sender side is written from the contract, not from ``handlers/getstoken.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from dataclasses import dataclass

import aiohttp
import orjson

from listener.dev.simulators.getstoken_payloads import (
    BAD_KINDS,
    EVENT_TYPES,
    MAX_RETRY_WAIT,
    BadKind,
    make_payload,
)
from listener.dev.simulators.waiting import Waitable
from listener.sources.signatures import Scheme, sign

__all__ = ["EVENT_TYPES", "Delivery", "GetSmartTokenSimulator", "make_payload"]


@dataclass(slots=True)
class Delivery:
    """One POST and what the listener answered (``status`` 0: no answer)."""

    event_id: str
    type: str
    bad: BadKind | None
    redelivery: bool
    status: int = 0
    attempts: int = 0
    duplicate: bool = False
    quarantined: bool = False
    server_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 2xx."""
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class _Job:
    event_id: str
    type: str
    body: bytes
    bad: BadKind | None
    redelivery: bool


class GetSmartTokenSimulator(Waitable):
    """
    Posts signed Get Smart Token webhooks to ``url`` at ``rate`` per second.

    Args:
        url: the listener's webhook endpoint, e.g. ``http://127.0.0.1:8080/webhooks/gst``.
        secret: ``whsec_<base64>`` for standard-webhooks, else the shared secret text.
        scheme: the signature scheme (CONTRACT §5).
        header: the signature header, for the schemes that let it be chosen.
        rate: deliveries per second (new events, bad payloads and redeliveries);
            0 or less: as fast as ``concurrency`` allows.
        concurrency: requests in flight at once.
        bad_share: share (0..1) of new events sent as bad payloads.
        duplicate_share: share (0..1) of deliveries that resend an accepted event.
        environment: the ``environment`` field of every payload.
        id_prefix: event ids are ``<id_prefix><n>``.
        start: the first ``n``.
        max_events: stop after this many new events (``None``: until :meth:`stop`).
        seed: seeds the data and the choices.
        attempts: tries per delivery; 5xx, 429 and connection errors are retried.
        timeout: seconds for one request.
        record: keep every delivery in :attr:`deliveries` (off for long runs).
    """

    _waiting_name = "getstoken simulator"

    def __init__(
        self,
        *,
        url: str,
        secret: str,
        scheme: Scheme = "standard-webhooks",
        header: str | None = None,
        rate: float = 10.0,
        concurrency: int = 4,
        bad_share: float = 0.0,
        duplicate_share: float = 0.0,
        environment: str = "production",
        id_prefix: str = "evt_",
        start: int = 1,
        max_events: int | None = None,
        seed: int = 0,
        attempts: int = 3,
        timeout: float = 10.0,
        record: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not (0.0 <= bad_share <= 1.0 and 0.0 <= duplicate_share <= 1.0):
            raise ValueError("bad_share and duplicate_share are shares from 0 to 1")
        # Fail now, not on the first request, on a secret the scheme cannot use.
        sign(scheme, secret, b"", msg_id="msg_check", timestamp=0, header=header)
        self.url = url
        self.scheme: Scheme = scheme
        self.rate = rate
        self.concurrency = concurrency
        self.bad_share = bad_share
        self.duplicate_share = duplicate_share
        self.environment = environment
        self.id_prefix = id_prefix
        self.max_events = max_events
        self.seed = seed
        self.attempts = max(attempts, 1)
        self.record = record
        self._secret = secret
        self._header = header
        self._timeout = timeout
        self._next_n = start

        #: Ledger: event id → the delivery that got it accepted (2xx, not quarantined).
        self.accepted: dict[str, Delivery] = {}
        #: The listener's id of each quarantined payload (``q_...``) → its delivery.
        self.quarantined: dict[str, Delivery] = {}
        #: Every delivery, in completion order (when ``record``).
        self.deliveries: list[Delivery] = []
        #: Deliveries answered 2xx with ``"duplicate": true``.
        self.duplicates = 0
        #: Non-2xx answers by status, and requests that got no answer.
        self.rejected: collections.Counter[int] = collections.Counter()
        self.errors = 0
        #: New events made, and deliveries completed (answered or not).
        self.events = 0
        self.sent = 0

        self._rng = random.Random(seed)  # noqa: S311 - reproducible test traffic, not secrets
        self._redeliverable: collections.deque[_Job] = collections.deque(maxlen=1024)
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._main: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> GetSmartTokenSimulator:
        if self._main is not None:
            raise RuntimeError("this simulator was already started; create a new one")
        # One owned task, as in the Layerx402 simulator: __aenter__ and __aexit__ may
        # run in different tasks (pytest fixtures), which a TaskGroup does not allow.
        self._main = asyncio.create_task(self.run(), name="getstoken-simulator")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stop(self) -> None:
        """Stop making deliveries; those in flight complete (idempotent)."""
        self._stopping.set()
        self._pulse()

    async def aclose(self) -> None:
        """:meth:`stop`, then wait until every delivery in flight has its answer."""
        self.stop()
        if self._main is not None:
            await self._main

    async def run(self, *, seconds: float | None = None) -> None:
        """Send until :meth:`stop`, ``max_events`` or ``seconds``, then finish in-flight posts."""
        jobs: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            asyncio.TaskGroup() as tasks,
        ):
            for i in range(self.concurrency):
                tasks.create_task(self._worker(session, jobs), name=f"getstoken-sender-{i}")
            # stop() at the deadline rather than cancelling: a job being handed to a
            # worker is still sent, so the ledger counts only what was posted.
            deadline = (
                asyncio.get_running_loop().call_later(seconds, self.stop)
                if seconds is not None
                else None
            )
            try:
                await self._produce(jobs)
            finally:
                if deadline is not None:
                    deadline.cancel()
            for _ in range(self.concurrency):
                await jobs.put(None)

    # --- observation -------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (or ``max_events`` reached)."""
        return self._stopping.is_set()

    def summary(self) -> str:
        """One line: what was sent and what the listener answered."""
        rejected = ", ".join(f"{status}: {n}" for status, n in sorted(self.rejected.items()))
        return (
            f"sent {self.sent} ({self.events} events): accepted {len(self.accepted)}, "
            f"quarantined {len(self.quarantined)}, duplicates {self.duplicates}, "
            f"rejected {sum(self.rejected.values())}{f' ({rejected})' if rejected else ''}, "
            f"no answer {self.errors}"
        )

    # --- producing -----------------------------------------------------------------------

    def _next_job(self) -> _Job:
        if self._redeliverable and self._rng.random() < self.duplicate_share:
            previous = self._rng.choice(self._redeliverable)
            return _Job(previous.event_id, previous.type, previous.body, None, redelivery=True)
        n = self._next_n
        self._next_n += 1
        self.events += 1
        bad: BadKind | None = None
        if self._rng.random() < self.bad_share:
            bad = self._rng.choice(BAD_KINDS)
        event_id, event_type, body = make_payload(
            n, seed=self.seed, id_prefix=self.id_prefix, environment=self.environment, bad=bad
        )
        return _Job(event_id, event_type, body, bad, redelivery=False)

    def _exhausted(self) -> bool:
        return self.max_events is not None and self.events >= self.max_events

    async def _produce(self, jobs: asyncio.Queue[_Job | None]) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = loop.time()
        while not self._stopping.is_set():
            if self._exhausted():
                self.stop()
                return
            now = loop.time()
            if now < next_at:
                # An interruptible pause: ends early when stop() is called.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next_at - now):
                        await self._stopping.wait()
                continue
            # A full queue blocks here: the rate falls to what `concurrency` sustains.
            await jobs.put(self._next_job())
            # After falling behind (slow listener), no burst to catch up beyond one second.
            next_at = max(next_at + interval, loop.time() - 1.0)

    # --- sending -------------------------------------------------------------------------

    async def _worker(
        self, session: aiohttp.ClientSession, jobs: asyncio.Queue[_Job | None]
    ) -> None:
        while (job := await jobs.get()) is not None:
            delivery = await self._deliver(session, job)
            self._settle(job, delivery)

    async def _deliver(self, session: aiohttp.ClientSession, job: _Job) -> Delivery:
        delivery = Delivery(job.event_id, job.type, job.bad, job.redelivery)
        for attempt in range(1, self.attempts + 1):
            delivery.attempts = attempt
            # The same webhook-id on every attempt and redelivery, as the Standard
            # Webhooks spec asks of retries ("Webhook headers": webhook-id).
            headers = sign(
                self.scheme,
                self._secret,
                job.body,
                msg_id=f"msg_{job.event_id}",
                header=self._header,
            )
            headers["Content-Type"] = "application/json"
            retry_after = 0.25 * attempt
            try:
                async with session.post(self.url, data=job.body, headers=headers) as response:
                    delivery.status = response.status
                    delivery.error = None
                    content = await response.read()
                    if "Retry-After" in response.headers:
                        with contextlib.suppress(ValueError):
                            retry_after = float(response.headers["Retry-After"])
            except (aiohttp.ClientError, TimeoutError) as exc:
                delivery.status = 0
                delivery.error = f"{type(exc).__name__}: {exc}"
                content = b""
            if delivery.ok:
                self._read_answer(delivery, content)
                return delivery
            if delivery.status not in {0, 429} and delivery.status < 500:
                return delivery  # 4xx: a retry would get the same answer
            if attempt < self.attempts:
                # Stop does not wait out a long Retry-After.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(retry_after, MAX_RETRY_WAIT)):
                        await self._stopping.wait()
        return delivery

    @staticmethod
    def _read_answer(delivery: Delivery, content: bytes) -> None:
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError:
            return
        data = answer.get("data") if isinstance(answer, dict) else None
        if isinstance(data, dict):
            delivery.duplicate = data.get("duplicate") is True
            delivery.quarantined = data.get("quarantined") is True
            server_id = data.get("id")
            delivery.server_id = server_id if isinstance(server_id, str) else None

    def _settle(self, job: _Job, delivery: Delivery) -> None:
        self.sent += 1
        if self.record:
            self.deliveries.append(delivery)
        if delivery.ok:
            if delivery.duplicate:
                self.duplicates += 1
            if delivery.quarantined:
                self.quarantined.setdefault(delivery.server_id or job.event_id, delivery)
            else:
                self.accepted.setdefault(job.event_id, delivery)
                if not job.redelivery:
                    self._redeliverable.append(job)
        elif delivery.status:
            self.rejected[delivery.status] += 1
        else:
            self.errors += 1
        self._pulse()
