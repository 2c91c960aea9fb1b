"""
Configuration: YAML → frozen pydantic models, validated once (CONTRACT §3).

The loader is the only place that reads the environment. It

* replaces ``${VAR}`` (an error when unset) and ``${VAR:-default}``;
* turns every ``<key>_file: PATH`` into ``<key>: <contents of PATH>`` (secrets);
* rejects unknown keys (``extra="forbid"``);
* parses durations (``500ms``, ``30s``, ``5m``, ``2h``, ``7d``) into seconds and
  sizes (``512KiB``, ``1MiB``, ``1GiB``) into bytes;
* reports every problem at once, one line each, naming the key path
  (``sources[1].api_key``) or the missing variable, through :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from handlers import StreamProvider, WebhookProvider, load_provider
from listener.exceptions import ConfigError

__all__ = [
    "AdminConfig",
    "BrokerConfig",
    "Config",
    "HttpConfig",
    "JournalConfig",
    "SourceConfig",
    "StreamSourceConfig",
    "WebhookSourceConfig",
    "config_path",
    "load_config",
    "parse_duration",
    "parse_size",
    "render_config",
    "secret_values",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(value: object) -> float:
    """Parse ``500ms``/``30s``/``5m``/``2h``/``7d`` (or a number of seconds) into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s, 5m, 2h or 7d")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ValueError(f"expected a duration such as 500ms, 30s, 5m, 2h or 7d, got {value!r}")


