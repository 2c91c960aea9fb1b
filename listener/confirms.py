"""
Publishing a bounded stream of messages with publisher confirms, the lean way.

The daemon's :class:`listener.publisher.Publisher` drains the journal forever and
retries; replay and quarantine redrive publish a finite set once and report. They
share its technique (NOTES: "where the time goes"): frames go straight to the aiormq
channel under an aio-pika confirm channel (``basic_publish(..., wait=False)``), with
up to ``size`` publishes awaiting their confirm at once, ``mandatory`` so an
unroutable message comes back instead of vanishing (the channel must be opened with
``on_return_raises=True``), and a deadline of our own around each confirm.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType

import aiormq
from pamqp.commands import Basic

from listener.exceptions import PublishError, PublishNacked, PublishTimeout

__all__ = ["ConfirmWindow"]


class ConfirmWindow:
    """
    Publishes with a window of unconfirmed messages; an async context manager.

    A returned (unroutable) message is counted in :attr:`returned` by routing key (its
    id in :attr:`returned_ids`) and is not an error. A nack, a missed deadline or a
    lost connection is: the next :meth:`publish` raises it, and leaving the block
    raises it if nothing else did. Leaving the block waits for every outstanding
    confirm.
    """

    def __init__(self, channel: aiormq.Channel, *, size: int, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._slots = asyncio.Semaphore(size)
        self._size = size
        self._tasks = asyncio.TaskGroup()
        self._by_id: dict[str, asyncio.Task[None]] = {}
        self._failure: PublishError | None = None
        self.confirmed = 0
        self.returned: Counter[str] = Counter()
        self.returned_ids: list[str] = []

    async def __aenter__(self) -> ConfirmWindow:
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._tasks.__aexit__(exc_type, exc, tb)
        if exc is None and self._failure is not None:
            raise self._failure

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties
    ) -> None:
        """
        Send one message once a slot in the window is free (the confirm is awaited later).

        Raises:
            PublishError: an earlier publish failed; stop publishing.
        """
        if self._failure is not None:
            raise self._failure
        await self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        message_id = properties.message_id or ""
        previous = self._by_id.get(message_id)
        if previous is not None and not previous.done():
            # Never two publishes with one message_id in flight on a channel (NOTES:
            # a reported aio-pika hang matches returns and confirms through it).
            await asyncio.wait({previous})
        task = self._tasks.create_task(self._send(body, exchange, routing_key, properties))
        if message_id:
            self._by_id[message_id] = task
            if len(self._by_id) > 2 * self._size:
                self._by_id = {k: t for k, t in self._by_id.items() if not t.done()}

    async def _send(
        self, body: bytes, exchange: str, routing_key: str, properties: Basic.Properties
    ) -> None:
        message_id = properties.message_id or ""
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    wait=False,
                )
            if not isinstance(result, Basic.Ack):
                raise PublishNacked(f"broker answered {result!r}", message_id=message_id)
        except aiormq.exceptions.PublishError:
            self.returned[routing_key] += 1
            self.returned_ids.append(message_id)
        except TimeoutError:
            self._fail(PublishTimeout(f"no confirm within {self._timeout}s", message_id=message_id))
        except aiormq.exceptions.DeliveryError as exc:
            self._fail(PublishNacked(f"nacked: {exc}", message_id=message_id))
        except PublishError as exc:
            self._fail(exc)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            self._fail(
                PublishError(
                    f"broker connection failed: {type(exc).__name__}: {exc}",
                    message_id=message_id,
                )
            )
        else:
            self.confirmed += 1
        finally:
            self._slots.release()

    def _fail(self, exc: PublishError) -> None:
        if self._failure is None:
            self._failure = exc
