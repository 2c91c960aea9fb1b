"""
Loading the configuration (CONTRACT §3): the only module that reads the environment.

* replaces ``${VAR}`` (an error when unset) and ``${VAR:-default}``;
* turns every ``<key>_file: PATH`` into ``<key>: <contents of PATH>`` (secrets);
* validates into the frozen models of :mod:`listener.config`, whose provider keys are
  validated by each provider's own ``settings_model``;
* reports every problem at once, one line each, naming the key path
  (``sources[1].api_key``) or the missing variable, through :class:`ConfigError`;
  a problem's line never holds the value (it may be a secret).
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from listener.config import Config, ProviderSettingsError
from listener.config_types import mask_url, url_secrets
from listener.exceptions import ConfigError

__all__ = [
    "config_path",
    "load_config",
    "render_config",
    "secret_values",
    "source_secret_values",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_KINDS = {"webhook", "websocket", "poll"}


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config`` if given, else ``$LISTENER_CONFIG``, else ``./config.yaml``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("LISTENER_CONFIG") or "config.yaml")


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """
    Read, resolve and validate the configuration at ``path``.

    Raises:
        ConfigError: with one line per problem.
    """
    env = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the configuration ({exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (at byte {exc.start})"]) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML{_where(exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])

    resolver = _Resolver(env, path.parent)
    resolved = resolver.resolve(raw, ())
    problems = resolver.problems
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        # A key whose variable is missing fails validation too; report the cause only.
        unresolved = [p.split(": ", 1)[0].removesuffix("_file") for p in problems]
        problems.extend(
            line
            for line in _describe(exc)
            if not any(_related(line.split(": ", 1)[0], key) for key in unresolved)
        )
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def recheck(config: Config) -> list[str]:
    """
    The problems of a configuration assembled from two (SIGHUP: the new file's secrets
    in the running settings), one line each as ``check-config`` prints them; none: it
    holds together (a standard-webhooks source given a secret that is no ``whsec_``).
    """
    try:
        # Only what was given: a default dumped beside its alternative reads as both given
        # (broker.url's, beside broker.urls: every reload of a cluster's file failed).
        Config.model_validate(config.model_dump(exclude_unset=True))
    except ValidationError as exc:
        return list(_describe(exc))
    return []


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key given twice in a mapping is an error (not the last kept)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked as written, once: flattening a merge writes the merged keys into the
        # node itself (a nested merge's node is flattened before it is constructed).
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, overridable
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable):
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice", key_node.start_mark
                        )
                    seen.add(key)
        super().flatten_mapping(node)


def _where(exc: yaml.YAMLError) -> str:
    # Not str(exc): it quotes the offending line, which may hold a secret.
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ""
    mark = exc.problem_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"


def _key_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))


def _describe(exc: ValidationError) -> Iterator[str]:
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        # Drop the discriminator tag pydantic inserts after sources[i].
        if len(loc) >= 3 and loc[0] == "sources" and loc[2] in _KINDS:
            del loc[2]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ProviderSettingsError):
            # The provider's keys: one line each, under the source's path.
            if cause.at_source and loc and loc[-1] == "settings":
                del loc[-1]
            for where, message in cause.lines:
                yield (
                    f"{_key_path(tuple(loc))}.{where}: {message}" if loc else f"{where}: {message}"
                )
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")
            message = "must be 'webhook', 'websocket' or 'poll'"
        yield f"{_key_path(tuple(loc))}: {message}"


@dataclass
class _Resolver:
    """Replaces placeholders and reads ``*_file`` secrets, noting each problem."""

    env: Mapping[str, str]
    base: Path  # relative ``*_file`` paths start here
    problems: list[str] = field(default_factory=list)
    inside: set[int] = field(default_factory=set)  # the containers being resolved

    def resolve(self, value: Any, loc: tuple[str | int, ...]) -> Any:
        if isinstance(value, str):
            return _substitute(value, loc, self.env, self.problems)
        if not isinstance(value, dict | list):
            return value
        if id(value) in self.inside:  # `a: &a [*a]`
            self.problems.append(f"{_key_path(loc)}: a YAML alias that holds itself")
            return None
        self.inside.add(id(value))
        try:
            if isinstance(value, list):
                return [self.resolve(item, (*loc, i)) for i, item in enumerate(value)]
            return self._mapping(value, loc)
        finally:
            self.inside.discard(id(value))

    def _mapping(self, value: dict[Any, Any], loc: tuple[str | int, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in value.items():
            key_s = str(key)
            if key_s.endswith("_file") and key_s != "_file":
                target = key_s.removesuffix("_file")
                if target in value:
                    self.problems.append(
                        f"{_key_path((*loc, key_s))}: give {target} or {key_s}, not both"
                    )
                    continue
                file_name = self.resolve(item, (*loc, key_s))
                out[target] = _read_secret_file(file_name, (*loc, key_s), self.base, self.problems)
            else:
                out[key_s] = self.resolve(item, (*loc, key_s))
        return out


def _substitute(
    text: str, loc: tuple[str | int, ...], env: Mapping[str, str], problems: list[str]
) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name in env:
            if env[name] == "" and default is not None:
                return default
            return env[name]
        if default is not None:
            return default
        problems.append(
            f"{_key_path(loc)}: environment variable {name} is not set "
            f"(set it, or write ${{{name}:-default}})"
        )
        return ""

    out, found = _VAR.subn(replace, text)
    if text.count("${") != found:  # `${A-x}`, `${A:x}`, `${A:-${B}}`: kept as text, silently
        problems.append(
            f"{_key_path(loc)}: a placeholder that is neither ${{NAME}} nor ${{NAME:-default}}"
        )
    return out


def _read_secret_file(
    name: Any, loc: tuple[str | int, ...], base: Path, problems: list[str]
) -> Any:
    if isinstance(name, list):
        # A list of files, each one secret or one per line: one flat list of secrets.
        found: list[Any] = []
        for i, n in enumerate(name):
            value = _read_secret_file(n, (*loc, i), base, problems)
            found.extend(value if isinstance(value, list) else [value])
        return found
    if not isinstance(name, str):
        problems.append(f"{_key_path(loc)}: expected a file path")
        return None
    file = Path(name)
    if not file.is_absolute():
        file = base / file
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{_key_path(loc)}: cannot read {name} ({exc.strerror})")
        return None
    except UnicodeDecodeError as exc:
        problems.append(f"{_key_path(loc)}: {name} is not UTF-8 text (at byte {exc.start})")
        return None
    # One secret, or several one per line (a rotation's overlap: old and new).
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if len(lines) > 1 else (lines[0] if lines else "")


def secret_values(config: Config) -> list[str]:
    """Every secret string in ``config``, for the log redaction processor."""
    return _secrets_in(config)


def source_secret_values(config: Config) -> list[str]:
    """
    The secrets of the sources (API keys, webhook secrets, source URL credentials): what
    a provider could send back, masked in its text (the broker's and the admin port's
    are not: ``guest`` masked in a quarantined payload changed the payload).
    """
    return _secrets_in(list(config.sources))


def _secrets_in(root: Any) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.append(secret)
            password = urlsplit(secret).password if "://" in secret else None
            if password:
                found.append(password)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                item = getattr(value, name)
                if name == "url" and isinstance(item, str):  # a source's, not a secret as such
                    found.extend(url_secrets(item))
                walk(item)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)

    walk(root)
    # Longest first, so a secret that contains another is redacted whole.
    return sorted(set(found), key=len, reverse=True)


def render_config(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain data with every secret shown as ``***``."""

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, SecretStr):
            return mask_url(value.get_secret_value()) if key in ("url", "urls") else "***"
        if key == "url" and isinstance(value, str):
            return mask_url(value, query=True)
        if isinstance(value, BaseModel):
            out = {f: walk(getattr(value, f), f) for f in type(value).model_fields}
            # A source's provider keys are written beside its own: show them there.
            settings = out.pop("settings", None)
            return {**out, **settings} if isinstance(settings, dict) else out
        if isinstance(value, tuple | list):
            return [walk(item, key) for item in value]
        if isinstance(value, Mapping):
            return {str(k): walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    rendered = walk(config, "")
    assert isinstance(rendered, dict)  # a model renders as a mapping
    if config.broker.urls:  # the nodes are used, not the default url
        del rendered["broker"]["url"]
    else:
        del rendered["broker"]["urls"]
    return rendered
