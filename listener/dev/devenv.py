"""
``python -m listener.devenv .env``: write fresh development secrets to an ignored
``.env`` file on first run, so a fresh clone starts without any shipped secret.
"""

from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path

__all__ = ["write_dev_env"]


def write_dev_env(path: Path) -> bool:
    """Create ``path`` with random secrets unless it exists; return whether it was created."""
    if path.exists():
        return False
    whsec = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    lines = [
        "# Development secrets, generated on first `make run`. Never commit this file.",
        f"GST_WEBHOOK_SECRET={whsec}",
        f"LAYERX402_API_KEY=dev_{secrets.token_urlsafe(24)}",
        f"LISTENER_ADMIN_KEY=adm_{secrets.token_urlsafe(32)}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return True


def main(argv: list[str]) -> int:
    """Entry point: ``python -m listener.devenv [PATH]``."""
    path = Path(argv[1] if len(argv) > 1 else ".env")
    if write_dev_env(path):
        print(f"listener: generated development secrets in {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
