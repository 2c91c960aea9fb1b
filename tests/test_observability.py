"""
The operators' files under ``docker/``: the Prometheus alert rules (checked and
unit-tested by promtool), the Grafana dashboard and the compose profile that runs both.
Every metric and label they name is one the listener exports, so a renamed metric
cannot silently empty a panel or mute an alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from listener.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "listener.json"
# Labels Prometheus adds (job, instance) or histograms carry (le).
TARGET_LABELS = {"job", "instance", "le"}
_METRIC = re.compile(r"\b(listener_[a-z0-9_]+|up)\b")
_SELECTOR = re.compile(r"\b(listener_[a-z0-9_]+|up)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> set[str]:
    """Every series name the listener's registry exports."""
    names: set[str] = set()
    family: Metric
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def label_names() -> dict[str, set[str]]:
    """Series name → label names, read from the metric objects of :class:`Metrics`."""
    metrics = Metrics()
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        labels = getattr(value, "_labelnames", None)
        if name is None or labels is None:
            continue
        kind = getattr(value, "_type", "")
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }.get(kind, ("",))
        for suffix in suffixes:
            found[name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def check_expression(
    where: str, expr: str, series: dict[str, set[str]], allowed: set[str]
) -> list[str]:
    """What an expression names that the listener does not export."""
    used = set(_METRIC.findall(expr))
    problems = [f"{where}: {name} is not exported" for name in used - allowed if name not in series]
    problems += [
        f"{where}: {name} has no label {label!r}"
        for name, matchers in _SELECTOR.findall(expr)
        for label in _MATCHER.findall(matchers)
        if label not in series.get(name, set()) | TARGET_LABELS
    ]
    known = set().union(*(series.get(n, set()) for n in used)) | TARGET_LABELS
    problems += [
        f"{where}: no metric of it has the label {label!r}"
        for group in _GROUPING.findall(expr)
        for label in filter(None, (part.strip() for part in group.split(",")))
        if label not in known
    ]
    return problems


def test_the_checker_finds_unknown_metrics_and_labels() -> None:
    """The name check is not vacuous: a renamed metric or a wrong label is reported."""
    series = label_names()
    assert check_expression("x", "rate(listener_events_received_total[5m])", series, set()) == []
    assert check_expression("x", "rate(listener_events_recieved_total[5m])", series, set())
    assert check_expression("x", 'listener_journal_pending{source="a"}', series, set())
    assert check_expression("x", "sum by (sauce) (listener_events_received_total)", series, set())
    assert check_expression("x", 'listener_source_status{status="x"}', series, set()) == []


def test_alerts_and_dashboard_name_only_exported_metrics() -> None:
    """Each metric and label of every alert and panel exists in the listener's registry."""
    series = label_names()
    assert set(series) == exported()
    problems = [
        p
        for where, expr in alert_expressions()
        for p in check_expression(where, expr, series, {"up"})
    ]
    problems += [
        p
        for where, expr in dashboard_expressions()
        for p in check_expression(where, expr, series, set())
    ]
    assert problems == []


def test_dashboard_shows_every_metric() -> None:
    """Every metric family the listener exports is on some panel."""
    text = " ".join(expr for _, expr in dashboard_expressions())
    families = {family.name for family in Metrics().registry.collect()}
    missing = sorted(f for f in families if f not in text)
    assert missing == []


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, every query through the datasource variable, the instance filter everywhere."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    queries = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(queries) >= 15
    for panel in queries:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_alert_rules_pass_promtool() -> None:
    """`promtool check rules` accepts the file and `promtool test rules` passes its unit tests."""
    promtool = shutil.which("promtool") or str(ROOT / ".venv" / "bin" / "promtool")
    if not Path(promtool).exists():
        message = "promtool not found; fetch it with: make promtool"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_expressions())} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ALERTS.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a unit test.
    cases = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())
    tested_alerts = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"]}
    assert tested_alerts == {name for name, _ in alert_expressions()}


