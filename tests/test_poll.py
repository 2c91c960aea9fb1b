"""
Poll sources end to end (CONTRACT §9): the real service against the Token Terminal and
Terrapin simulators and a real broker.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from listener.dev.simulators.terrapin import TerrapinSimulator, generate_isins
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.journal import Journal
from listener.journal.writes import PollWrite
from listener.sources.poll import PollSource
from listener.sources.poll_budget import PAUSE_CAP, Budget
from tests.conftest import make_config, running, tap, wait_for

pytestmark = pytest.mark.usefixtures("cleanup_topology")

API_KEY = "test-key"


def tt_source(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "tt",
        "kind": "poll",
        "provider": "tokenterminal",
        "url": url,
        "api_key": API_KEY,
        "interval": extra.pop("interval", "1h"),
        "rate_limit": extra.pop("rate_limit", "600/1m"),
        "resources": extra.pop(
            "resources",
            [
                {
                    "endpoint": "project_metrics",
                    "projects": ["aave"],
                    "metrics": ["fees", "revenue"],
                    "lookback": "3d",
                }
            ],
        ),
        **extra,
    }


def bonds_source(url: str, isins: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "bonds",
        "kind": "poll",
        "provider": "terrapin",
        "url": url,
        "api_key": API_KEY,
        "interval": extra.pop("interval", "1h"),
        "rate_limit": extra.pop("rate_limit", "90/1m"),
        "resources": [
            {
                "endpoint": "bond_reference",
                "isins": isins,
                "batch_size": extra.pop("batch_size", 1000),
            }
        ],
        **extra,
    }


def poll_source(service: Any, name: str) -> PollSource:
    runtime = next(r for r in service.runtimes if r.name == name)
    assert isinstance(runtime, PollSource)
    return runtime


async def poll_once(service: Any, name: str) -> None:
    """Poll a source now and wait until every resource finished that poll."""
    source = poll_source(service, name)
    before = [r.last_poll or 0.0 for r in source.resources]
    started = time.time()
    source.poll_now()

    def finished(resource: Any, polled_before: float) -> bool:
        # A new poll started, and it either succeeded or ended in a state of its own.
        ended = (resource.last_success or 0) >= started or resource.state not in {"ok", "pending"}
        return (resource.last_poll or 0) > polled_before and ended

    await wait_for(
        lambda: all(finished(r, b) for r, b in zip(source.resources, before, strict=True)),
        timeout=20,
        what=f"a poll of {name}",
    )


def events(messages: list[Any], type_: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.body) for m in messages if m.routing_key == type_]


async def test_token_terminal_changes_by_content(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """First sight, re-poll (nothing), restated past day (one event with previous), change and back, exact decimals."""
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        async with tap(broker_url, exchange_name) as t, running(config) as service:
            await t.wait_count(4)  # 3 days of lookback + today, one chain
            first = events(t.messages, "tokenterminal.project.metrics")
            assert len(first) == 4 and all(e["data"]["previous"] is None for e in first)
            row = first[0]["data"]["row"]
            assert row["fees"] == sim.value("aave", row["timestamp"][:10], "ethereum", "fees")
            await poll_once(service, "tt")
            await poll_once(service, "tt")
            assert len(t.messages) == 4  # nothing new
            past = (datetime.now(UTC).date() - timedelta(days=2)).isoformat()
            old_fees = sim.value("aave", past, "ethereum", "fees")
            sim.restate("aave", past, "fees", "1234.50", chain="ethereum")
            await poll_once(service, "tt")
            await t.wait_count(5)
            restated = t.messages[-1]
            body = orjson.loads(restated.body)
            assert body["data"]["row"]["fees"] == "1234.50"  # the provider's exact digits
            assert body["data"]["changed"] == ["fees"]
            assert body["data"]["previous"] == {"fees": old_fees}
            sim.restate("aave", past, "fees", old_fees, chain="ethereum")
            await poll_once(service, "tt")
            await t.wait_count(6)
            ids = [m.message_id for m in t.messages]
            assert len(set(ids)) == 6  # first sight, change, change back: all distinct
            assert Decimal(orjson.loads(t.messages[-1].body)["data"]["row"]["fees"]) == Decimal(
                old_fees
            )



async def test_a_value_flipping_back_and_forth_is_every_time_an_event(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    A→B→A→B→A: the fourth change had the id of the second (previous and new hash
    alike), so the journal took it for a duplicate and dropped it, and every later flip:
    consumers kept the old value. Polling again is still nothing new, across a restart.
    """
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        past = (datetime.now(UTC).date() - timedelta(days=2)).isoformat()
        async with tap(broker_url, exchange_name) as t:
            async with running(config) as service:
                await t.wait_count(4)
                for i, fees in enumerate(("1.5", "2.5", "1.5", "2.5", "1.5")):
                    sim.restate("aave", past, "fees", fees, chain="ethereum")
                    await poll_once(service, "tt")
                    await t.wait_count(5 + i)
                await poll_once(service, "tt")
            async with running(config) as service:
                await poll_once(service, "tt")
            await asyncio.sleep(0.3)
        flips = [orjson.loads(m.body)["data"] for m in t.messages[4:]]
        assert [f["row"]["fees"] for f in flips] == ["1.5", "2.5", "1.5", "2.5", "1.5"]
        assert [f["previous"] for f in flips][1:] == [{"fees": "1.5"}, {"fees": "2.5"}] * 2
        assert len({m.message_id for m in t.messages}) == len(t.messages) == 9


