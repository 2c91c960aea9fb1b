"""
Tests for listener/dev/simulators/terrapin.py: a real aiohttp client on 127.0.0.1
against the simulator, read back through handlers/terrapin.py (CONTRACT §9).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from handlers import Quarantine
from handlers.polling import Page, Record
from handlers.terrapin import PROVIDER, batch_request, isin_valid
from listener.dev.simulators.terrapin import TerrapinSimulator, check_digit, generate_isins, is_isin
from tests.conftest import UNIT, Answer

KEY = "k-test"
PATH = "/api/v1/bond_reference"
BOND, NOTE, APPLE, BAE = "US912810TM09", "US91282CJL55", "US0378331005", "GB0002634946"


@pytest.fixture
async def sim() -> AsyncIterator[TerrapinSimulator]:
    """Three registered ISINs; APPLE is valid but unknown."""
    async with TerrapinSimulator(api_keys={KEY}, isins=[BOND, NOTE, BAE]) as simulator:
        yield simulator


async def post(
    client: aiohttp.ClientSession,
    sim: TerrapinSimulator,
    isins: Any = (BOND, NOTE),
    *,
    key: str | None = KEY,
    body: bytes | None = None,
    path: str = PATH,
) -> Answer:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = body if body is not None else orjson.dumps({"isins": list(isins)})
    async with client.post(sim.url + path, data=data, headers=headers) as response:
        return Answer(response.status, response.headers, await response.read())


def records(answer: Answer, isins: tuple[str, ...]) -> dict[str, Record]:
    page = PROVIDER.parse(batch_request(isins), answer.body)
    assert isinstance(page, Page), page
    return {record.key: record for record in page.records}


# --- ISINs ------------------------------------------------------------------------------


def test_generated_isins_are_valid_distinct_and_deterministic() -> None:
    """generate_isins gives distinct ISINs valid by ISO 6166 (the handler agrees), per seed."""
    isins = generate_isins(5000)
    assert len(set(isins)) == 5000
    assert all(isin_valid(i) and is_isin(i) for i in isins)
    assert generate_isins(5000) == isins
    assert generate_isins(10, seed=1) != isins[:10]
    assert all(i.startswith("GB") for i in generate_isins(5, country="GB"))


def test_the_simulator_and_the_handler_agree_on_check_digits() -> None:
    """The simulator's own check digit matches the handler's on real and flipped ISINs."""
    for isin in (BOND, NOTE, APPLE, BAE, "AU0000XVGZA3", "US912810TM06", "US91282CJL54"):
        assert is_isin(isin) == isin_valid(isin)
    # CONTRACT §9's example ISINs: their check digits would be 9 and 5.
    assert [check_digit(i[:11]) for i in ("US912810TM06", "US91282CJL54")] == [9, 5]


# --- answers ----------------------------------------------------------------------------


async def test_records_for_registered_isins_and_unknown_ones_absent(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """Registered ISINs have a record each, in request order; a valid unknown one is absent."""
    answer = await post(client, sim, [NOTE, APPLE, BOND, NOTE])
    assert answer.status == 200
    payload = answer.json()
    assert [r["isin"] for r in payload["data"]] == [NOTE, BOND]
    assert payload["total"] == 2
    assert set(records(answer, (NOTE, APPLE, BOND))) == {NOTE, BOND}


async def test_records_carry_exact_numbers(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """Coupons, prices and big amounts go out as JSON numbers with their exact digits."""
    isins = sim.generate(50)
    answer = await post(client, sim, isins)
    data = answer.json()["data"]
    coupons = {str(r["coupon"]) for r in data}
    assert all(len(c.split(".")[1]) == 3 for c in coupons)  # 4.125, 0.500, ...
    assert any(r["amount_outstanding"] > 2**64 for r in data)
    assert any(str(r["price"]).endswith("0") for r in data)
    for row in data:
        assert sim.record(row["isin"]) == row
        assert f'"coupon":{row["coupon"]}'.encode() in answer.body
    parsed = records(answer, tuple(isins))
    assert parsed[isins[0]].data["amount_outstanding"] == str(data[0]["amount_outstanding"])


def test_records_depend_on_seed_and_isin() -> None:
    """The same seed gives the same record; another seed another."""
    a, b, c = (TerrapinSimulator(isins=[BOND], seed=s) for s in (1, 1, 2))
    assert a.record(BOND) == b.record(BOND)
    assert a.record(BOND) != c.record(BOND)
    assert {"isin", "issuer", "currency", "coupon", "maturity_date", "amount_outstanding"} <= set(
        a.record(BOND)
    )


async def test_malformed_isins_are_422_with_pointers(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """Each malformed ISIN (check digit, shape, type) is named by a /isins/i pointer."""
    batch = (BOND, "US912810TM06", "bad", NOTE)
    answer = await post(client, sim, [*batch, 5])
    assert answer.status == 422
    errors = answer.json()["errors"]
    assert [e["source"]["pointer"] for e in errors] == ["/isins/1", "/isins/2", "/isins/4"]
    assert all(e["detail"] for e in errors)
    rejected = PROVIDER.reject(batch_request(batch), 422, answer.body)
    assert rejected is not None
    assert rejected.items == ("US912810TM06", "bad")
    assert rejected.retry == batch_request((BOND, NOTE))
    assert (await post(client, sim, rejected.retry.items)).status == 200


@pytest.mark.parametrize("count", [0, 1001])
async def test_an_empty_or_too_long_list_is_422_on_the_list(
    sim: TerrapinSimulator, client: aiohttp.ClientSession, count: int
) -> None:
    """No ISINs, or more than 1000, is a 422 pointing at /isins, which names no single ISIN."""
    isins = generate_isins(count)
    answer = await post(client, sim, isins)
    assert answer.status == 422
    assert [e["source"]["pointer"] for e in answer.json()["errors"]] == ["/isins"]
    assert PROVIDER.reject(batch_request(tuple(isins)), 422, answer.body) is None


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"isins": "US912810TM09"}', b'{"isin": []}']
)
async def test_a_body_that_is_not_an_isin_list_is_400(
    sim: TerrapinSimulator, client: aiohttp.ClientSession, body: bytes
) -> None:
    """A body that is not {"isins": [...]} is 400 with an errors array."""
    answer = await post(client, sim, body=body)
    assert answer.status == 400
    assert answer.json()["errors"][0]["detail"]


@pytest.mark.parametrize("key", [None, "wrong"])
async def test_a_bad_key_is_401_with_errors(
    sim: TerrapinSimulator, client: aiohttp.ClientSession, key: str | None
) -> None:
    """A missing or wrong key is 401 {"errors": [{"detail": ...}]}."""
    answer = await post(client, sim, key=key)
    assert answer.status == 401
    assert list(answer.json()) == ["errors"]
    assert answer.json()["errors"][0]["detail"]


async def test_other_paths_and_methods(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """Another path is 404, a GET 405, both with Terrapin's errors body."""
    assert (await post(client, sim, path="/api/v1/bond_prices")).status == 404
    async with client.get(sim.url + PATH, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 405
        assert "errors" in orjson.loads(await response.read())


async def test_isins_outside_the_tier_are_403(client: aiohttp.ClientSession) -> None:
    """ISINs outside the tier (country codes or ISINs) are 403; the rest are answered."""
    async with TerrapinSimulator(api_keys={KEY}, isins=[BOND, BAE], tier={"US", BAE}) as sim:
        assert (await post(client, sim, [BOND, BAE])).status == 200
        refused = await post(client, sim, [BOND, "FR0000131104"])
        assert refused.status == 403
        assert "FR0000131104" in refused.json()["errors"][0]["detail"]


async def test_the_monthly_quota_counts_distinct_isins(client: aiohttp.ClientSession) -> None:
    """Past the monthly quota of distinct ISINs is 403; repeats are free; reset_quota starts over."""
    async with TerrapinSimulator(api_keys={KEY}, isins=[BOND, NOTE, BAE], monthly_quota=3) as sim:
        assert (await post(client, sim, [BOND, NOTE])).status == 200
        assert (await post(client, sim, [BOND, NOTE])).status == 200
        assert (await post(client, sim, [BAE, BOND])).status == 200
        refused = await post(client, sim, [APPLE])
        assert refused.status == 403
        assert "quota" in refused.json()["errors"][0]["detail"]
        assert sim.quota_used == 3
        sim.reset_quota()
        assert (await post(client, sim, [APPLE])).status == 200


# --- rate limits and faults ---------------------------------------------------------------


async def test_ietf_rate_headers_on_every_answer(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """Every answer, a 401 too, carries ratelimit and ratelimit-policy (100 per 60 s)."""
    ok = await post(client, sim)
    assert ok.headers["ratelimit"] == "limit=100, remaining=99, reset=60"
    assert ok.headers["ratelimit-policy"] == "100;w=60"
    unauthorized = await post(client, sim, key="wrong")
    assert unauthorized.headers["ratelimit"].startswith("limit=100, remaining=99, reset=")


async def test_over_the_rate_limit_is_429(client: aiohttp.ClientSession) -> None:
    """Past rate_limit the answer is 429 with retry-after and remaining=0."""
    async with TerrapinSimulator(api_keys={KEY}, isins=[BOND], rate_limit=(2, 60.0)) as sim:
        statuses = [await post(client, sim, [BOND]) for _ in range(3)]
        assert [a.status for a in statuses] == [200, 200, 429]
        refused = statuses[2]
        assert 59 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["ratelimit"].startswith("limit=2, remaining=0, reset=")
        assert refused.headers["ratelimit-policy"] == "2;w=60"


async def test_a_forced_429_looks_like_terrapins(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """force_429 answers with retry-after and `ratelimit: limit=100, remaining=0, reset=23`."""
    sim.force_429(retry_after=23)
    answer = await post(client, sim)
    assert answer.status == 429
    assert answer.headers["retry-after"] == "23"
    assert answer.headers["ratelimit"] == "limit=100, remaining=0, reset=23"
    assert answer.headers["ratelimit-policy"] == "100;w=60"
    assert sim.silence_after() == [pytest.approx(float("inf"))]


async def test_502_during_a_redeploy(sim: TerrapinSimulator, client: aiohttp.ClientSession) -> None:
    """fail_next() answers 502 (a gateway page), then the service is back."""
    sim.fail_next()
    assert (await post(client, sim)).status == 502
    assert (await post(client, sim)).status == 200


async def test_garbage_and_wrong_shape(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """garbage_next and wrong_shape_next give 200s the handler quarantines."""
    sim.garbage_next()
    sim.wrong_shape_next()
    reasons = []
    for _ in range(2):
        verdict = PROVIDER.parse(batch_request((BOND, NOTE)), (await post(client, sim)).body)
        assert isinstance(verdict, Quarantine)
        reasons.append(verdict.reason)
    assert reasons == ["invalid_json", "schema_violation"]


# --- changing data ----------------------------------------------------------------------


async def test_change_sets_a_field_with_exact_digits(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """change() sets one field; only that ISIN's record hash changes."""
    before = records(await post(client, sim), (BOND, NOTE))
    sim.change(BOND, "coupon", Decimal("4.250"))
    answer = await post(client, sim)
    assert b'"coupon":4.250' in answer.body
    after = records(answer, (BOND, NOTE))
    assert [i for i in before if before[i].hash != after[i].hash] == [BOND]
    assert after[BOND].content["coupon"] == "4.250"


async def test_a_tenth_of_five_thousand_change(client: aiohttp.ClientSession) -> None:
    """change_fraction(0.1) on 5,000 ISINs changes exactly those 500, seen in five 1,000 batches."""
    async with TerrapinSimulator(api_keys={KEY}) as sim:
        isins = tuple(sim.generate(5000))
        batches = [isins[i : i + 1000] for i in range(0, 5000, 1000)]

        async def poll() -> dict[str, str]:
            hashes: dict[str, str] = {}
            for batch in batches:
                hashes |= {
                    k: r.hash for k, r in records(await post(client, sim, batch), batch).items()
                }
            return hashes

        before = await poll()
        changed = sim.change_fraction(0.10, seed=7)
        after = await poll()
        assert len(changed) == 500
        assert sorted(i for i in isins if before[i] != after[i]) == changed
        assert sim.max_in_window(60.0) == 10
        assert TerrapinSimulator(isins=isins).change_fraction(0.10, seed=7) == changed


async def test_delay_ledger_and_concurrency(
    sim: TerrapinSimulator, client: aiohttp.ClientSession
) -> None:
    """delay() holds answers; the ledger has every POST, max_concurrent the pile-up."""
    sim.delay(0.2 * UNIT)
    started = time.monotonic()
    await asyncio.gather(*(post(client, sim) for _ in range(3)))
    assert time.monotonic() - started >= 0.2 * UNIT
    assert [(h.method, h.target, h.status) for h in sim.ledger] == [("POST", PATH, 200)] * 3
    assert sim.max_concurrent == {PATH: 3}
    assert sim.in_flight == 0


def test_run_standalone_serves_until_sigterm() -> None:
    """run_standalone serves generated ISINs on the port given and exits cleanly on SIGTERM."""
    code = (
        "from listener.dev.simulators.terrapin import run_standalone\n"
        "run_standalone('127.0.0.1', 0, ['demo'], on_ready=lambda s: print(s.url, s.isins[0], flush=True))\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url, isin = proc.stdout.readline().split()
            request = urllib.request.Request(
                url + PATH,
                data=orjson.dumps({"isins": [isin]}),
                headers={"Authorization": "Bearer demo", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5 * UNIT) as response:
                assert orjson.loads(response.read())["data"][0]["isin"] == isin
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10 * UNIT) == 0
        finally:
            proc.kill()
