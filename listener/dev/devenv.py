"""
``python -m listener.dev.devenv .env``: development secrets for ``config.yaml`` in an
ignored ``.env``, so a fresh clone starts without any shipped secret. The file is
created with mode 600 from the start (never readable by others, even for an instant);
an existing file keeps its values (``NAME=`` or ``export NAME=``) and gains the ones it
lacks, and is made 600. Two at once (``make run`` beside ``make simulate``) take turns
on a lock: the second finds the first one's values, so both use the same secrets.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_dev_env"]

# Variable → how a fresh development value is made.
SECRETS: dict[str, Callable[[], str]] = {
    "GST_WEBHOOK_SECRET": lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
    "LAYERX402_API_KEY": lambda: f"dev_{secrets.token_urlsafe(24)}",
    "TOKENTERMINAL_API_KEY": lambda: f"dev_{secrets.token_urlsafe(24)}",
    "TERRAPIN_API_KEY": lambda: f"dev_{secrets.token_urlsafe(24)}",
    "LISTENER_ADMIN_KEY": lambda: f"adm_{secrets.token_urlsafe(32)}",
    # docker/compose.cluster.yaml's (hex: nothing to percent-encode in the broker URLs).
    "RABBITMQ_ERLANG_COOKIE": lambda: secrets.token_hex(32),
    "RABBITMQ_PASSWORD": lambda: secrets.token_hex(24),
}


def write_dev_env(path: Path) -> list[str]:
    """Give ``path`` every development secret it lacks; return the names added."""
    # O_CREAT with mode 600: the file never exists with wider permissions.
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:  # (made read-only, or on a read-only file system: read it, add nothing)
        fd, writable = os.open(path, os.O_RDONLY), False
    with os.fdopen(fd, "r+" if writable else "r", encoding="utf-8") as file:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (released as it closes)
        if (mode := os.fstat(fd).st_mode) & 0o077 and writable:
            with contextlib.suppress(OSError):  # (not ours to change: left as it is)
                os.fchmod(fd, mode & 0o700)  # (others' access taken away; the owner's kept)
        text = file.read()
        present = set()
        for line in text.splitlines():
            name, sep, _ = line.strip().removeprefix("export ").partition("=")
            if sep and not name.lstrip().startswith("#"):
                present.add(name.strip())
        missing = [name for name in SECRETS if name not in present]
        if not missing:
            return []
        if not writable:
            raise PermissionError(f"{path} lacks {', '.join(missing)} and is read-only")
        lines = (
            [] if text else ["# Development secrets, made by `make run`. Never commit this file."]
        )
        if text and not text.endswith("\n"):
            lines.append("")  # (the last line stays its own)
        lines += [f"{name}={SECRETS[name]()}" for name in missing]
        file.write("\n".join(lines) + "\n")
    return missing


def main(argv: list[str]) -> int:
    """Entry point: ``python -m listener.dev.devenv [PATH]``."""
    path = Path(argv[1] if len(argv) > 1 else ".env")
    added = write_dev_env(path)
    if added:
        print(f"listener: development secrets {', '.join(added)} written to {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