async def test_token_terminal_rename_is_one_event(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A 308 rename gives one renamed event, the new id is polled from then on, no duplicate rows."""
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        async with tap(broker_url, exchange_name) as t, running(config) as service:
            await t.wait_count(4)
            sim.rename("aave", "aave-v3")
            await poll_once(service, "tt")
            await t.wait_count(5)
            renamed = events(t.messages, "tokenterminal.project.renamed")
            assert [e["data"] for e in renamed] == [
                {"old_project_id": "aave", "new_project_id": "aave-v3"}
            ]
            assert len(events(t.messages, "tokenterminal.project.metrics")) == 4
            hits = len(sim.ledger)
            await poll_once(service, "tt")
            assert all("/aave-v3/" in h.target for h in sim.ledger[hits:])
            assert len(t.messages) == 5
        async with running(config) as service:  # the alias survives a restart
            hits = len(sim.ledger)
            await poll_once(service, "tt")
            assert all("/aave-v3/" in h.target for h in sim.ledger[hits:])


async def test_terrapin_batches_changes_and_bad_isins(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Batches of batch_size; a changed record is one event with previous; a 422 ISIN is quarantined, the rest go on."""
    isins = generate_isins(25, seed=3)
    async with TerrapinSimulator(isins=isins[:20], rate_limit=None) as sim:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[bonds_source(sim.url, isins, batch_size=10)],
        )
        async with tap(broker_url, exchange_name) as t, running(config) as service:
            await t.wait_count(20)  # 5 ISINs unknown to the provider: absent, no event
            source = poll_source(service, "bonds")
            await wait_for(lambda: source.resources[0].state == "ok", what="the first poll")
            assert len(sim.ledger) == 3  # 25 ISINs in batches of 10
            changed = sim.change_fraction(0.1, seed=1)
            await poll_once(service, "bonds")
            await t.wait_count(20 + len(changed))
            latest = [orjson.loads(m.body)["data"] for m in t.messages[20:]]
            assert {d["record"]["isin"] for d in latest} == set(changed)
            assert all(d["previous"] and d["changed"] for d in latest)


async def test_rate_limit_holds_with_many_resources(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """30+ resources, retries and a redirect: never over rate_limit in any window; a 429's Retry-After is honoured."""
    projects = [f"p{i}" for i in range(32)]
    async with TokenTerminalSimulator(projects=projects, chains=["ethereum"]) as sim:
        sim.rename("p3", "p3-new")
        sim.fail_next(2, status=502)
        resources = [
            {"endpoint": "project_metrics", "projects": [p], "metrics": ["fees"], "lookback": "1d"}
            for p in projects
        ]
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, resources=resources, rate_limit="10/1s")],
        )
        async with running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(
                lambda: all(r.state == "ok" for r in source.resources),
                timeout=30,
                what="every resource polled",
            )
            sim.force_429(1, retry_after=2)
            source.poll_now()
            await wait_for(
                lambda: len(sim.ledger) >= 32 + 2 + 1 + 32 + 1, timeout=30, what="a second round"
            )
        assert sim.max_in_window(1.0) <= 10
        silences = sim.silence_after(429)
        assert silences and min(silences) >= 2.0, silences


