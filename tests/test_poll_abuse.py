"""
A hostile or broken REST provider cannot make a poll source hold gigabytes, stall the
loop or fill the journal: an answer of millions of values is refused before it is
parsed, a bad answer names a few problems (not one string per row), and what is kept
in quarantine of an answer is its first MiB.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from handlers import Quarantine
from handlers.polling import MAX_VALUES, PollRequest, read_answer
from handlers.tokenterminal import PROVIDER as TT
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.journal import Journal
from listener.sources import poll_changes
from listener.sources.poll_changes import QUARANTINE_KEEP
from tests.conftest import make_config, running, tap
from tests.test_poll import poll_once, tt_source


def test_an_answer_of_millions_of_values_is_not_parsed() -> None:
    """`{"data":[1,1,1,...]}` under the read limit took 2 GB and a 7 s stall to parse."""
    body = b'{"data":[' + b"1," * MAX_VALUES + b"1]}"
    verdict = read_answer(body)
    assert isinstance(verdict, Quarantine) and verdict.reason == "schema_violation"
    assert f"more than {MAX_VALUES} values" in verdict.detail
    assert not isinstance(read_answer(b'{"data":[' + b"1," * 1000 + b"1]}"), Quarantine)


def test_a_bad_answer_names_five_problems_and_counts_the_rest() -> None:
    request = PollRequest(method="GET", target="/v2/projects/aave/metrics", items=("aave",))
    body = orjson.dumps({"data": [{"timestamp": "nope"} for _ in range(10_000)]})
    verdict = TT.parse(request, body)
    assert isinstance(verdict, Quarantine) and verdict.reason == "schema_violation"
    assert verdict.detail.count("data[") == 5
    assert verdict.detail.endswith(" more")


@contextlib.asynccontextmanager
async def answering(body: bytes) -> AsyncIterator[str]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.usefixtures("cleanup_topology")
async def test_a_quarantined_answer_keeps_its_first_mib(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Whole answers (up to 64 MiB each, every poll) went into the journal all sources
    share. And an answer this large is parsed off the event loop's thread: parsing held
    the loop ~160 µs a KiB (170 ms for 10,000 rows), every webhook waiting meanwhile.
    """
    threads: list[str] = []
    parse = type(TT).parse

    def recorded(self: Any, request: PollRequest, body: bytes) -> Any:
        threads.append(threading.current_thread().name)
        return parse(self, request, body)

    monkeypatch.setattr(type(TT), "parse", recorded)
    junk = b"<html>" + b"x" * (3 * QUARANTINE_KEEP)
    async with (
        answering(junk) as url,
        tap(broker_url, f"{exchange_name}.quarantine") as q,
    ):
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(url)],
        )
        async with running(config) as service:
            await poll_once(service, "tt")
            await q.wait_count(1)
    (message,) = q.messages
    assert message.headers["x-quarantine-reason"] == "invalid_json"
    assert len(message.body) == QUARANTINE_KEEP and junk.startswith(message.body)
    assert threads and threading.main_thread().name not in threads
    detail = message.headers["x-quarantine-detail"]
    assert isinstance(detail, str) and f"the first {QUARANTINE_KEEP} of {len(junk)}" in detail


@pytest.mark.usefixtures("cleanup_topology")
async def test_a_large_answer_is_written_a_chunk_at_a_time(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    300,000 valid rows went into one transaction, and every other source's appends
    waited behind it for seconds. Here 3 records a transaction: 12 records, 4 of them,
    each change written with its state, and nothing again at the next poll.
    """
    monkeypatch.setattr(poll_changes, "CHUNK", 3)
    writes: list[int] = []
    append = Journal.append

    async def counted(self: Journal, entries: Any, **kwargs: Any) -> list[bool]:
        poll = kwargs.get("poll")
        if poll is not None and poll.states:  # (not the poll's own end mark)
            writes.append(len(poll.states))
        return await append(self, entries, **kwargs)

    monkeypatch.setattr(Journal, "append", counted)
    chains = ["ethereum", "arbitrum", "base"]
    async with TokenTerminalSimulator(projects=["aave"], chains=chains, null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        async with tap(broker_url, exchange_name) as t, running(config) as service:
            await t.wait_count(12)  # 3 days of lookback + today, three chains
            assert writes == [3, 3, 3, 3]
            await poll_once(service, "tt")
            assert len(t.messages) == 12 and len({m.message_id for m in t.messages}) == 12
