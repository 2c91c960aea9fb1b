"""Fixtures of the chaos kit: one run id per session, and the broker put back afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.chaos import rabbit


@pytest.fixture(scope="session")
def chaos_run() -> Iterator[str]:
    """The id of this run: every row it records carries it, the report shows the last run."""
    yield time.strftime("%Y-%m-%dT%H:%M:%S")
    # Safety net: whatever a crashed scenario left behind (a stopped app, an alarm).
    asyncio.run(rabbit.restore())
