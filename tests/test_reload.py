"""
SIGHUP (CONTRACT §3): new webhook secrets, stream and poll API keys and admin keys
without a restart or a dropped connection; other changes logged as needing a restart;
a file that does not validate changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
import yaml

from listener.config import Config
from listener.config_loader import load_config, recheck
from listener.dev.simulators.layerx402.server import Layerx402Simulator
from listener.dev.simulators.tokenterminal import TokenTerminalSimulator
from listener.journal import Journal
from listener.logs import configure_logging, redact_also
from listener.reload import plan_reload
from listener.service import Service
from tests.conftest import UNIT, config_data, running, tap, wait_for
from tests.process import ListenerProcess
from tests.test_poll import poll_source, tt_source
from tests.test_streams import lx_source, stream_source
from tests.webhook_sender import WHSEC, Sender, gst_event

OLD_KEY, NEW_KEY = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
NEW_WHSEC = "whsec_" + base64.b64encode(b"a new signing key, 32 bytes long").decode()


def gst_file_source() -> dict[str, Any]:
    return {
        "name": "gst",
        "kind": "webhook",
        "provider": "getstoken",
        "path": "/webhooks/gst",
        "signature": {"secrets_file": "gst.secrets"},
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# --- what applies ------------------------------------------------------------------------


def test_plan_applies_secrets_and_lists_every_other_change(tmp_path: Path) -> None:
    """Secrets and admin keys are applied; every other difference is named and left as it was."""
    sources = [
        {**gst_file_source(), "signature": {"secrets": [WHSEC]}},
        lx_source("ws://127.0.0.1:1/ws", api_key=OLD_KEY),
        tt_source("http://127.0.0.1:1", api_key=OLD_KEY),
    ]
    admin = {"api_keys": [{"key": OLD_KEY, "scopes": ["read"]}]}
    before = Config.model_validate(config_data(tmp_path, sources=sources, admin=admin))
    changed = [
        {**sources[0], "signature": {"secrets": [WHSEC, NEW_WHSEC]}},
        {**sources[1], "api_key": NEW_KEY, "url": "ws://127.0.0.1:2/ws"},
        {**sources[2], "api_key": NEW_KEY},
        {**tt_source("http://127.0.0.1:1"), "name": "tt2"},
    ]
    after = Config.model_validate(
        config_data(
            tmp_path,
            sources=changed,
            admin={"api_keys": [{"key": NEW_KEY, "scopes": ["admin"]}]},
            http={"max_body": "2MiB"},
        )
    )
    plan = plan_reload(before, after)
    assert plan.rotated == [
        "sources[0].signature.secrets",
        "sources[1].api_key",
        "sources[2].api_key",
        "admin.api_keys",
    ]
    assert set(plan.restart) == {"sources[1].url", "sources (tt2): added", "http.max_body"}
    config = plan.config
    assert [s.get_secret_value() for s in config.sources[0].signature.secrets] == [WHSEC, NEW_WHSEC]
    assert config.sources[1].api_key.get_secret_value() == NEW_KEY
    assert config.sources[1].url == "ws://127.0.0.1:1/ws"  # not applied: needs a restart
    assert config.sources[2].api_key.get_secret_value() == NEW_KEY
    assert [s.name for s in config.sources] == ["gst", "lx", "tt"]
    assert config.admin.api_keys[0].scopes == ("admin",)
    assert config.http.max_body == before.http.max_body
    assert plan_reload(before, before).rotated == plan_reload(before, before).restart == []
    assert all(NEW_KEY not in line and WHSEC not in line for line in plan.rotated + plan.restart)


def test_a_secrets_file_holds_one_secret_per_line(tmp_path: Path) -> None:
    """secrets_file with two lines is two secrets (the overlap of a rotation); one line is one."""
    (tmp_path / "gst.secrets").write_text(f"{WHSEC}\n\n{NEW_WHSEC}\n")
    path = write_config(
        tmp_path / "config.yaml", config_data(tmp_path, sources=[gst_file_source()])
    )
    secrets = load_config(path).sources[0].signature.secrets
    assert [s.get_secret_value() for s in secrets] == [WHSEC, NEW_WHSEC]
    (tmp_path / "gst.secrets").write_text(f"{NEW_WHSEC}\n")
    secrets = load_config(path).sources[0].signature.secrets
    assert [s.get_secret_value() for s in secrets] == [NEW_WHSEC]


def test_new_secrets_are_redacted_from_the_logs() -> None:
    """After a reload brings a secret, the logs mask it like the first ones."""
    out = io.StringIO()
    configure_logging(level="info", fmt="json", secrets=[WHSEC], stream=out)
    try:
        redact_also([NEW_WHSEC])
        structlog.get_logger("t").info("leak", old=WHSEC, new=f"x{NEW_WHSEC}y")
        line = orjson.loads(out.getvalue().splitlines()[-1])
        assert line["old"] == "***" and line["new"] == "x***y"
    finally:
        configure_logging(level="warning", fmt="json")


# --- the daemon --------------------------------------------------------------------------


@pytest.mark.usefixtures("cleanup_topology")
async def test_sighup_rotates_a_webhook_secret_while_webhooks_flow(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    A real `listener run`: old → old+new (SIGHUP) → new (SIGHUP) while a sender posts all
    along, always with a configured secret: every request 200, every event published,
    the old secret refused once removed, no secret in the log.
    """
    secrets = tmp_path / "gst.secrets"
    secrets.write_text(WHSEC + "\n")
    raw = {
        "broker": {"url": broker_url, "exchange": exchange_name},
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": [gst_file_source()],
    }
    daemon = ListenerProcess(tmp_path, raw)
    sent: list[str] = []
    failures: list[Any] = []
    current = {"secret": WHSEC}
    stop = asyncio.Event()

    async def keep_sending(sender: Sender) -> None:
        n = 0
        while not stop.is_set():
            event = gst_event(f"evt_rot_{n:05d}")
            try:
                status, body, _ = await sender.post(event, secret=current["secret"])
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            else:
                (sent if status == 200 else failures).append(
                    event["id"] if status == 200 else (status, body)
                )
            n += 1
            await asyncio.sleep(0.005)

    def reloads() -> int:
        return daemon.logs().count('"config_reloaded"')

    async def sighup(expected: int) -> None:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: reloads() >= expected, what=f"reload {expected} logged")

    try:
        async with tap(broker_url, exchange_name) as t, aiohttp.ClientSession() as session:
            await daemon.start()
            sender = Sender(session, f"{daemon.webhook_url}/webhooks/gst")
            flow = asyncio.create_task(keep_sending(sender))
            await wait_for(lambda: len(sent) >= 30, what="webhooks flowing")

            secrets.write_text(f"{WHSEC}\n{NEW_WHSEC}\n")
            await sighup(1)
            for secret in (WHSEC, NEW_WHSEC):  # the overlap: both verify
                assert (await sender.post(gst_event(), secret=secret))[0] == 200
            current["secret"] = NEW_WHSEC  # the provider switches
            await wait_for(lambda: len(sent) >= 60, what="webhooks signed with the new secret")

            secrets.write_text(f"{NEW_WHSEC}\n")
            await sighup(2)
            status, body, _ = await sender.post(gst_event(), secret=WHSEC)
            assert status == 401 and body["error"]["code"] == "INVALID_SIGNATURE", body
            count = len(sent)
            await wait_for(
                lambda: len(sent) >= count + 30, what="webhooks after the old secret went"
            )
            stop.set()
            await flow
            await t.wait_ids(set(sent), timeout=30)
        assert failures == [], failures[:5]
        assert await daemon.terminate() == 0
    finally:
        stop.set()
        await daemon.stop()
    logs = daemon.logs()
    assert WHSEC.removeprefix("whsec_") not in logs and NEW_WHSEC.removeprefix("whsec_") not in logs
    assert '"config_change_needs_restart"' not in logs