async def test_refusals_and_garbage(tmp_path: Path, broker_url: str, exchange_name: str) -> None:
    """Bad key → unauthorized; 402 → subscription_invalid; 403 one resource forbidden, others go on; garbage quarantined."""
    async with TokenTerminalSimulator(projects=["aave", "comp"], chains=["ethereum"]) as sim:
        resources = [
            {"endpoint": "project_metrics", "projects": [p], "metrics": ["fees"], "lookback": "1d"}
            for p in ("aave", "comp")
        ]
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, resources=resources)],
        )
        async with tap(broker_url, f"{exchange_name}.quarantine") as q, running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(
                lambda: all(r.state == "ok" for r in source.resources), what="first polls"
            )
            sim.forbid("comp")
            await poll_once(service, "tt")
            assert [r.state for r in source.resources] == ["ok", "forbidden"]
            sim.garbage_next(1)
            source.resources[0].wake.set()
            await q.wait_count(1)
            assert q.messages[0].headers["x-quarantine-reason"] == "invalid_json"
            sim.subscription_invalid(True)
            source.poll_now()
            await wait_for(lambda: source.status == "subscription_invalid", what="402")
            sim.subscription_invalid(False)
            sim.api_keys.clear()
            source.poll_now()
            await wait_for(lambda: source.status == "unauthorized", what="401")
            assert service.admin is not None
            ready, _ = service.admin.readiness()
            assert not ready


