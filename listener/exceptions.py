"""
The listener's exceptions. One root, a shallow tree::

    ListenerError
    ├── ConfigError            the configuration cannot be used (exit 2)
    ├── JournalError           the local journal cannot take or give events
    │   ├── JournalFull        over journal.max_size / max_pending: shed load (503)
    │   ├── JournalCorrupt     the file is not a database it can read (exit 2)
    │   └── JournalLocked      another listener holds the journal (exit 2)
    ├── BrokerError            RabbitMQ cannot be used
    │   └── BrokerUnreachable  no connection (down, refused, wrong URL)
    ├── PublishError           the broker did not confirm a message
    │   ├── PublishReturned    unroutable: returned by the broker (mandatory)
    │   ├── PublishNacked      the broker refused it (nack)
    │   └── PublishTimeout     no confirm within broker.publish_timeout
    ├── SignatureError         a webhook failed verification (401)
    │   └── TimestampOutOfRange
    └── ReplayError            a replay could not run or stopped
        └── ReplayArgumentError    a replay argument is wrong (exit 2 / HTTP 400)

Each error keeps its context in attributes and says what to do in its message.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "ConfigError",
    "JournalCorrupt",
    "JournalError",
    "JournalFull",
    "JournalLocked",
    "ListenerError",
    "PublishError",
    "PublishNacked",
    "PublishReturned",
    "PublishTimeout",
    "ReplayArgumentError",
    "ReplayError",
    "SignatureError",
    "TimestampOutOfRange",
]


class ListenerError(Exception):
    """Root of every error the listener raises on purpose."""


class ConfigError(ListenerError):
    """
    The configuration is invalid. ``problems`` holds one line per problem, each
    naming the key path (``sources[1].api_key``) or the missing variable.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class JournalError(ListenerError):
    """The journal failed; the event was not accepted."""


class JournalFull(JournalError):
    """The journal is over its limit; retry after ``retry_after`` seconds."""

    def __init__(self, *, retry_after: int, reason: str) -> None:
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(f"journal over its limit ({reason}); retry after {retry_after}s")


class JournalCorrupt(JournalError):
    """The journal file cannot be read as a database; ``path`` names it."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"the journal {path} is not a readable database ({detail}); move it aside"
            " (keep it for inspection) and start again with an empty journal"
        )


class JournalLocked(JournalError):
    """Another listener process runs on this journal; ``holder`` says which."""

    def __init__(self, path: object, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"the journal {path} is in use by another listener ({holder}); stop that one"
            " first, or give this one its own journal.path"
        )


class BrokerError(ListenerError):
    """RabbitMQ cannot be used right now."""


class BrokerUnreachable(BrokerError):
    """No connection to the broker at ``url`` (masked); ``detail`` says why."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(
            f"cannot reach the broker at {url} ({detail}); check broker.url and that RabbitMQ is up"
        )


class PublishError(ListenerError):
    """The broker did not confirm a message; it stays in the journal and is retried."""

    def __init__(self, message: str, *, message_id: str) -> None:
        self.message_id = message_id
        super().__init__(message)


class PublishReturned(PublishError):
    """The broker returned the message as unroutable: check the exchange's bindings."""


class PublishNacked(PublishError):
    """The broker nacked the message (a queue refused it or an internal error)."""


class PublishTimeout(PublishError):
    """No confirm arrived within the deadline (broker blocked, slow or unreachable)."""


class SignatureError(ListenerError):
    """A webhook signature did not verify. ``code`` is the contract's error code."""

    code = "INVALID_SIGNATURE"


class TimestampOutOfRange(SignatureError):
    """The webhook timestamp is outside the configured tolerance."""

    code = "TIMESTAMP_OUT_OF_RANGE"


class ReplayError(ListenerError):
    """A replay could not run or stopped; ``str()`` says why and what to do."""


class ReplayArgumentError(ReplayError):
    """
    A replay argument is wrong. ``field`` is its API name (``since``, ``to_queue``);
    :attr:`option` the command-line spelling (``--since``, ``--to-queue``).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    @property
    def option(self) -> str:
        """The command-line option this argument is given with."""
        return "--" + self.field.replace("_", "-")