@pytest.mark.usefixtures("cleanup_topology")
async def test_a_broken_file_changes_nothing_and_other_changes_wait_for_a_restart(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """Bad YAML, then an invalid value: each problem logged, the running config kept; a new port only logged."""
    (tmp_path / "gst.secrets").write_text(WHSEC + "\n")
    raw = {
        "broker": {"url": broker_url, "exchange": exchange_name},
        "journal": {"path": str(tmp_path / "journal.db")},
        "sources": [gst_file_source()],
    }
    daemon = ListenerProcess(tmp_path, raw)
    try:
        await daemon.start()
        assert daemon.proc is not None
        good = daemon.config_path.read_text()
        async with aiohttp.ClientSession() as session:
            sender = Sender(session, f"{daemon.webhook_url}/webhooks/gst")
            daemon.config_path.write_text(good + "\nsources: [unclosed\n")
            (tmp_path / "gst.secrets").write_text(NEW_WHSEC + "\n")
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_for(
                lambda: daemon.logs().count('"config_reload_failed"') == 1, what="failure logged"
            )
            assert "not valid YAML" in daemon.logs()
            assert (await sender.post(gst_event(), secret=WHSEC))[0] == 200
            assert (await sender.post(gst_event(), secret=NEW_WHSEC))[0] == 401

            broken = yaml.safe_load(good)
            broken["sources"][0]["signature"]["tolerance"] = "soon"
            broken["journal"]["retention"] = "forever"
            daemon.config_path.write_text(yaml.safe_dump(broken))
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_for(
                lambda: daemon.logs().count('"config_reload_failed"') == 2, what="second failure"
            )
            problems = [
                orjson.loads(line)["problem"]
                for line in daemon.logs().splitlines()
                if '"config_reload_problem"' in line
            ]
            assert any(p.startswith("sources[0].signature.tolerance") for p in problems), problems
            assert any(p.startswith("journal.retention") for p in problems), problems
            assert (await sender.post(gst_event(), secret=WHSEC))[0] == 200

            moved = yaml.safe_load(good)
            moved["http"]["max_body"] = "2MiB"
            daemon.config_path.write_text(yaml.safe_dump(moved))
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: '"config_reloaded"' in daemon.logs(), what="reload")
            assert '"key": "http.max_body"' in daemon.logs()
            async with session.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as response:
                metrics = await response.text()
            assert 'listener_config_reloads_total{result="failed"} 2.0' in metrics
            assert 'listener_config_reloads_total{result="ok"} 1.0' in metrics
            assert "listener_config_restart_pending 1.0" in metrics
            # The new secret came with the valid file.
            assert (await sender.post(gst_event(), secret=NEW_WHSEC))[0] == 200
        assert await daemon.terminate() == 0
    finally:
        await daemon.stop()


