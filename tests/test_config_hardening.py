"""
Configuration files an operator gets wrong (CONTRACT §2, §3): each is one line naming
the key (exit 2), never a traceback, never a secret; and `listener run` failing to start
or hung up while it starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import yaml

from listener import hangups
from listener.config import Config
from listener.config_loader import load_config, render_config, secret_values
from listener.exceptions import ConfigError
from tests.test_config import BASE, WHSEC, run_cli, write
from tests.test_poll import tt_source

LX = """
  - name: lx
    kind: websocket
    provider: layerx402
    url: {url}
    api_key: {key}
"""


def problems_of(tmp_path: Path, text: str, **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={"GST_SECRET": WHSEC, **environ})
    return caught.value.problems


def test_a_yaml_syntax_error_says_where_but_never_quotes_the_line(tmp_path: Path) -> None:
    """PyYAML's message quotes the offending line: a secret on it went to stderr and the log."""
    text = BASE + LX.format(url="wss://x/ws", key='"sk_live_SUPERSECRET123"xyz')
    (problem,) = problems_of(tmp_path, text)
    assert "not valid YAML at line 21, column" in problem
    assert "SUPERSECRET" not in problem


def test_text_that_is_not_utf8_is_one_problem_not_a_traceback(tmp_path: Path) -> None:
    """A Latin-1 config file, or secrets file, is named; UnicodeDecodeError escaped before."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"log:\n  level: info  # caf\xe9\nsources: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [f"{path}: not UTF-8 text (at byte 25)"]
    (tmp_path / "gst.secret").write_bytes(b"whsec_\xff\xfe\n")
    text = BASE.replace('secrets: ["${GST_SECRET}"]', "secrets_file: gst.secret")
    assert problems_of(tmp_path, text) == [
        "sources[0].signature.secrets_file: gst.secret is not UTF-8 text (at byte 6)"
    ]
    bad = run_cli("check-config", "--config", str(path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_key_given_twice_is_refused_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: `broker:` twice silently lost the first."""
    twice = "broker: {exchange: mine}\n" + BASE
    (problem,) = problems_of(tmp_path, twice)
    assert problem.endswith("at line 3, column 1: the key 'broker' is given twice"), problem
    (problem,) = problems_of(
        tmp_path, BASE.replace("tolerance: 90s", "tolerance: 90s\n      tolerance: 1s")
    )
    assert "the key 'tolerance' is given twice" in problem
    merged = BASE.replace(
        "journal:\n  retention: 2h",
        "journal: &j\n  retention: 2h\n  dedupe_window: 1d\nx: &x {retention: 1h}",
    )
    # (`x` is an unknown key: the merge itself is fine, and one line says so)
    assert problems_of(tmp_path, merged) == ["x: unknown key"]
    config = load_config(
        write(
            tmp_path,
            BASE.replace(
                "journal:\n  retention: 2h", "journal:\n  <<: {retention: 1h}\n  retention: 2h"
            ),
        ),
        environ={"GST_SECRET": WHSEC},
    )
    assert config.journal.retention == 7200


def test_nested_merges_are_not_keys_given_twice(tmp_path: Path) -> None:
    """A merge of a merge was flattened into its node before the check read it."""
    text = (
        "x-a: &a {retention: 1h, dedupe_window: 1d}\n"
        "x-b: &b {<<: *a, retention: 2h}\n"
        "journal: {<<: *b, dedupe_window: 2d}\n"
    )
    problems = problems_of(tmp_path, text + BASE.replace("journal:\n  retention: 2h\n", ""))
    assert problems == ["x-a: unknown key", "x-b: unknown key"]


def test_an_alias_that_holds_itself_is_one_problem(tmp_path: Path) -> None:
    """`a: &a [*a]` recursed until RecursionError."""
    assert problems_of(tmp_path, "loop: &a [*a]\n" + BASE) == [
        "loop[0]: a YAML alias that holds itself"
    ]


@pytest.mark.parametrize(
    "placeholder", ["${HOST-0.0.0.0}", "${LX-KEY}", "${HOST:0.0.0.0}", "${A:-${B}}", "${"]
)
def test_a_placeholder_that_is_not_one_is_refused(tmp_path: Path, placeholder: str) -> None:
    """Such text was kept as it was: an http.host of `${HOST-0.0.0.0}`, an api_key of `${LX-KEY}`."""
    text = BASE + f'  host: "{placeholder}"\n'.replace("  host", "http:\n  host")
    problems = problems_of(tmp_path, text.replace("http:\n  max_body: 512KiB\n", ""), B="b")
    assert problems == ["http.host: a placeholder that is neither ${NAME} nor ${NAME:-default}"]


