"""
SIGHUP: what of a re-read configuration applies while the daemon runs (CONTRACT §3).

:func:`plan_reload` compares the running configuration with the one just read (its
``*_file`` secrets read again too) and returns the configuration to run with: the
running one with the new **secrets** of the sources that are still configured (webhook
signing secrets, stream and poll API keys) and the new **admin API keys**. Every other
difference is listed as needing a restart and is not applied, so a reload can never
half-change a source: a new URL, interval or subscription waits for the restart the log
asks for. The service then hands the secrets to the transports (no connection is
dropped, no request is refused mid-way) and to the log redaction.

Secrets are recognised by type (``SecretStr``, or a tuple of them), never by name, so a
provider's new secret field is reloadable without a change here. Key paths are reported,
never values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from listener.config import Config

__all__ = ["ReloadPlan", "differences", "plan_reload"]

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The configuration to run with, and what changed."""

    config: Config
    #: Key paths of the secrets and admin keys that changed (applied).
    rotated: list[str] = field(default_factory=list)
    #: Key paths that changed but need a restart (not applied).
    restart: list[str] = field(default_factory=list)


def _is_secret(value: Any) -> bool:
    if isinstance(value, SecretStr):
        return True
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, SecretStr) for v in value)


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """The key paths where ``old`` and ``new`` differ (models, lists and mappings walked)."""
    if isinstance(old, BaseModel) and type(old) is type(new):
        found: list[str] = []
        for name in type(old).model_fields:
            found += differences(getattr(old, name), getattr(new, name), _join(path, name))
        return found
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [p for k in keys for p in differences(old.get(k), new.get(k), _join(path, str(k)))]
    if (
        isinstance(old, Sequence)
        and isinstance(new, Sequence)
        and not isinstance(old, str | bytes)
        and not isinstance(new, str | bytes)
        and len(old) == len(new)
        and not _is_secret(old)
    ):
        pairs = enumerate(zip(old, new, strict=True))
        return [p for i, (a, b) in pairs for p in differences(a, b, _join(path, i))]
    return [] if old == new else [path or "(root)"]


def _with_secrets(old: _M, new: _M) -> _M:
    """``old`` with every secret of ``new`` (recursing into sub-models of the same type)."""
    update: dict[str, Any] = {}
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if _is_secret(after) and (_is_secret(before) or before is None):
            update[name] = after
        elif isinstance(before, BaseModel) and type(before) is type(after):
            update[name] = _with_secrets(before, after)
    return old.model_copy(update=update)


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """What of ``new`` applies to a daemon running ``running`` (see the module docstring)."""
    rotated: list[str] = []
    restart: list[str] = []
    by_name = {source.name: source for source in new.sources}
    sources = []
    for index, source in enumerate(running.sources):
        where = f"sources[{index}]"
        fresh = by_name.get(source.name)
        if fresh is None or type(fresh) is not type(source):
            restart.append(f"{where} ({source.name}): removed or changed kind")
            sources.append(source)
            continue
        merged = _with_secrets(source, fresh)
        rotated += differences(source, merged, where)
        restart += differences(merged, fresh, where)
        sources.append(merged)
    known = {source.name for source in running.sources}
    restart += [f"sources ({s.name}): added" for s in new.sources if s.name not in known]
    admin = running.admin.model_copy(update={"api_keys": new.admin.api_keys})
    if admin.api_keys != running.admin.api_keys:
        rotated.append("admin.api_keys")
    restart += differences(admin, new.admin, "admin")
    for name in type(running).model_fields:
        if name not in ("sources", "admin"):
            restart += differences(getattr(running, name), getattr(new, name), name)
    config = running.model_copy(update={"sources": tuple(sources), "admin": admin})
    return ReloadPlan(config=config, rotated=rotated, restart=restart)
