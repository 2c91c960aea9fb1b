"""
Tests for listener/dev/simulators/tokenterminal.py: a real aiohttp client on 127.0.0.1
against the simulator, read back through handlers/tokenterminal.py (CONTRACT §9).
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import pytest

from handlers import Quarantine
from handlers.polling import Page, PollRequest, Record
from handlers.tokenterminal import PROVIDER, metrics_target
from listener.dev.simulators.rest import Hit
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from tests.conftest import UNIT, Answer

KEY = "k-test"
TODAY = date(2026, 11, 24)
START = TODAY - timedelta(days=6)
METRICS = ("fees", "revenue")


@pytest.fixture
async def sim() -> AsyncIterator[TokenTerminalSimulator]:
    """Two projects on two chains, a fixed today, no rate limit."""
    async with TokenTerminalSimulator(
        api_keys={KEY},
        projects={"aave": "Aave", "uniswap": "Uniswap"},
        metrics=(*METRICS, "tvl"),
        chains=("ethereum", "arbitrum"),
        today=TODAY,
    ) as simulator:
        yield simulator


def target(project: str = "aave", metrics: tuple[str, ...] = METRICS, start: date = START) -> str:
    return metrics_target(project, metrics, start)


async def get(
    client: aiohttp.ClientSession,
    sim: TokenTerminalSimulator,
    path: str | None = None,
    *,
    key: str | None = KEY,
    method: str = "GET",
) -> Answer:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    url = sim.url + (path or target())
    async with client.request(method, url, headers=headers, allow_redirects=False) as response:
        return Answer(response.status, response.headers, await response.read())


def records(answer: Answer, project: str = "aave", path: str | None = None) -> dict[str, Record]:
    request = PollRequest("GET", path or target(project), (project,))
    page = PROVIDER.parse(request, answer.body)
    assert isinstance(page, Page), page
    return {record.key: record for record in page.records}


# --- answers ----------------------------------------------------------------------------


async def test_one_row_per_day_and_chain(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """start..today inclusive, every chain: 7 days x 2 chains rows, in day then chain order."""
    answer = await get(client, sim)
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    rows = answer.json()["data"]
    assert len(rows) == 14
    assert rows[0]["timestamp"] == f"{START}T00:00:00.000Z"
    assert rows[-1]["timestamp"] == f"{TODAY}T00:00:00.000Z"
    assert [(r["project_id"], r["project_name"], r["chain"]) for r in rows[:2]] == [
        ("aave", "Aave", "ethereum"),
        ("aave", "Aave", "arbitrum"),
    ]
    assert all(
        set(r) == {"timestamp", "project_id", "project_name", "chain", *METRICS} for r in rows
    )
    assert len(records(answer)) == 14


async def test_values_go_out_with_exact_digits(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """Every value is on the wire exactly as sim.value() chose it, in varied spellings, some null."""
    answer = await get(client, sim, target(start=TODAY - timedelta(days=60)))
    texts = []
    for row in answer.json()["data"]:
        for metric in METRICS:
            text = sim.value("aave", row["timestamp"][:10], row["chain"], metric)
            texts.append(text)
            assert f'"{metric}":{"null" if text is None else text}'.encode() in answer.body
    assert None in texts
    assert any(t and "e-" in t for t in texts)  # 1.5e-7
    assert any(t and t.endswith("0") and "." in t for t in texts)  # 1234.50
    assert any(t and len(t.split(".")[0]) > 19 for t in texts)  # beyond 64 bits


def test_values_depend_on_the_seed_only() -> None:
    """The same seed serves the same values; another seed other values."""
    same = [
        TokenTerminalSimulator(seed=1),
        TokenTerminalSimulator(seed=1),
        TokenTerminalSimulator(seed=2),
    ]
    values = [
        [s.value("aave", TODAY - timedelta(days=d), "ethereum", "fees") for d in range(20)]
        for s in same
    ]
    assert values[0] == values[1]
    assert values[0] != values[2]


async def test_unknown_metric_ids_add_errors(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """An unknown metric id leaves the others answered and adds a NOT_FOUND error."""
    path = target(metrics=("fees", "bogus"))
    answer = await get(client, sim, path)
    assert answer.status == 200
    payload = answer.json()
    assert all("fees" in row and "bogus" not in row for row in payload["data"])
    assert payload["errors"] == [{"code": "NOT_FOUND", "field": "metric_ids", "value": "bogus"}]
    page = PROVIDER.parse(PollRequest("GET", path, ("aave",)), answer.body)
    assert isinstance(page, Page)
    assert page.warnings == ("NOT_FOUND metric_ids bogus",)


@pytest.mark.parametrize("key", [None, "wrong", ""])
async def test_a_bad_key_is_401(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession, key: str | None
) -> None:
    """A missing or unknown Bearer key is 401 with a JSON error."""
    answer = await get(client, sim, key=key)
    assert answer.status == 401
    assert answer.json()["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    "query",
    [
        "metric_ids=fees&start=2026-13-01",
        "metric_ids=fees&start=20261117",
        "metric_ids=fees&start=",
        "metric_ids=fees",
        "metric_ids=fees&start=2026-11-25",  # after today
        "metric_ids=fees&start=1990-01-01",  # too far back
        "metric_ids=&start=2026-11-17",
        "start=2026-11-17",
    ],
)
async def test_bad_params_are_400(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession, query: str
) -> None:
    """An invalid start date or missing metric_ids is 400 with a JSON error."""
    answer = await get(client, sim, f"/v2/projects/aave/metrics?{query}")
    assert answer.status == 400
    assert answer.json()["code"] == "BAD_REQUEST"


async def test_bad_params_switch(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """bad_params() makes every metrics request 400 until switched off."""
    sim.bad_params()
    assert (await get(client, sim)).status == 400
    sim.bad_params(False)
    assert (await get(client, sim)).status == 200


async def test_subscription_invalid_is_402(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """subscription_invalid() answers 402 to authenticated requests; a bad key is still 401."""
    sim.subscription_invalid()
    assert (await get(client, sim)).status == 402
    assert (await get(client, sim, key="wrong")).status == 401
    sim.subscription_invalid(False)
    assert (await get(client, sim)).status == 200


async def test_forbid_is_403_for_that_project(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """forbid(project) answers 403 for it alone."""
    sim.forbid("aave")
    assert (await get(client, sim)).status == 403
    assert (await get(client, sim, target("uniswap"))).status == 200
    sim.forbid("aave", False)
    assert (await get(client, sim)).status == 200


async def test_unknown_paths_and_methods(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """An unknown project or path is 404, another method 405, each with a JSON error."""
    assert (await get(client, sim, target("nope"))).status == 404
    other = await get(client, sim, "/v1/projects")
    assert (other.status, other.json()["code"]) == (404, "NOT_FOUND")
    assert (await get(client, sim, method="POST")).status == 405


# --- changing data ----------------------------------------------------------------------


async def test_restate_changes_only_that_past_day(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """restate() changes one past day's value (one chain); only that row's hash changes."""
    before = records(await get(client, sim))
    sim.restate("aave", "2026-11-20", "fees", "1200.10", chain="ethereum")
    after = records(await get(client, sim))
    changed = [key for key in before if before[key].hash != after[key].hash]
    assert changed == ["aave|2026-11-20|ethereum"]
    assert after[changed[0]].content["fees"] == "1200.10"
    with pytest.raises(ValueError, match="not a past day"):
        sim.restate("aave", TODAY, "fees", 1)


async def test_set_value_keeps_exact_digits_and_null(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """set_value serves the digits given (str, Decimal, int) or null."""
    sim.set_value("aave", TODAY, "ethereum", "fees", "1234.50")
    sim.set_value("aave", TODAY, "arbitrum", "fees", Decimal("1e-7"))
    sim.set_value("aave", TODAY, "ethereum", "revenue", None)
    body = (await get(client, sim, target(start=TODAY))).body
    assert b'"chain":"ethereum","fees":1234.50,"revenue":null' in body
    assert b'"chain":"arbitrum","fees":1E-7,' in body
    with pytest.raises(ValueError, match="not a"):
        sim.set_value("aave", TODAY, "ethereum", "fees", "1,5")
    with pytest.raises(ValueError, match="no chain"):
        sim.set_value("aave", TODAY, "solana", "fees", 1)


async def test_rename_answers_308_keeping_the_query(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """A renamed project answers 308 to its new id with the same query; values are unchanged."""
    before = records(await get(client, sim))
    sim.rename("aave", "aave-v3")
    moved = await get(client, sim)
    assert moved.status == 308
    assert moved.headers["Location"] == target("aave-v3")
    renamed = PROVIDER.redirect(PollRequest("GET", target(), ("aave",)), moved.headers["Location"])
    assert renamed is not None
    assert (renamed.old_id, renamed.new_id) == ("aave", "aave-v3")
    answer = await get(client, sim, renamed.follow.target)
    assert answer.status == 200
    assert {row["project_id"] for row in answer.json()["data"]} == {"aave-v3"}
    after = records(answer, path=renamed.follow.target)
    assert {k: r.hash for k, r in after.items()} == {k: r.hash for k, r in before.items()}


async def test_absolute_redirects_and_second_renames(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """Locations may be absolute; every old id points at the current one."""
    sim.absolute_redirects = True
    sim.rename("aave", "aave-v3")
    sim.rename("aave-v3", "aave-v4")
    for old in ("aave", "aave-v3"):
        answer = await get(client, sim, target(old))
        assert answer.status == 308
        assert answer.headers["Location"] == sim.url + target("aave-v4")
    assert sim.project_id("aave") == "aave-v4"


# --- rate limits and faults ---------------------------------------------------------------


async def test_force_429_for_the_next_requests(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """force_429(n) answers the next n requests 429 with Retry-After in seconds, then 200."""
    sim.force_429(2, retry_after=3)
    statuses = [(await get(client, sim)) for _ in range(3)]
    assert [a.status for a in statuses] == [429, 429, 200]
    assert statuses[0].headers["Retry-After"] == "3"
    assert statuses[0].json()["code"] == "TOO_MANY_REQUESTS"
    assert "RateLimit" not in statuses[0].headers  # Token Terminal documents none


async def test_force_429_with_an_http_date(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """Retry-After can be an HTTP-date at least retry_after seconds away."""
    sim.retry_after_format = "http-date"
    sim.force_429(retry_after=5)
    answer = await get(client, sim)
    when = parsedate_to_datetime(answer.headers["Retry-After"])
    now = datetime.now(UTC)
    assert now + timedelta(seconds=4) <= when <= now + timedelta(seconds=7)


async def test_force_429_without_retry_after(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """retry_after=None sends a 429 with no Retry-After (the client backs off on its own)."""
    sim.force_429(retry_after=None)
    answer = await get(client, sim)
    assert answer.status == 429
    assert "Retry-After" not in answer.headers


async def test_force_429_for_a_period(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """force_429(seconds=...) refuses everything for that long, Retry-After the time left."""
    sim.force_429(seconds=0.5 * UNIT)
    first, second = await get(client, sim), await get(client, sim)
    assert (first.status, second.status) == (429, 429)
    assert first.headers["Retry-After"] == "1"  # whole seconds, rounded up
    await asyncio.sleep(0.6 * UNIT)  # the behaviour under test is time passing
    assert (await get(client, sim)).status == 200


@pytest.mark.parametrize("style", ["ietf", "x"])
async def test_optional_rate_headers(client: aiohttp.ClientSession, style: Any) -> None:
    """With rate_headers, every answer carries RateLimit/-Policy or X-RateLimit-* headers."""
    async with TokenTerminalSimulator(
        api_keys={KEY}, today=TODAY, rate_limit=(5, 60.0), rate_headers=style
    ) as sim:
        answer = await get(client, sim)
        sim.force_429(retry_after=7)
        refused = await get(client, sim)
    if style == "ietf":
        assert answer.headers["RateLimit"] == "limit=5, remaining=4, reset=60"
        assert answer.headers["RateLimit-Policy"] == "5;w=60"
        assert refused.headers["RateLimit"] == "limit=5, remaining=0, reset=7"
    else:
        assert answer.headers["X-RateLimit-Limit"] == "5"
        assert answer.headers["X-RateLimit-Remaining"] == "4"
        assert int(answer.headers["X-RateLimit-Reset"]) >= time.time() + 59  # a Unix time
        assert refused.headers["X-RateLimit-Remaining"] == "0"


async def test_server_rate_limit_is_a_sliding_window(client: aiohttp.ClientSession) -> None:
    """Over rate_limit in the window is 429 with Retry-After; room comes back as it slides."""
    async with TokenTerminalSimulator(
        api_keys={KEY}, today=TODAY, rate_limit=(3, 1.0 * UNIT)
    ) as sim:
        answers = [await get(client, sim) for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 200, 429]
        assert answers[3].headers["Retry-After"] == str(math.ceil(UNIT))
        assert sim.max_in_window(1.0 * UNIT) == 4  # measured at the server: the 429 counts
        await asyncio.sleep(1.0 * UNIT)  # the behaviour under test is the window sliding
        assert (await get(client, sim)).status == 200


async def test_fail_next_comes_before_auth(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """fail_next(n, status) answers the next n requests with a gateway error, then normally."""
    sim.fail_next(2, status=503)
    first = await get(client, sim, key="wrong")
    assert (first.status, first.headers["Content-Type"].split(";")[0]) == (503, "text/html")
    assert (await get(client, sim)).status == 503
    assert (await get(client, sim)).status == 200


async def test_garbage_and_wrong_shape_are_quarantined_by_the_handler(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """garbage_next gives a 200 that is not JSON, wrong_shape_next JSON of the wrong shape."""
    sim.garbage_next()
    sim.wrong_shape_next()
    request = PollRequest("GET", target(), ("aave",))
    verdicts = []
    for _ in range(2):
        answer = await get(client, sim)
        assert answer.status == 200
        verdict = PROVIDER.parse(request, answer.body)
        assert isinstance(verdict, Quarantine)
        verdicts.append(verdict.reason)
    assert verdicts == ["invalid_json", "schema_violation"]
    assert isinstance(PROVIDER.parse(request, (await get(client, sim)).body), Page)


async def test_delay_and_the_concurrency_counters(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """delay() holds answers; max_concurrent per path shows requests piling up."""
    sim.delay(0.3 * UNIT)
    started = time.monotonic()
    await asyncio.gather(*(get(client, sim) for _ in range(3)), get(client, sim, target("uniswap")))
    assert time.monotonic() - started >= 0.3 * UNIT
    assert sim.max_concurrent == {"/v2/projects/aave/metrics": 3, "/v2/projects/uniswap/metrics": 1}
    assert (sim.max_in_flight, sim.in_flight) == (4, 0)


# --- the ledger ---------------------------------------------------------------------------


async def test_the_ledger_records_every_request(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """Each request is in the ledger with its times, method, path and query, and status."""
    before = time.time()
    await get(client, sim)
    await get(client, sim, key="wrong")
    first, second = sim.ledger
    assert (first.method, first.target, first.path, first.status) == (
        "GET",
        target(),
        "/v2/projects/aave/metrics",
        200,
    )
    assert second.status == 401
    assert before <= first.wall <= second.wall <= time.time()
    assert first.at <= (first.answered_at or 0) <= second.at
    assert sim.statuses() == [200, 401]


def test_max_in_window_and_silence_after() -> None:
    """max_in_window is the most arrivals in any window; silence_after the gap after each 429."""
    sim = TokenTerminalSimulator()
    sim.ledger = [
        Hit(at, 0.0, "GET", "/x", "/x", status, at + 0.01)
        for at, status in [(0.0, 200), (0.5, 429), (0.9, 200), (1.0, 200), (1.6, 200), (3.0, 429)]
    ]
    assert sim.max_in_window(1.0) == 3  # 0.0-0.9, or 0.5-1.0 (a window is half-open)
    assert sim.max_in_window(0.05) == 1
    assert sim.max_in_window(10.0, path="/y") == 0
    gaps = sim.silence_after(429)
    assert gaps[0] == pytest.approx(0.39)
    assert gaps[1] == math.inf


async def test_wait_until_has_a_deadline(
    sim: TokenTerminalSimulator, client: aiohttp.ClientSession
) -> None:
    """wait_until returns once the ledger holds; it raises TimeoutError naming what never held."""
    task = asyncio.create_task(get(client, sim))
    await sim.wait_until(lambda: sim.statuses() == [200], timeout=5 * UNIT)
    await task
    with pytest.raises(TimeoutError, match="two requests"):
        await sim.wait_until(lambda: len(sim.ledger) == 2, timeout=0.05, what="two requests")


def test_run_standalone_serves_until_sigterm() -> None:
    """run_standalone serves on the port given and exits cleanly on SIGTERM."""
    code = (
        "from listener.dev.simulators.tokenterminal import run_standalone\n"
        "run_standalone('127.0.0.1', 0, ['demo'], on_ready=lambda s: print(s.url, flush=True))\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            path = metrics_target("aave", ("fees",), datetime.now(UTC).date())
            request = urllib.request.Request(url + path, headers={"Authorization": "Bearer demo"})
            with urllib.request.urlopen(request, timeout=5 * UNIT) as response:
                assert orjson.loads(response.read())["data"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10 * UNIT) == 0
        finally:
            proc.kill()
