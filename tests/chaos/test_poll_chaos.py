"""
Chaos rows for poll sources (issue 9): a provider's 429 storm, a 502 redeploy, a slow
provider, and SIGKILL in the middle of a poll. The ledger's acknowledged side is what
the listener journaled for the source; the checks add what a poll must keep: one event
per key and change (no new id for the same change), the budget held at the server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from listener.dev.simulators.terrapin import TerrapinSimulator, generate_isins
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.journal.queries import journal_outcomes
from tests.chaos.ledger import Ledger, ledger
from tests.conftest import make_config, running, wait_for
from tests.process import ListenerProcess
from tests.test_poll import bonds_source, poll_source, tt_source

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("cleanup_topology")]


def acknowledge_journal(book: Ledger, journal: Path, source: str) -> int:
    """Acknowledge every event the listener journaled for ``source``; return how many."""
    ids = [
        event
        for (src, event), (kind, _) in journal_outcomes(journal).items()
        if src == source and kind == "event"
    ]
    book.acknowledge(source, ids)
    return len(ids)


def tt_resources(projects: list[str]) -> list[dict[str, Any]]:
    return [
        {"endpoint": "project_metrics", "projects": [p], "metrics": ["fees"], "lookback": "2d"}
        for p in projects
    ]


async def wait_until_polled(source: Any, rows: int, service: Any, timeout: float = 60) -> int:
    """Wait until every resource of ``source`` polled well and the journal drained."""
    await wait_for(
        lambda: (
            all(r.state == "ok" for r in source.resources) and service.journal.pending_count == 0
        ),
        timeout=timeout,
        what="every resource polled and published",
    )
    return rows


@pytest.mark.timeout(120)
async def test_provider_429_storm(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """A 429 storm: the source pauses as told, never goes over budget, and every row arrives once."""
    projects = [f"p{i}" for i in range(20)]
    async with (
        ledger(
            broker_url, exchange_name, scenario="poll: provider 429 storm", run=chaos_run
        ) as book,
        TokenTerminalSimulator(projects=projects, chains=["ethereum"], rate_limit=(40, 2.0)) as sim,
    ):
        sim.force_429(seconds=3.0, retry_after=1)
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, resources=tt_resources(projects), rate_limit="20/1s")],
        )
        async with running(config) as service:
            source = poll_source(service, "tt")
            book.fault_cleared()
            await wait_until_polled(source, len(projects) * 3, service)
        journaled = acknowledge_journal(book, tmp_path / "journal.db", "tt")
        assert journaled == len(projects) * 3  # one event per row: no new id for a retry
        silences = sim.silence_after(429)
        book.note(
            requests=len(sim.ledger),
            answered_429=sim.statuses().count(429),
            min_silence_s=round(min(silences), 2),
        )
        assert min(silences) >= 1.0, silences
        assert sim.max_in_window(1.0) <= 20
        verdict = await book.check()
        assert verdict.extra == 0 and verdict.duplicates == 0, verdict


@pytest.mark.timeout(120)
async def test_provider_502_redeploy(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """502s while the provider redeploys are retried within the poll; every row arrives once."""
    async with (
        ledger(
            broker_url, exchange_name, scenario="poll: provider 502 redeploy", run=chaos_run
        ) as book,
        TerrapinSimulator(isins=generate_isins(300, seed=5), rate_limit=None) as sim,
    ):
        sim.fail_next(4, status=502)
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[
                bonds_source(
                    sim.url, generate_isins(300, seed=5), batch_size=50, rate_limit="600/1m"
                )
            ],
        )
        async with running(config) as service:
            source = poll_source(service, "bonds")
            book.fault_cleared()
            await wait_until_polled(source, 300, service)
            assert source.resources[0].state == "ok"
        assert acknowledge_journal(book, tmp_path / "journal.db", "bonds") == 300
        book.note(requests=len(sim.ledger), answered_502=sim.statuses().count(502))
        verdict = await book.check()
        assert verdict.extra == 0 and verdict.duplicates == 0, verdict


@pytest.mark.timeout(120)
async def test_slow_provider(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """A provider slower than the interval: one poll per resource at a time, nothing piles up or is lost."""
    projects = ["aave", "comp", "uni"]
    async with (
        ledger(broker_url, exchange_name, scenario="poll: slow provider", run=chaos_run) as book,
        TokenTerminalSimulator(projects=projects, chains=["ethereum"]) as sim,
    ):
        sim.delay(0.8)
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, resources=tt_resources(projects), interval="300ms")],
        )
        async with running(config) as service:
            await wait_for(lambda: len(sim.ledger) >= 12, timeout=30, what="several rounds")
            sim.delay(0)
            book.fault_cleared()
            await wait_until_polled(poll_source(service, "tt"), 9, service)
        assert acknowledge_journal(book, tmp_path / "journal.db", "tt") == 9
        assert max(sim.max_concurrent.values()) == 1
        book.note(requests=len(sim.ledger), max_concurrent=max(sim.max_concurrent.values()))
        verdict = await book.check()
        assert verdict.extra == 0, verdict


@pytest.mark.timeout(180)
async def test_sigkill_mid_poll(
    tmp_path: Path, broker_url: str, exchange_name: str, chaos_run: str
) -> None:
    """SIGKILL of a real listener in the middle of a poll, restart: nothing lost, no change published under a new id."""
    isins = generate_isins(2000, seed=11)
    async with (
        ledger(broker_url, exchange_name, scenario="poll: SIGKILL mid-poll", run=chaos_run) as book,
        TerrapinSimulator(isins=isins, rate_limit=None) as sim,
    ):
        sim.delay(0.15)
        config = {
            "broker": {"url": broker_url, "exchange": exchange_name},
            "journal": {"path": str(tmp_path / "journal.db")},
            "sources": [bonds_source(sim.url, isins, batch_size=50, rate_limit="6000/1m")],
        }
        listener = ListenerProcess(tmp_path, config)
        try:
            await listener.start()
            await wait_for(lambda: len(sim.ledger) >= 10, timeout=30, what="the poll under way")
            listener.kill()
            await listener.wait()
            killed_after = len(sim.ledger)
            sim.delay(0)
            await listener.start()
            started = time.monotonic()

            def done() -> bool:
                rows = journal_outcomes(tmp_path / "journal.db")
                events = [
                    k for k, (kind, status) in rows.items() if k[0] == "bonds" and kind == "event"
                ]
                return len(events) >= len(isins) and all(rows[k][1] for k in events)

            await wait_for(done, timeout=90, what="every ISIN journaled and published")
            book.fault_cleared()
            journaled = acknowledge_journal(book, tmp_path / "journal.db", "bonds")
            assert journaled == len(isins)  # one event per ISIN, across the kill and the restart
            book.note(
                requests_before_kill=killed_after,
                recover_poll_s=round(time.monotonic() - started, 2),
            )
            verdict = await book.check(timeout=60)
            assert verdict.extra == 0, verdict
        finally:
            await listener.stop()
            await asyncio.sleep(0)
