"""Run the real ``listener run`` as a child process: start, wait ready, SIGTERM, SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from listener.config_loader import load_config
from listener.exceptions import ConfigError
from tests import wire
from tests.conftest import UNIT, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ListenerProcess:
    """A ``python -m listener run`` child with its own config file, ports and log file."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.workdir = workdir
        self.public_port = free_port()
        self.admin_port = free_port()
        config = {
            **config,
            "http": {**config.get("http", {}), "host": "127.0.0.1", "port": self.public_port},
            "admin": {**config.get("admin", {}), "host": "127.0.0.1", "port": self.admin_port},
            "log": {"level": "info", "format": "json"},
        }
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        # What the child publishes is checked against its AsyncAPI document by the taps
        # (tests/wire.py); a configuration a test means to be bad registers nothing.
        with contextlib.suppress(ConfigError):
            wire.register(load_config(self.config_path, environ=self.env))
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = workdir / "listener.log"
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "listener",
            "run",
            "--config",
            str(self.config_path),
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        await wait_for(self._healthy, timeout=20, what="listener /healthz")

    async def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"listener exited {self.proc.returncode}: {self.logs()[-2000:]}")
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(
                    f"http://127.0.0.1:{self.admin_port}/healthz", timeout=aiohttp.ClientTimeout(1)
                ) as r,
            ):
                if r.status != 200:
                    return False
            # The admin port opens before the public one: wait for that too.
            _, writer = await asyncio.open_connection("127.0.0.1", self.public_port)
            writer.close()
            return True
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout * UNIT):
            return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            await self.wait()