def test_compose_profile_runs_prometheus_and_grafana_with_these_files() -> None:
    """The observability profile mounts files that exist, scrapes the admin port and loads the rules."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (DOCKER / source).exists(), volume
    assert "profiles" not in services["listener"]  # the default profile still runs it alone
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    (scrape,) = prometheus["scrape_configs"]
    assert scrape["job_name"] == "listener"  # ListenerDown selects job="listener"
    assert scrape["static_configs"][0]["targets"] == ["listener:9090"]
    assert "127.0.0.1:9090:9090" in services["listener"]["ports"]


def test_a_source_shows_one_status_at_a_time() -> None:
    """listener_source_status keeps one series per source: the old status is removed."""
    metrics = Metrics()
    metrics.set_source_status("lx", "connected")
    metrics.set_source_status("lx", "reconnecting")
    metrics.set_source_status("tt", "polling")
    text = metrics.render().decode()
    assert 'listener_source_status{source="lx",status="reconnecting"} 1.0' in text
    assert 'status="connected"' not in text
    assert 'listener_source_status{source="tt",status="polling"} 1.0' in text


async def test_event_loop_lag_shows_a_blocked_loop() -> None:
    """The loop lag probe records how long a callback held the loop, and little otherwise."""
    import asyncio
    import time

    from listener.metrics import watch_loop_lag

    metrics = Metrics()
    probe = asyncio.create_task(watch_loop_lag(metrics.loop_lag_seconds, interval=0.01))
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # (a callback that holds the loop)
    await asyncio.sleep(0.1)
    probe.cancel()
    samples = {
        (s.name, s.labels.get("le")): s.value for s in metrics.loop_lag_seconds.collect()[0].samples
    }
    count = samples[("listener_event_loop_lag_seconds_count", None)]
    assert count >= 10
    # Exactly one wake-up was late by the blocked 0.3 s; the others were not.
    late = count - samples[("listener_event_loop_lag_seconds_bucket", "0.25")]
    assert late == 1
    assert samples[("listener_event_loop_lag_seconds_sum", None)] >= 0.28


def _exposition(*collectors: object) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]  # any object with collect()
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


def test_lock_free_metrics_expose_what_prometheus_client_would() -> None:
    """
    The per-event histograms and counters (no lock per observation) give the scrape,
    byte for byte, that prometheus_client's Histogram and Counter give for the same
    values: a value on a bound counts in that bucket, one past the last in +Inf only.
    """
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from listener.metrics import LoopCounter, LoopHistogram

    buckets = (0.001, 0.01, 1, 60)
    values = (0.0, 0.0005, 0.001, 0.0010001, 0.5, 1.0, 60.0, 61.0, 1e9)
    ours = CollectorRegistry()
    fast = LoopHistogram("x_seconds", "X.", buckets=buckets, registry=ours)
    slow = Histogram("x_seconds", "X.", buckets=buckets, registry=None)
    fast_count = LoopCounter("x_events", "Y.", ["source", "type"], registry=ours)
    slow_count = Counter("x_events", "Y.", ["source", "type"], registry=None)
    for value in values:
        fast.observe(value)
        slow.observe(value)
    for labels, times in ((("a", "t1"), 3), (("b", "t2"), 1)):
        for _ in range(times):
            fast_count.labels(*labels).inc()
            slow_count.labels(*labels).inc()
    fast_count.labels("a", "t1").inc(2.5)
    slow_count.labels("a", "t1").inc(2.5)
    assert _exposition(fast, fast_count) == _exposition(slow, slow_count)
    text = _exposition(fast)
    assert 'x_seconds_bucket{le="0.001"} 3.0' in text  # 0, 0.0005 and 0.001 itself
    assert 'x_seconds_bucket{le="60.0"} 7.0' in text
    assert 'x_seconds_bucket{le="+Inf"} 9.0' in text
