"""
Logging, configured once: structlog with JSON off a terminal and a console renderer
on one; the stdlib loggers of aiohttp, aio-pika and websockets routed through the same
processors (``structlog.stdlib.ProcessorFormatter``); and a redaction processor, last
before rendering, that replaces every configured secret with ``***`` wherever it
appears, so no secret reaches output even inside an exception message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["Redactor", "configure_logging", "redact_also"]

REDACTED = "***"


class Redactor:
    """A structlog processor that masks secrets in every value, keys and nested data."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too (a reload's new secrets; the old ones stay masked)."""
        # Short strings would mask ordinary words; the config enforces real secrets anyway.
        known = {*self._secrets, *(s for s in secrets if len(s) >= 4)}
        self._secrets = sorted(known, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
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


_redactor: Redactor | None = None


def redact_also(secrets: Iterable[str]) -> None:
    """Add secrets to the running log redaction (SIGHUP brought new ones)."""
    if _redactor is not None:
        _redactor.add(secrets)


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
    global _redactor  # noqa: PLW0603 - one logging configuration per process
    redact = _redactor = Redactor(secrets)
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
            redact,
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