async def test_slow_server_does_not_pile_up(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A server slower than the interval: one poll of a resource at a time, never a pile-up."""
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"]) as sim:
        sim.delay(0.6)
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, interval="200ms")],
        )
        async with running(config):
            await wait_for(lambda: len(sim.ledger) >= 4, timeout=20, what="several polls")
        assert sim.max_concurrent.get("/v2/projects/aave/metrics", 0) == 1


async def test_poll_now_endpoint(tmp_path: Path, broker_url: str, exchange_name: str) -> None:
    """POST /v1/sources/{name}/poll answers 202 and polls now; 404 for no source, 409 for another kind."""
    key = "adm_" + "k" * 32
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"]) as sim:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url)],
            admin={"api_keys": [{"key": key, "scopes": ["read", "write"]}]},
        )
        async with running(config) as service, aiohttp.ClientSession() as session:
            await wait_for(lambda: len(sim.ledger) >= 1, what="first poll")
            base = f"http://127.0.0.1:{service.admin_port}"
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"{base}/v1/sources/tt/poll", headers=headers) as response:
                assert response.status == 202
            await wait_for(lambda: len(sim.ledger) >= 2, what="polled now")
            async with session.post(f"{base}/v1/sources/nope/poll", headers=headers) as response:
                assert response.status == 404
            async with session.get(f"{base}/v1/sources", headers=headers) as response:
                (tt,) = (await response.json())["data"]
                assert tt["kind"] == "poll" and tt["resources"][0]["state"] == "ok"
                assert tt["budget"]["limit"] == 600


@pytest.mark.parametrize(
    ("headers", "remaining"),
    [
        ({"Retry-After": "²"}, None),
        ({"Retry-After": "1²"}, None),
        ({"X-RateLimit-Remaining": "²", "X-RateLimit-Reset": "30"}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "³"}, 0),
        ({"RateLimit": "limit=100, remaining=٣, reset=²"}, None),
        ({"RateLimit": f"limit=100, remaining={'9' * 400}, reset=5"}, None),  # an infinity
        ({"X-RateLimit-Remaining": "9" * 5000, "X-RateLimit-Reset": "30"}, None),  # int() refuses
        ({"Retry-After": "9" * 400}, None),
    ],
)
def test_rate_headers_that_are_not_numbers_are_ignored(
    headers: dict[str, str], remaining: int | None
) -> None:
    """
    A header ``str.isdigit()`` takes but ``float()`` refuses ("²") raised ValueError out
    of the poll loop: the source ended and was restarted, polling everything again.
    Such a header now says nothing: a 429 without a usable one backs off (0.5-1 s first,
    with up to 10% more).
    """
    budget = Budget(10, 60.0)
    budget.observe(200, headers)
    assert budget.provider_remaining == remaining
    assert budget.paused_for == 0.0  # (a remaining of 0 without a reset pauses nothing)
    budget.observe(429, headers)
    assert 0.45 <= budget.paused_for <= 1.1


@pytest.mark.parametrize(("asked", "low"), [("120", 120.0), ("3600", PAUSE_CAP)])
def test_a_429_pauses_as_asked_up_to_the_cap(asked: str, low: float) -> None:
    """Retry-After is honoured (plus up to 10% jitter), 15 minutes at most at a time."""
    budget = Budget(10, 60.0)
    budget.observe(429, {"Retry-After": asked})
    assert low - 0.1 <= budget.paused_for <= low * 1.1


async def test_state_no_poll_asks_for_any_more_is_forgotten(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    Token Terminal rows are keyed by day: a day past the lookback is asked for no more,
    and its state is forgotten after a poll (lookback + 2 days after its last change).
    The state used to grow every day, and with it each cluster checkpoint.
    """
    old = "aave|2020-01-01|ethereum"
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        async with Journal(config=config.journal) as journal:  # what an earlier run left
            write = PollWrite("tt", states=[(old, "h", b"{}", 0)])
            await journal.append([], poll=write)
        with sqlite3.connect(config.journal.path) as conn:  # last changed 5 days ago
            conn.execute("UPDATE poll_state SET updated_at = ?", (time.time() - 5 * 86400,))
        async with tap(broker_url, exchange_name) as t, running(config) as service:
            await t.wait_count(4)  # 3 days of lookback + today
            await poll_once(service, "tt")
            assert service.journal is not None
            kept = await service.journal.poll_states("tt", [old])
            current = await service.journal.query("SELECT count(*) FROM poll_state")
        assert kept == {}
        assert current == [(4,)]


async def test_a_restart_keeps_the_interval_between_two_polls(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    `interval` runs between the starts of two polls of a resource, across a restart:
    the restarted daemon polls an hour after the last poll's start, not at once (every
    restart, deploy or failover used to poll everything again, with an empty budget).
    """
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[tt_source(sim.url)]
        )
        async with running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(lambda: source.resources[0].state == "ok", what="the first poll")
            first = source.resources[0].last_poll
        asked = len(sim.ledger)
        async with running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(lambda: source.status == "polling", what="running")
            await asyncio.sleep(0.5)
            assert len(sim.ledger) == asked  # nothing asked at the start
            resource = source.resources[0]
            assert first is not None and resource.last_poll == pytest.approx(first)
            assert 0.9 * 3600 <= resource.next_poll - first <= 1.1 * 3600
            await poll_once(service, "tt")  # and a poll now is still a poll now
            assert len(sim.ledger) > asked


def test_429s_in_a_row_with_an_honest_retry_after_wait_what_it_says() -> None:
    budget = Budget(90, 60.0)
    for _ in range(6):
        budget.observe(429, {"Retry-After": "5"})
        assert 4.9 <= budget.paused_for <= 5.6
        budget._paused_until = 0.0


def test_429s_in_a_row_back_off_whatever_retry_after_says() -> None:
    """`Retry-After: 0` on every answer had the source spend its whole budget on 429s."""
    budget = Budget(90, 60.0)
    pauses = []
    for _ in range(8):
        budget.observe(429, {"Retry-After": "0"})
        pauses.append(budget.paused_for)
        budget._paused_until = 0.0  # (as if the pause were over)
    assert 0.45 <= pauses[0] <= 1.1
    assert pauses[-1] >= 60  # 1 s doubling: 64 s by the eighth, jittered
    budget.observe(200, {})
    budget.observe(429, {"Retry-After": "0"})
    assert budget.paused_for <= 1.1  # an answer that is no 429 starts it again


async def test_a_clock_stepped_back_does_not_hold_the_next_poll_back(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The wall clock stepping back two hours (NTP, a VM resumed) while the daemon was down,
    or while a poll was answered, held the next poll back two hours past its interval.
    """
    async with TokenTerminalSimulator(projects=["aave"], chains=["ethereum"], null_share=0) as sim:
        config = make_config(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[tt_source(sim.url, interval="20s")],
        )
        async with running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(lambda: source.resources[0].state == "ok", what="the first poll")
        with sqlite3.connect(tmp_path / "journal.db") as db:  # (polled "two hours from now")
            db.execute("UPDATE poll_resources SET polled_at = polled_at + 7200")
        db.close()
        stepped = [0.0]
        clock = type("Clock", (), {"time": staticmethod(lambda: time.time() + stepped[0])})
        clock.monotonic = staticmethod(time.monotonic)  # type: ignore[attr-defined]  # (a shim)
        monkeypatch.setattr("listener.sources.poll.time", clock)
        async with running(config) as service:
            source = poll_source(service, "tt")
            await wait_for(lambda: source.status == "polling", what="running")
            resource = source.resources[0]
            assert resource.next_poll - time.time() <= 1.1 * 20
            sim.delay(1.0)
            resource.next_poll = 0.0
            resource.wake.set()
            await wait_for(lambda: (resource.last_poll or 0) > time.time() - 5, what="a poll")
            stepped[0] = -7200.0  # while it is answered
            await wait_for(lambda: resource.next_poll > 0, what="the next poll set")
            due_in = resource.next_poll - clock.time()  # type: ignore[attr-defined]  # (a shim)
            assert 0 < due_in <= 1.1 * 20


def test_a_reset_time_is_read_against_the_providers_clock() -> None:
    """
    `X-RateLimit-Reset` is a Unix time on the provider's clock: read against a local
    clock two hours behind it, a reset 30 s away paused the source 15 minutes (the cap).
    """
    provider_now = time.time() + 7200
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(provider_now) + 30)}
    budget = Budget(90, 60.0)
    budget.observe(200, {**headers, "Date": formatdate(provider_now, usegmt=True)})
    assert 28 <= budget.paused_for <= 34  # (+ up to 10% jitter)
    undated = Budget(90, 60.0)
    undated.observe(200, headers)  # (no Date: the local clock is all there is)
    assert undated.paused_for >= PAUSE_CAP - 1