def parse_size(value: object) -> int:
    """Parse ``512KiB``/``1MiB``/``1GiB`` (or a number of bytes) into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB, 1MiB or 1GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(float(match[1]) * _SIZE_UNITS[match[2]])
    raise ValueError(f"expected a size such as 512KiB, 1MiB or 1GiB, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": console on a terminal, JSON otherwise (an addition to the contract's two values).
    format: Literal["json", "console", "auto"] = "json"


class HttpConfig(_Model):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body: Size = 1024**2
    # A request body must arrive within this long; a slow drip is cut off.
    read_timeout: Duration = 30.0
    # Seconds sent in Retry-After with a 503.
    retry_after: int = Field(default=5, ge=1)


class ApiKeyConfig(_Model):
    key: SecretStr
    scopes: tuple[Literal["read", "write", "admin"], ...] = ("read",)

    @field_validator("key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("an admin API key must be at least 16 characters")
        return value


class AdminConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)
    api_keys: tuple[ApiKeyConfig, ...] = ()
    # Requests per key (or per client address without a key) per minute on /v1.
    rate_limit: int = Field(default=600, ge=1)


class ArchiveConfig(_Model):
    enabled: bool = True
    max_age: Duration = 7 * 86400.0


class BrokerConfig(_Model):
    url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: str = Field(default="events", min_length=1)
    archive: ArchiveConfig = ArchiveConfig()
    # Short, so a dead broker is noticed in seconds, not minutes (NOTES: aio-pika traps).
    heartbeat: Duration = 5.0
    # Deadline of our own around every publish (covers reconnect waits and blocked connections).
    publish_timeout: Duration = 10.0
    # Publishes awaiting a confirm at once.
    confirm_window: int = Field(default=256, ge=1, le=65535)
    connect_timeout: Duration = 5.0
    # First retry delay after a failed publish or connect; doubles up to retry_max.
    retry_initial: Duration = 0.5
    retry_max: Duration = 15.0

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"amqp", "amqps"}:
            raise ValueError("expected an amqp:// or amqps:// URL")
        return value


class JournalConfig(_Model):
    path: Path = Path("./data/journal.db")
    retention: Duration = 3 * 86400.0
    # Above either limit, webhooks get 503 and streams pause reading (CONTRACT §8).
    max_size: Size = 1024**3
    max_pending: int = Field(default=1_000_000, ge=1)
    # "full" fsyncs every group commit; "normal" survives a process crash but not power loss.
    synchronous: Literal["full", "normal"] = "full"
    # Most events written in one group commit.
    batch_max: int = Field(default=1024, ge=1)


class SignatureConfig(_Model):
    scheme: Literal["standard-webhooks", "stripe", "github", "hmac-sha256-hex"] = (
        "standard-webhooks"
    )
    secrets: tuple[SecretStr, ...] = Field(min_length=1)
    tolerance: Duration = 300.0
    # Header carrying the signature, for the schemes that let it be chosen.
    header: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SignatureConfig:
        if self.scheme == "standard-webhooks":
            from listener.signatures import decode_whsec  # noqa: PLC0415 - avoids a cycle

            for secret in self.secrets:
                decode_whsec(secret.get_secret_value())
        elif any(not s.get_secret_value() for s in self.secrets):
            raise ValueError("a secret must not be empty")
        return self


class _SourceBase(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    provider: str = Field(pattern=r"^[a-z][a-z0-9_]*$")


class WebhookSourceConfig(_SourceBase):
    kind: Literal["webhook"]
    path: str = Field(pattern=r"^/\S*$")
    environment: Literal["production", "sandbox"] = "production"
    signature: SignatureConfig
    # What to do with an event type the handler does not know (CONTRACT §5).
    unknown_types: Literal["publish", "quarantine"] = "publish"


class SubscriptionConfig(_Model):
    channel: str = Field(min_length=1)
    params: Mapping[str, str] = Field(default_factory=dict)


class ReconnectConfig(_Model):
    initial: Duration = 1.0
    max: Duration = 60.0
    # A connection up this long resets the backoff.
    healthy_after: Duration = 30.0


class StreamSourceConfig(_SourceBase):
    kind: Literal["websocket"]
    url: str = Field(pattern=r"^wss?://")
    api_key: SecretStr
    subscriptions: tuple[SubscriptionConfig, ...] = ()
    reconnect: ReconnectConfig = ReconnectConfig()
    # Reconnect a connection that has carried nothing (no event, no ping) for this long.
    stale_after: Duration = 60.0
    # Also reconnect when one active subscription has had no event this long (off when unset:
    # a quiet market is normal; set it for channels that always tick).
    subscription_stale_after: Duration | None = None
    # Appends in flight at once: many frames share one journal commit.
    journal_window: int = Field(default=512, ge=1)
    max_size: Size = 1024**2
    ping_interval: Duration = 20.0
    ping_timeout: Duration = 20.0
    open_timeout: Duration = 10.0


SourceConfig = Annotated[WebhookSourceConfig | StreamSourceConfig, Field(discriminator="kind")]


class Config(_Model):
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    admin: AdminConfig = AdminConfig()
    broker: BrokerConfig = BrokerConfig()
    journal: JournalConfig = JournalConfig()
    sources: tuple[SourceConfig, ...]
    # SIGTERM drains the journal to the broker for at most this long (CONTRACT §8).
    shutdown_timeout: Duration = 20.0

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("source names must be unique")
        paths = [s.path for s in self.sources if isinstance(s, WebhookSourceConfig)]
        if len(set(paths)) != len(paths):
            raise ValueError("webhook paths must be unique")
        return self


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
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})".replace("\n", " ")]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])

    problems: list[str] = []
    resolved = _resolve(raw, (), env, path.parent, problems)
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        # A key whose variable is missing fails validation too; report the cause only.
        unresolved = [p.split(": ", 1)[0] for p in problems]
        problems.extend(
            line
            for line in _describe(exc)
            if not any(_related(line.split(": ", 1)[0], key) for key in unresolved)
        )
        raise ConfigError(problems) from None
    problems.extend(_check_providers(config))
    if problems:
        raise ConfigError(problems)
    return config


def _check_providers(config: Config) -> Iterator[str]:
    for index, source in enumerate(config.sources):
        try:
            provider = load_provider(source.provider)
        except LookupError as exc:
            yield f"sources[{index}].provider: {exc}"
            continue
        expected = WebhookProvider if source.kind == "webhook" else StreamProvider
        if not isinstance(provider, expected) or provider.kind != source.kind:
            yield (
                f"sources[{index}].kind: provider {source.provider!r} is a "
                f"{provider.kind} provider, not {source.kind}"
            )
            continue
        if isinstance(source, StreamSourceConfig) and isinstance(provider, StreamProvider):
            for i, sub in enumerate(source.subscriptions):
                where = f"sources[{index}].subscriptions[{i}]"
                needs = provider.channels.get(sub.channel)
                if needs is None:
                    known = ", ".join(sorted(provider.channels))
                    yield f"{where}.channel: unknown channel {sub.channel!r} (known: {known})"
                elif missing := [p for p in needs if p not in sub.params]:
                    yield f"{where}.params: missing {', '.join(missing)}"


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
        if len(loc) >= 3 and loc[0] == "sources" and loc[2] in {"webhook", "websocket"}:
            del loc[2]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "union_tag_invalid":
            message = "kind must be 'webhook' or 'websocket'"
        yield f"{_key_path(tuple(loc))}: {message}"


def _resolve(
    value: Any,
    loc: tuple[str | int, ...],
    env: Mapping[str, str],
    base: Path,
    problems: list[str],
) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            key_s = str(key)
            if key_s.endswith("_file") and key_s != "_file":
                target = key_s.removesuffix("_file")
                if target in value:
                    problems.append(
                        f"{_key_path((*loc, key_s))}: give {target} or {key_s}, not both"
                    )
                    continue
                file_name = _resolve(item, (*loc, key_s), env, base, problems)
                out[target] = _read_secret_file(file_name, (*loc, key_s), base, problems)
            else:
                out[key_s] = _resolve(item, (*loc, key_s), env, base, problems)
        return out
    if isinstance(value, list):
        return [_resolve(item, (*loc, i), env, base, problems) for i, item in enumerate(value)]
    if isinstance(value, str):
        return _substitute(value, loc, env, problems)
    return value


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

    return _VAR.sub(replace, text)


def _read_secret_file(
    name: Any, loc: tuple[str | int, ...], base: Path, problems: list[str]
) -> Any:
    if isinstance(name, list):
        return [_read_secret_file(n, (*loc, i), base, problems) for i, n in enumerate(name)]
    if not isinstance(name, str):
        problems.append(f"{_key_path(loc)}: expected a file path")
        return None
    file = Path(name)
    if not file.is_absolute():
        file = base / file
    try:
        return file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{_key_path(loc)}: cannot read {name} ({exc.strerror})")
        return None


def mask_url(url: str) -> str:
    """``amqp://user:pass@host/`` → ``amqp://user:***@host/``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def secret_values(config: Config) -> list[str]:
    """Every secret string in ``config``, for the log redaction processor."""
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
            for field in type(value).model_fields:
                walk(getattr(value, field))
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)

    walk(config)
    # Longest first, so a secret that contains another is redacted whole.
    return sorted(set(found), key=len, reverse=True)


def render_config(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain data with every secret shown as ``***``."""

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, SecretStr):
            return mask_url(value.get_secret_value()) if key == "url" else "***"
        if isinstance(value, BaseModel):
            return {f: walk(getattr(value, f), f) for f in type(value).model_fields}
        if isinstance(value, tuple | list):
            return [walk(item, key) for item in value]
        if isinstance(value, Mapping):
            return {str(k): walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    rendered = walk(config, "")
    assert isinstance(rendered, dict)  # a model renders as a mapping
    return rendered
