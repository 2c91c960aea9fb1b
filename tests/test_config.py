"""Configuration: variables, secret files, units, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from listener.config import parse_duration, parse_size
from listener.config_loader import load_config, recheck, render_config, secret_values
from listener.exceptions import ConfigError

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

BASE = """
broker:
  url: ${RABBITMQ_URL:-amqp://guest:guest@localhost:5672/}
journal:
  retention: 2h
http:
  max_body: 512KiB
sources:
  - name: gst
    kind: webhook
    provider: getstoken
    path: /webhooks/gst
    signature:
      secrets: ["${GST_SECRET}"]
      tolerance: 90s
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_units() -> None:
    """Durations and sizes parse in every documented unit."""
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300
    assert parse_duration("7d") == 7 * 86400
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1GiB") == 1024**3
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 weeks")


def test_substitutes_variables_and_defaults(tmp_path: Path) -> None:
    """${VAR} is read from the environment and ${VAR:-default} falls back."""
    config = load_config(write(tmp_path, BASE), environ={"GST_SECRET": WHSEC})
    assert config.broker.url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert config.journal.retention == 7200
    assert config.http.max_body == 512 * 1024
    source = config.sources[0]
    assert source.kind == "webhook"
    assert source.signature.secrets[0].get_secret_value() == WHSEC
    assert source.signature.tolerance == 90


def test_missing_variable_names_it_and_the_key(tmp_path: Path) -> None:
    """An unset variable is an error naming the variable and where it is used."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, BASE), environ={})
    assert any(
        "GST_SECRET" in p and p.startswith("sources[0].signature.secrets[0]")
        for p in caught.value.problems
    )


def test_secret_file(tmp_path: Path) -> None:
    """A key ending in _file reads the secret from that file."""
    (tmp_path / "secret").write_text(WHSEC + "\n")
    text = BASE.replace('secrets: ["${GST_SECRET}"]', "secrets_file: [secret]")
    config = load_config(write(tmp_path, text), environ={})
    assert config.sources[0].signature.secrets[0].get_secret_value() == WHSEC


def test_every_problem_reported_with_key_paths(tmp_path: Path) -> None:
    """Unknown keys and bad values are all reported at once, each with its key path."""
    text = (
        BASE
        + """
  - name: lx
    kind: websocket
    provider: layerx402
    url: ftp://nowhere
    api_key: k
    bogus: 1
log:
  level: loud
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    problems = "\n".join(caught.value.problems)
    assert "sources[1].bogus: unknown key" in problems
    assert "sources[1].url" in problems
    assert "log.level" in problems


def test_a_source_may_leave_out_its_url_and_path(tmp_path: Path) -> None:
    """
    CONTRACT §3: every key shown may be left out where the example shows a default;
    a webhook's path, a stream's or a poll source's url were required. They default to
    ``/webhooks/<name>`` and the provider's production endpoint.
    """
    text = """
sources:
  - {name: gst, kind: webhook, provider: getstoken, signature: {secrets: ["${GST_SECRET}"]}}
  - {name: lx, kind: websocket, provider: layerx402, api_key: k}
  - name: tt
    kind: poll
    provider: tokenterminal
    api_key: k
    resources: [{endpoint: project_metrics, projects: [aave], metrics: [fees]}]
  - name: bonds
    kind: poll
    provider: terrapin
    api_key: k
    resources: [{endpoint: bond_reference, isins: [US0378331005]}]
  - {name: own, kind: websocket, provider: layerx402, api_key: k, url: "ws://127.0.0.1:1/ws"}
"""
    config = load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    webhook, lx, tt, bonds, own = config.sources
    assert webhook.path == "/webhooks/gst"  # type: ignore[union-attr] # a webhook source
    assert [s.url for s in (lx, tt, bonds, own)] == [  # type: ignore[union-attr] # none is
        "wss://api.layerx402.dev/ws",
        "https://api.tokenterminal.com",
        "https://terrapinfinance.com",
        "ws://127.0.0.1:1/ws",
    ]
    assert recheck(config) == []  # (read back as a SIGHUP's check does)


def test_unknown_provider(tmp_path: Path) -> None:
    """A provider without a handlers/<name>.py module is an error on sources[i].provider."""
    text = BASE.replace("provider: getstoken", "provider: nosuch")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    assert caught.value.problems[0].startswith("sources[0].provider: unknown provider 'nosuch'")


def test_render_masks_secrets(tmp_path: Path) -> None:
    """The rendered configuration shows *** for every secret and masks the broker password."""
    text = BASE.replace("amqp://guest:guest@", "amqp://app:s3cr3tpassw0rd@")
    config = load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    rendered = repr(render_config(config))
    assert WHSEC not in rendered and "s3cr3tpassw0rd" not in rendered
    assert "amqp://app:***@localhost:5672/" in rendered
    assert set(secret_values(config)) >= {WHSEC, "s3cr3tpassw0rd"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listener", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    """check-config prints the resolved config masked (exit 0) or one line per problem (exit 2)."""
    path = write(tmp_path, BASE)
    ok = run_cli("check-config", "--config", str(path), env={"GST_SECRET": WHSEC})
    assert ok.returncode == 0, ok.stderr
    assert WHSEC not in ok.stdout and "***" in ok.stdout
    bad = run_cli("check-config", "--config", str(path))
    assert bad.returncode == 2
    assert "GST_SECRET" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    run = run_cli("run", "--config", str(path))
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_stream_subscription_checked_against_provider(tmp_path: Path) -> None:
    """A subscription to an unknown channel or without its params is an error naming it."""
    text = (
        BASE
        + """
  - name: lx
    kind: websocket
    provider: layerx402
    url: ws://127.0.0.1:1/ws
    api_key: k
    subscriptions:
      - {channel: trades, params: {}}
      - {channel: nope}
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    assert caught.value.problems == [
        "sources[1].subscriptions[0].params: missing mint",
        "sources[1].subscriptions[1].channel: unknown channel 'nope' (known: portfolio, token, trades)",
    ]


@pytest.mark.parametrize(
    ("provider", "resources", "problem"),
    [
        (
            "tokenterminal",
            """
      - {endpoint: project_metrics, projects: [aave, uniswap], metrics: [fees]}
      - {endpoint: project_metrics, projects: [aave], metrics: [revenue]}""",
            "sources[1].resources[1]: 'aave' is polled by resources[0] too;"
            " list each item in one resource only",
        ),
        (
            "terrapin",
            """
      - {endpoint: bond_reference, isins: [US912810TM09, US91282CJL55]}
      - {endpoint: bond_reference, isins: [US912810TM09]}""",
            "sources[1].resources[1]: 'US912810TM09' is polled by resources[0] too;"
            " list each item in one resource only",
        ),
    ],
)
def test_an_item_polled_by_two_resources_is_refused(
    tmp_path: Path, provider: str, resources: str, problem: str
) -> None:
    """
    Two resources of one source polling one project (or ISIN) would overwrite each
    other's poll state: false changes, wrong previous values, repeated ids.
    """
    text = (
        BASE
        + f"""
  - name: polled
    kind: poll
    provider: {provider}
    url: http://127.0.0.1:1
    api_key: k
    resources:{resources}
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC})
    assert caught.value.problems == [problem]