def test_an_empty_api_key_is_refused(tmp_path: Path) -> None:
    """A variable set to "" (or an empty file) gave a source no key, shown as `***`."""
    text = BASE + LX.format(url="wss://x/ws", key="${LX_KEY}")
    assert problems_of(tmp_path, text, LX_KEY="") == ["sources[1].api_key: must not be empty"]
    assert problems_of(tmp_path, text, LX_KEY="  ") == ["sources[1].api_key: must not be empty"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("broker.heartbeat", math.inf, "less than or equal to 65535"),
        ("broker.connect_timeout", "0s", "greater than 0"),
        ("broker.retry_max", "0s", "greater than 0"),
        ("broker.publish_timeout", "0ms", "greater than 0"),
        ("http.max_body", 0, "greater than 0"),
        ("http.read_timeout", "0s", "greater than 0"),
        ("journal.max_size", 0, "greater than 0"),
        ("journal.dedupe_window", math.inf, "at most 3650d"),
        ("shutdown_timeout", 10**400, "at most 3650d"),
        ("journal.max_size", "99999999999999999999999GiB", "at most 1048576GiB"),
        ("broker.exchange", "amq.topic", "reserved by RabbitMQ"),
        ("broker.exchange", "x" * 65, "at most 64 characters"),
    ],
)
def test_values_that_cannot_work_are_refused(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    """Each passed check-config, then hot-looped (a 0s retry), crashed (`.inf`) or failed every publish."""
    raw = yaml.safe_load(BASE)
    *sections, name = key.split(".")
    place = raw
    for section in sections:
        place = place.setdefault(section, {})
    place[name] = value
    (problem,) = problems_of(tmp_path, yaml.safe_dump(raw, width=1000))
    assert problem.startswith(f"{key}: ") and message in problem, problem


@pytest.mark.parametrize(
    "value",
    [[0, "1m"], [5, "0s"], [-1, "1m"], [True, "1m"], [5, math.inf], [5, math.nan], "0/1m"],
)
def test_a_rate_limit_that_cannot_work_is_refused(tmp_path: Path, value: object) -> None:
    """Written as a YAML list it skipped the checks: the daemon then crashed at its start."""
    source = tt_source("http://127.0.0.1:1", rate_limit=value)
    text = yaml.safe_dump({"broker": {"url": "amqp://u:p@127.0.0.1/"}, "sources": [source]})
    (problem,) = problems_of(tmp_path, text)
    assert problem.startswith("sources[0].rate_limit: "), problem
    kept = Config.model_validate({"sources": [{**source, "rate_limit": [5, "1m"]}]})
    assert kept.sources[0].rate_limit == (5, 60.0)  # (as a SIGHUP's check reads it back)


def test_clashes_name_each_key(tmp_path: Path) -> None:
    """Two sources with one name or path, and the two ports on one address, each name the key."""
    source = BASE.split("sources:\n", 1)[1]
    text = BASE + source + "admin:\n  port: 8080\n"
    assert problems_of(tmp_path, text) == [
        "sources[1].name: sources[0] has it too",
        "sources[1].path: sources[0] has it too",
        "admin.port: http.port is the same port on the same address",
    ]
    apart = (
        BASE.replace("http:\n", "http:\n  host: 127.0.0.1\n")
        + "admin:\n  port: 8080\n  host: 127.0.0.2\n"
    )
    load_config(write(tmp_path, apart), environ={"GST_SECRET": WHSEC})
    families = apart.replace("127.0.0.1", "0.0.0.0").replace("127.0.0.2", "'::1'")
    load_config(write(tmp_path, families), environ={"GST_SECRET": WHSEC})  # (v4 any, v6 one)
    assert problems_of(tmp_path, BASE + "  - {name: x, provider: getstoken}\n") == [
        "sources[1].kind: must be 'webhook', 'websocket' or 'poll'"
    ]


def test_a_source_urls_credentials_are_masked_and_redacted(tmp_path: Path) -> None:
    """check-config printed `wss://user:hunter2pass@host/ws?token=tok_SECRET` as written."""
    url = "wss://user:hunter2pass@api.example/ws?token=tok_SECRET123&v=1"
    config = load_config(
        write(tmp_path, BASE + LX.format(url=url, key="k-123")), environ={"GST_SECRET": WHSEC}
    )
    rendered = repr(render_config(config))
    assert "wss://user:***@api.example/ws?token=***&v=***" in rendered
    assert "hunter2pass" not in rendered and "tok_SECRET123" not in rendered
    assert {"hunter2pass", "tok_SECRET123"} <= set(secret_values(config))


def daemon_config(tmp_path: Path, http_port: int) -> Path:
    return write(
        tmp_path,
        f"""
broker: {{url: "amqp://guest:guest@127.0.0.1:1/", exchange: cfg-hardening}}
journal: {{path: {tmp_path / "journal.db"}}}
http: {{host: 127.0.0.1, port: {http_port}}}
admin: {{host: 127.0.0.1, port: 0}}
sources: []
""",
    )


def test_run_on_a_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """The bind fails inside the service's TaskGroup: an ExceptionGroup went past `except OSError`."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = run_cli("run", "--config", str(daemon_config(tmp_path, held.getsockname()[1])))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("listener: cannot start: ")
    assert "address already in use" in result.stderr


def test_hangups_are_noted_until_the_loop_handles_them() -> None:
    """After note(), a SIGHUP or a SIGTERM does not end the process: it is remembered."""
    previous = {
        sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    }
    try:
        hangups.note()
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # (a signal is handled between two bytecodes of the main thread)
        assert hangups.hung_up() and not hangups.stopped()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert hangups.stopped()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        hangups._hangups.clear()
        hangups._stops.clear()


def _noting_then(
    tmp_path: Path, sig: signal.Signals, out: IO[str] | int = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """`listener run`, sent ``sig`` at the first moment it can be noted (before its imports)."""
    path = daemon_config(tmp_path, 0)
    script = (
        "import os, signal, sys\n"
        f"sys.argv = ['listener', 'run', '--config', {str(path)!r}]\n"
        "from listener import hangups\n"
        "noted = hangups.note\n"
        "def note():\n"
        "    noted()\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "hangups.note = note\n"
        "from listener.__main__ import main\n"
        "main()\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_daemon_starts_is_a_clean_shutdown(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """It took the default action: exit 143, or a KeyboardInterrupt traceback (130)."""
    with _noting_then(tmp_path, sig) as proc:
        out, _ = proc.communicate(timeout=60)
    logs = out.decode()
    assert proc.returncode == 0, logs[-2000:]
    assert "Traceback" not in logs and "shutdown_complete" in logs


def test_hangups_during_the_shutdown_neither_fail_nor_change_the_exit(tmp_path: Path) -> None:
    """
    A SIGHUP after the drain began logged a reload failure with a traceback; one in the
    milliseconds after the loop closed killed the process (exit 129 for a clean stop).
    """
    with (
        (tmp_path / "daemon.log").open("w") as out,
        subprocess.Popen(
            [sys.executable, "-m", "listener", "run", "--config", str(daemon_config(tmp_path, 0))],
            stdout=out,
            stderr=out,
        ) as proc,
    ):
        deadline = time.monotonic() + 30
        while '"listener_started"' not in (tmp_path / "daemon.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:  # (until it has exited, a SIGHUP every few ms)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)
            time.sleep(0.003)
    logs = (tmp_path / "daemon.log").read_text()
    assert proc.returncode == 0, logs[-2000:]
    assert "Traceback" not in logs and "config_reload_failed" not in logs


def test_a_journal_lock_that_cannot_be_made_is_one_line_exit_2(tmp_path: Path) -> None:
    """The lock file came first, and its OSError was a bare errno with exit 1."""
    (tmp_path / "file").write_text("not a directory")
    config = daemon_config(tmp_path, 0)
    config.write_text(
        config.read_text().replace(
            str(tmp_path / "journal.db"), str(tmp_path / "file" / "journal.db")
        )
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "listener: cannot start: the journal lock " in result.stderr


def test_a_sighup_while_the_daemon_starts_reloads_it_instead_of_killing_it(
    tmp_path: Path,
) -> None:
    """
    A SIGHUP before the event loop handled it took its default action: the daemon
    died (exit 129) with nothing said. Here it arrives at the first moment it can be
    noted, before every import of `listener run`.
    """
    log = tmp_path / "daemon.log"
    with log.open("w") as out, _noting_then(tmp_path, signal.SIGHUP, out) as proc:
        deadline = time.monotonic() + 30
        # (started too: a SIGTERM while the journal opens ends it before it starts)
        while proc.poll() is None and not all(
            f'"{event}"' in log.read_text() for event in ("config_reloaded", "listener_started")
        ):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    logs = log.read_text()
    assert proc.returncode == 0, logs[-2000:]
    assert '"config_reloaded"' in logs and '"listener_started"' in logs