async def test_a_bad_row_is_quarantined_beside_the_good_ones_published(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    One bad row quarantined the whole answer, poll after poll: the good rows beside it
    were never published. Now they are, and the bad rows are kept once, with why.
    """
    today = datetime.now(UTC).date().isoformat()
    good = {"timestamp": f"{today}T00:00:00.000Z", "project_id": "aave", "chain": "ethereum"}
    rows = [{**good, "fees": 1.5}, {**good, "chain": None, "fees": 2}]

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response({"data": rows})

    app = web.Application()
    app.router.add_get("/v2/projects/{project}/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started
    resources = [{"endpoint": "project_metrics", "projects": ["aave"], "metrics": ["fees"]}]
    config = make_config(
        tmp_path,
        broker_url=broker_url,
        exchange=exchange_name,
        sources=[tt_source(f"http://127.0.0.1:{port}", resources=resources)],
    )
    try:
        async with (
            tap(broker_url, exchange_name) as t,
            tap(broker_url, f"{exchange_name}.quarantine") as q,
            running(config) as service,
        ):
            await t.wait_count(1)
            await q.wait_count(1)
            await poll_once(service, "tt")
            await asyncio.sleep(0.3)
            assert poll_source(service, "tt").resources[0].state == "ok"
    finally:
        await runner.cleanup()
    (event,) = events(t.messages, "tokenterminal.project.metrics")
    assert event["data"]["row"]["fees"] == "1.5"
    (kept,) = q.messages  # (once: the same rows again are the same quarantine entry)
    assert kept.headers["x-quarantine-reason"] == "schema_violation"
    assert "data[1].chain" in str(kept.headers["x-quarantine-detail"])
    assert orjson.loads(kept.body) == [{**good, "chain": None, "fees": "2"}]  # (exact digits)