@pytest.mark.usefixtures("cleanup_topology")
async def test_stream_poll_and_admin_keys_rotate_without_a_reconnect(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """The stream stays connected (its next connect sends the new key), the next poll and admin call use theirs."""
    for name in ("lx", "tt", "admin"):
        (tmp_path / f"{name}.key").write_text(OLD_KEY)
    async with (
        Layerx402Simulator(api_keys={OLD_KEY}, rate=50) as lx_sim,
        TokenTerminalSimulator(
            api_keys={OLD_KEY}, projects=["aave"], chains=["ethereum"]
        ) as tt_sim,
    ):
        lx = {k: v for k, v in lx_source(lx_sim.url).items() if k != "api_key"}
        tt = {k: v for k, v in tt_source(tt_sim.url).items() if k != "api_key"}
        raw = config_data(
            tmp_path,
            broker_url=broker_url,
            exchange=exchange_name,
            sources=[{**lx, "api_key_file": "lx.key"}, {**tt, "api_key_file": "tt.key"}],
            admin={"api_keys": [{"key_file": "admin.key", "scopes": ["admin"]}]},
        )
        path = write_config(tmp_path / "config.yaml", raw)
        async with (
            running(load_config(path), config_file=path) as service,
            aiohttp.ClientSession() as session,
        ):
            stream = stream_source(service)
            poller = poll_source(service, "tt")
            await wait_for(lambda: stream.status == "connected", what="stream connected")
            await wait_for(lambda: 200 in tt_sim.statuses(), what="a poll answered")
            admin = f"http://127.0.0.1:{service.admin_port}"

            async def admin_status(key: str) -> int:
                async with session.post(
                    f"{admin}/v1/sources/tt/poll", headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    return response.status

            assert await admin_status(OLD_KEY) == 202
            async with session.get(f"{admin}/metrics") as response:
                metrics = await response.text()
            # What the alert rules and the dashboard read (docker/prometheus/alerts.yml).
            assert 'listener_source_status{source="lx",status="connected"} 1.0' in metrics
            assert 'listener_source_status{source="tt",status="polling"} 1.0' in metrics
            assert 'listener_poll_interval_seconds{source="tt"} 3600.0' in metrics

            for name in ("lx", "tt", "admin"):
                (tmp_path / f"{name}.key").write_text(NEW_KEY)
            lx_sim.api_keys = frozenset({NEW_KEY})
            tt_sim.api_keys = {NEW_KEY}
            connections = stream.connections
            plan = await service.reload()  # what SIGHUP runs (the signal itself: tests above)
            assert plan is not None
            assert plan.rotated == ["sources[0].api_key", "sources[1].api_key", "admin.api_keys"]
            assert plan.restart == []
            assert stream.status == "connected" and stream.connections == connections

            assert await admin_status(OLD_KEY) == 401
            seen = len(tt_sim.ledger)
            assert await admin_status(NEW_KEY) == 202
            await wait_for(
                lambda: 200 in [h.status for h in tt_sim.ledger[seen:]],
                what="a poll with the new key",
            )
            assert 401 not in [h.status for h in tt_sim.ledger[seen:]]
            assert poller.status == "polling"

            await lx_sim.drop_all()  # the next connect authenticates with the new key
            await wait_for(
                lambda: stream.connections > connections and stream.status == "connected",
                timeout=10 * UNIT,
                what="reconnected with the new key",
            )


def _two_hooks(tmp_path: Path, broker_url: str, exchange: str) -> dict[str, Any]:
    data = config_data(tmp_path, broker_url=broker_url, exchange=exchange, sources=[])
    data["sources"] = [
        {**gst_file_source(), "signature": {"secrets": [WHSEC]}},
        {
            **gst_file_source(),
            "name": "other",
            "path": "/webhooks/other",
            "signature": {"secrets": [WHSEC]},
        },
    ]
    data["admin"] = {"api_keys": [{"key": OLD_KEY, "scopes": ["read"]}]}
    return data


def test_a_cluster_config_with_broker_urls_reloads(tmp_path: Path) -> None:
    """
    With ``broker.urls`` (CONTRACT §10) every reload failed its check, "give broker.url
    or broker.urls, not both": the check read the running settings back with ``url``'s
    default beside ``urls``. A rotated admin key now passes it.
    """
    urls = ["amqp://u:p@127.0.0.1:1/", "amqp://u:p@127.0.0.1:2/"]
    raw = config_data(tmp_path, admin={"api_keys": [{"key": OLD_KEY, "scopes": ["read"]}]})
    raw["broker"] = {"urls": urls, "exchange": "reload-urls"}
    before = Config.model_validate(raw)
    raw["admin"]["api_keys"][0]["key"] = NEW_KEY
    plan = plan_reload(before, Config.model_validate(raw))
    assert plan.rotated == ["admin.api_keys"] and plan.restart == []
    assert recheck(before) == recheck(plan.config) == []
    assert [u.get_secret_value() for u in plan.config.broker.nodes] == urls
    raw["broker"]["url"] = urls[0]  # (both given: still refused)
    with pytest.raises(ValueError, match="not both"):
        Config.model_validate(raw)


@pytest.mark.usefixtures("cleanup_topology")
async def test_new_secrets_that_do_not_fit_the_running_settings_change_nothing(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """
    The file rotates one source's secret and the admin key, and switches another source
    to the github scheme with its secret: the running standard-webhooks scheme and a
    github secret do not fit (a restart applies both). Nothing is applied, and the
    failure says why. The first source's secret used to be applied, then the reload
    failed half-way (the admin key kept, the log claiming nothing changed).
    """
    raw = _two_hooks(tmp_path, broker_url, exchange_name)
    path = write_config(tmp_path / "listener.yaml", raw)
    config = load_config(path)
    raw["sources"][0]["signature"]["secrets"] = [NEW_WHSEC]
    raw["sources"][1]["signature"] = {"scheme": "github", "secrets": ["gh-secret!"]}
    raw["admin"]["api_keys"][0]["key"] = NEW_KEY
    async with running(config, config_file=path) as service, aiohttp.ClientSession() as session:
        write_config(path, raw)
        with structlog.testing.capture_logs() as logs:
            assert await service.reload() is None
        problems = [e["problem"] for e in logs if e["event"] == "config_reload_problem"]
        assert problems and all(p.startswith("sources[1].signature") for p in problems), problems
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        assert (await sender.post(gst_event(), secret=WHSEC))[0] == 200
        assert (await sender.post(gst_event(), secret=NEW_WHSEC))[0] == 401
        url = f"http://127.0.0.1:{service.admin_port}/v1/sources"
        async with session.get(url, headers={"Authorization": f"Bearer {OLD_KEY}"}) as r:
            assert r.status == 200


@pytest.mark.usefixtures("cleanup_topology")
async def test_a_sighup_while_the_daemon_starts_applies_its_secrets(
    tmp_path: Path, broker_url: str, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A reload while the journal opens (before the webhook routes exist) rotates the
    secret, and the routes built after it use it. They used the secret of the file as
    it was when the start began, while the log said the new one was applied.
    """
    raw = _two_hooks(tmp_path, broker_url, exchange_name)
    path = write_config(tmp_path / "listener.yaml", raw)
    config = load_config(path)
    raw["sources"][0]["signature"]["secrets"] = [NEW_WHSEC]
    services: list[Any] = []
    opened = Journal.open

    async def open_then_reload(self: Journal) -> None:
        await opened(self)
        if services:  # (the service's own journal, not another)
            write_config(path, raw)
            assert await services[0].reload() is not None

    monkeypatch.setattr(Journal, "open", open_then_reload)
    original = Service.__init__

    def keep(self: Service, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        services.append(self)

    monkeypatch.setattr(Service, "__init__", keep)
    async with running(config, config_file=path) as service, aiohttp.ClientSession() as session:
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        assert (await sender.post(gst_event(), secret=NEW_WHSEC))[0] == 200
        assert (await sender.post(gst_event(), secret=WHSEC))[0] == 401
