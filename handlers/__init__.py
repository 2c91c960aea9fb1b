"""
Provider handlers: the pure edge of the listener (see :mod:`handlers.base`).

One module per provider (``handlers/<name>.py``, a module-level ``PROVIDER``), found
by name; :mod:`handlers.frames` is the stream frame vocabulary and
:mod:`handlers.polling` the poll vocabulary, shared by the providers of a transport.
"""

from handlers.base import (
    MAX_DEPTH,
    CloseKind,
    Event,
    NoSettings,
    Provider,
    Quarantine,
    StreamProvider,
    WebhookProvider,
    describe_errors,
    exact_numbers,
    load_provider,
    name_problems,
    published_models,
    too_deep,
)

__all__ = [
    "MAX_DEPTH",
    "CloseKind",
    "Event",
    "NoSettings",
    "Provider",
    "Quarantine",
    "StreamProvider",
    "WebhookProvider",
    "describe_errors",
    "exact_numbers",
    "load_provider",
    "name_problems",
    "published_models",
    "too_deep",
]
