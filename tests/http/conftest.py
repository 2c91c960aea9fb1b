"""The HTTP tests run each test on asyncio's loop and on uvloop's, the daemon's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Their transports differ (uvloop's do not subclass asyncio's, set_protocol included)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
