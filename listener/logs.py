"""
Logging, configured once: structlog with JSON off a terminal and a console renderer
on one; the stdlib loggers of aiohttp, aio-pika and websockets routed through the same
processors (``structlog.stdlib.ProcessorFormatter``); and a redaction processor, last
before rendering, that replaces every configured secret with ``***`` wherever it
appears, so no secret reaches output even inside an exception message.

The sources' secrets (what a provider could send back: API keys, webhook secrets) are
also masked by :func:`redact` and :func:`redact_bytes` in text a provider sends that the
daemon keeps or shows elsewhere (an error frame's message on ``/v1/sources``, a
quarantined payload and its detail in the journal and on the broker), before it is
cut to length: a secret cut in two is no longer one the log processor finds.
"""

from __future__ import annotations

import logging
import sys
import urllib.parse
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["Redactor", "configure_logging", "redact", "redact_also", "redact_bytes"]

REDACTED = "***"
# A secret's first characters, this many or more, are masked where text was cut inside
# it (a message cut to length after the secret began): fewer could be ordinary text.
PARTIAL = 12


class Redactor:
    """A structlog processor that masks secrets in every value, nested ones included."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets masked, longest first."""
        return tuple(self._secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too (a reload's new secrets; the old ones stay masked)."""
        # Short strings would mask ordinary words; the config enforces real secrets anyway.
        known = {*self._secrets, *(s for s in secrets if len(s) >= 4)}
        self._secrets = sorted(known, key=len, reverse=True)

    def text(self, value: str) -> str:
        """``value`` with every secret in it masked, and the head of one cut short."""
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
            if len(secret) > PARTIAL and "://" not in secret:  # (a URL's head is no secret)
                value = _mask_heads(value, secret)
        return value

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return self._clean(value.decode("utf-8", "replace"))
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self._clean(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        if not self._secrets:
            return event_dict
        return {k: self._clean(v) for k, v in event_dict.items()}


def _mask_heads(value: str, secret: str) -> str:
    """``value`` with each run of ``secret``'s first characters (:data:`PARTIAL` or more) masked."""
    head = secret[:PARTIAL]
    start = value.find(head)
    while start >= 0:
        end = start + PARTIAL
        while end < len(value) and end - start < len(secret) and value[end] == secret[end - start]:
            end += 1
        value = value[:start] + REDACTED + value[end:]
        start = value.find(head, start + len(REDACTED))
    return value


# The process's secrets (the configuration's, and those SIGHUP brought since), and of
# them the sources' (what a provider could echo back: masked in its text too).
_redactor = Redactor(())
_echoes = Redactor(())
# Shorter source secrets are not looked for in provider text: a common short string
# masked in a payload would change the payload.
ECHO_MIN = 8


def redact_also(secrets: Iterable[str], *, sources: Iterable[str] = ()) -> None:
    """Add secrets to the redaction (a configuration's; SIGHUP brought new ones)."""
    _redactor.add(secrets)
    _echoes.add(s for s in sources if len(s) >= ECHO_MIN)


def redact(text: str) -> str:
    """Provider text (kept or shown) with every source secret in it masked."""
    return _echoes.text(text)


def redact_bytes(data: bytes) -> bytes:
    """
    A payload with every source secret in it masked: as UTF-8, escaped as JSON writes
    ``/`` (``\\/``) and percent-encoded.
    """
    for secret in _echoes.secrets:
        for form in {secret, secret.replace("/", "\\/"), urllib.parse.quote(secret, safe="")}:
            encoded = form.encode()
            if encoded in data:
                data = data.replace(encoded, REDACTED.encode())
    return data


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "json",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger once, for the whole process."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    _redactor.add(secrets)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redactor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries are chatty at debug; keep their warnings and errors.
    for name in ("aio_pika", "aiormq", "websockets", "aiohttp.access"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
