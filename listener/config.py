"""
Configuration models: YAML → frozen pydantic models, validated once (CONTRACT §3).

:mod:`listener.config_loader` reads the file and the environment; this module holds
the shape. Unknown keys are errors (``extra="forbid"``); durations (``500ms``,
``30s``, ``5m``, ``2h``, ``7d``) become seconds and sizes (``512KiB``, ``1MiB``,
``1GiB``) bytes. Each source is a transport's model (``kind``); the keys only its
provider understands are validated by that provider's ``settings_model`` and kept
in ``settings`` (STYLE: each provider's settings model lives with its handler).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from handlers import load_provider
from listener.config_types import (
    Duration,
    Exchange,
    PositiveDuration,
    PositiveSize,
    Secret,
    check_amqp_url,
    mask_url,
    parse_duration,
    parse_rate,
    parse_size,
)
from listener.config_types import Model as _Model
from listener.sources.signatures import decode_whsec

__all__ = [
    "AdminConfig",
    "BrokerConfig",
    "ClusterConfig",
    "Config",
    "HttpConfig",
    "JournalConfig",
    "PollSourceConfig",
    "ProviderSettingsError",
    "SourceConfig",
    "StreamSourceConfig",
    "WebhookSourceConfig",
    "check_amqp_url",
    "mask_url",
    "parse_duration",
    "parse_rate",
    "parse_size",
]


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": console on a terminal, JSON otherwise (an addition to the contract's two values).
    format: Literal["json", "console", "auto"] = "json"


class HttpConfig(_Model):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body: PositiveSize = 1024**2
    # A request body must arrive within this long; a slow drip is cut off.
    read_timeout: PositiveDuration = 30.0
    # Seconds sent in Retry-After with a 503.
    retry_after: int = Field(default=5, ge=1)
    # Open connections at most: one more closes the longest idle one (listener.fast_http).
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)


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
    max_age: PositiveDuration = 7 * 86400.0


def _checked_url(url: SecretStr) -> SecretStr:
    check_amqp_url(url.get_secret_value())
    return url


class BrokerConfig(_Model):
    url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: Exchange = "events"
    archive: ArchiveConfig = ArchiveConfig()
    # Several nodes of one cluster, tried in order (instead of `url`; CONTRACT §10).
    urls: tuple[Annotated[SecretStr, AfterValidator(_checked_url)], ...] = ()
    # The quarantine queue's type: quorum replicates it over the cluster's nodes.
    queue_type: Literal["classic", "quorum"] = "classic"
    # Short, so a dead broker is noticed in seconds, not minutes (NOTES: aio-pika traps);
    # 3 s when cluster.enabled and not set (a lost holder is noticed within two).
    heartbeat: Duration = Field(default=5.0, le=65535)
    # Deadline of our own around every publish (covers reconnect waits and blocked connections).
    publish_timeout: PositiveDuration = 10.0
    # Publishes awaiting a confirm at once.
    confirm_window: int = Field(default=2048, ge=1, le=65535)
    connect_timeout: PositiveDuration = 5.0
    # First retry delay after a failed publish or connect; doubles up to retry_max.
    retry_initial: Duration = 0.5
    retry_max: PositiveDuration = 15.0

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        check_amqp_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _url_or_urls(self) -> BrokerConfig:
        if self.urls and "url" in self.model_fields_set:
            raise ValueError("give broker.url or broker.urls, not both")
        return self

    @property
    def nodes(self) -> tuple[SecretStr, ...]:
        """The broker URLs to try, in order: ``urls``, else ``url``."""
        return self.urls or (self.url,)


class ClusterConfig(_Model):
    # True when several replicas run: streams and polls are units held under a lease.
    enabled: bool = False
    # How often a standby tries a free unit (with jitter).
    lease_retry: Duration = Field(default=2.0, gt=0)


class JournalConfig(_Model):
    path: Path = Path("./data/journal.db")
    retention: Duration = 3 * 86400.0
    # Above either limit, webhooks get 503 and streams pause reading (CONTRACT §8).
    max_size: PositiveSize = 1024**3
    max_pending: int = Field(default=1_000_000, ge=1)
    # "full" fsyncs every group commit; "normal" survives a process crash but not power loss.
    synchronous: Literal["full", "normal"] = "full"
    # Most events written in one group commit.
    batch_max: int = Field(default=1024, ge=1)
    # An event's id stays a duplicate at least this long after its receipt (its pruned
    # row leaves a tombstone for it), so a captured request replayed after `retention`
    # (schemes without a timestamp: github, hmac-sha256-hex) is still one. Never
    # shorter than retention.
    dedupe_window: Duration = 30 * 86400.0

    @model_validator(mode="after")
    def _window(self) -> JournalConfig:
        if self.dedupe_window < self.retention:
            raise ValueError("dedupe_window must not be shorter than retention")
        return self


class SignatureConfig(_Model):
    scheme: Literal["standard-webhooks", "stripe", "github", "hmac-sha256-hex"] = (
        "standard-webhooks"
    )
    secrets: tuple[SecretStr, ...] = Field(min_length=1)
    tolerance: PositiveDuration = 300.0
    # Header carrying the signature, for the schemes that let it be chosen.
    header: str | None = None

    @field_validator("secrets", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # `secrets_file: current.secret` holding a single secret reads as one string.
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SignatureConfig:
        if self.scheme == "standard-webhooks":
            for secret in self.secrets:
                decode_whsec(secret.get_secret_value())
        elif any(not s.get_secret_value() for s in self.secrets):
            raise ValueError("a secret must not be empty")
        return self


class ProviderSettingsError(ValueError):
    """
    A source's provider keys do not validate, or its provider does not fit: ``lines``
    are ``(key path inside the source, message)``, reported as ``sources[i].<path>``.
    """

    def __init__(self, lines: list[tuple[str, str]], *, at_source: bool = False) -> None:
        self.lines = lines
        #: Raised for the ``settings`` field: its lines belong to the source itself.
        self.at_source = at_source
        super().__init__("; ".join(f"{where}: {what}" for where, what in lines))


def _settings_lines(exc: ValidationError) -> list[tuple[str, str]]:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append((where, message))
    return lines


class _SourceBase(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    provider: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    #: The provider's own keys, validated by its ``settings_model``.
    settings: Any = None

    @model_validator(mode="before")
    @classmethod
    def _collect_settings(cls, data: Any) -> Any:
        # Keys this transport does not define belong to the provider: validated by its
        # settings model after (an unknown key is reported there, by its name).
        if not isinstance(data, Mapping) or "settings" in data:
            return data
        data = cls._defaults(data)
        own = set(cls.model_fields) - {"settings"}
        out = {k: v for k, v in data.items() if k in own}
        out["settings"] = {k: v for k, v in data.items() if k not in own}
        return out

    @classmethod
    def _defaults(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The keys left out that have a default of the source's own (its provider's URL)."""
        if "url" in data or "url" not in cls.model_fields:
            return data
        with contextlib.suppress(LookupError, TypeError, AttributeError):  # (reported later)
            return {**data, "url": load_provider(data["provider"]).default_url}
        return data

    @field_validator("settings")
    @classmethod
    def _provider_settings(cls, value: Any, info: ValidationInfo) -> Any:
        # Validated here, not after the model, so a wrong provider key is reported
        # beside the other problems of the source.
        name = info.data.get("provider")
        if name is None:
            return value  # the provider's own problem is reported already
        try:
            provider = load_provider(name)
        except LookupError as exc:
            raise ProviderSettingsError([("provider", str(exc))], at_source=True) from None
        if isinstance(value, provider.settings_model):
            return value
        try:
            return provider.settings_model.model_validate(value or {})
        except ValidationError as exc:
            raise ProviderSettingsError(_settings_lines(exc), at_source=True) from None

    @model_validator(mode="after")
    def _bind_provider(self) -> Any:
        provider = load_provider(self.provider)  # found by the field validator already
        kind = getattr(self, "kind", None)
        if provider.kind != kind:
            raise ProviderSettingsError(
                [("kind", f"provider {self.provider!r} is a {provider.kind} provider, not {kind}")]
            )
        self._check_with(provider)
        return self

    def _check_with(self, provider: Any) -> None:
        """Transport checks that need the provider (a stream's channels)."""


class WebhookSourceConfig(_SourceBase):
    kind: Literal["webhook"]
    path: str = Field(pattern=r"^/\S*$")  # default: /webhooks/<name>
    signature: SignatureConfig

    @classmethod
    def _defaults(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        name = data.get("name")
        return {**data, "path": f"/webhooks/{name}"} if "path" not in data and name else data


class SubscriptionConfig(_Model):
    channel: str = Field(min_length=1)
    params: Mapping[str, str] = Field(default_factory=dict)


class ReconnectConfig(_Model):
    initial: Duration = 1.0
    max: PositiveDuration = 60.0
    # A connection up this long resets the backoff.
    healthy_after: Duration = 30.0


class StreamSourceConfig(_SourceBase):
    kind: Literal["websocket"]
    url: str = Field(pattern=r"^wss?://")
    api_key: Secret
    subscriptions: tuple[SubscriptionConfig, ...] = ()
    reconnect: ReconnectConfig = ReconnectConfig()
    # Reconnect a connection that has carried nothing (no event, no ping) for this long.
    stale_after: PositiveDuration = 60.0
    # Also reconnect when one active subscription has had no event this long (off when unset:
    # a quiet market is normal; set it for channels that always tick).
    subscription_stale_after: PositiveDuration | None = None
    # Appends in flight at once: many frames share one journal commit.
    journal_window: int = Field(default=512, ge=1)
    max_size: PositiveSize = 1024**2
    ping_interval: PositiveDuration = 20.0
    ping_timeout: PositiveDuration = 20.0
    open_timeout: PositiveDuration = 10.0

    def _check_with(self, provider: Any) -> None:
        problems = []
        for i, sub in enumerate(self.subscriptions):
            where = f"subscriptions[{i}]"
            needs = provider.channels.get(sub.channel)
            if needs is None:
                known = ", ".join(sorted(provider.channels))
                problems.append(
                    (f"{where}.channel", f"unknown channel {sub.channel!r} (known: {known})")
                )
            elif missing := [p for p in needs if p not in sub.params]:
                problems.append((f"{where}.params", f"missing {', '.join(missing)}"))
        if problems:
            raise ProviderSettingsError(problems)


class PollSourceConfig(_SourceBase):
    kind: Literal["poll"]
    url: str = Field(pattern=r"^https?://\S+$")
    api_key: Secret
    # Between the starts of two polls of a resource (±10% jitter).
    interval: Duration = Field(default=3600.0, gt=0)
    # Requests per window for the whole source, redirects and retries included.
    rate_limit: Annotated[tuple[int, float], BeforeValidator(parse_rate)] = (60, 60.0)
    initial: Literal["snapshot", "silent"] = "snapshot"
    resources: tuple[Any, ...] = Field(min_length=1)
    # Per request; 5xx and network errors are retried within a poll this many times.
    request_timeout: Duration = Field(default=30.0, gt=0)
    retries: int = Field(default=4, ge=0, le=20)

    def _check_with(self, provider: Any) -> None:
        checked, problems = [], []
        for i, resource in enumerate(self.resources):
            if isinstance(resource, provider.resource_model):
                checked.append(resource)
                continue
            try:
                checked.append(provider.resource_model.model_validate(resource))
            except ValidationError as exc:
                problems += [(f"resources[{i}].{w}", m) for w, m in _settings_lines(exc)]
        # An item (a project, an ISIN) in two resources: the records of both would share
        # keys, and each resource's poll would overwrite the other's state (false
        # changes, changes shown with the wrong previous values, ids repeated).
        first: dict[str, int] = {}
        for i, resource in enumerate(checked if not problems else ()):
            for request in provider.plan(resource, aliases={}, today=date.today()):
                for item in request.items:
                    if first.setdefault(item, i) != i:
                        problems.append(
                            (
                                f"resources[{i}]",
                                f"{item!r} is polled by resources[{first[item]}] too;"
                                " list each item in one resource only",
                            )
                        )
        if problems:
            raise ProviderSettingsError(problems)
        object.__setattr__(self, "resources", tuple(checked))


SourceConfig = Annotated[
    WebhookSourceConfig | StreamSourceConfig | PollSourceConfig, Field(discriminator="kind")
]


CLUSTER_HEARTBEAT = 3.0


def _overlap(a: str, b: str) -> bool:
    """Whether two listening addresses take one port: the same, or one any-address of its family."""
    if a == b or {a, b} & {"", "::"}:  # (`::` takes IPv4 too, on Linux by default)
        return True
    other = b if a == "0.0.0.0" else a if b == "0.0.0.0" else None
    return other is not None and ":" not in other  # (IPv4's any-address, an IPv4 one)


class Config(_Model):
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    admin: AdminConfig = AdminConfig()
    broker: BrokerConfig = BrokerConfig()
    journal: JournalConfig = JournalConfig()
    cluster: ClusterConfig = ClusterConfig()
    sources: tuple[SourceConfig, ...]
    # SIGTERM drains the journal to the broker for at most this long (CONTRACT §8).
    shutdown_timeout: Duration = 20.0

    @model_validator(mode="after")
    def _unique(self) -> Config:
        problems, names, paths = [], dict[str, int](), dict[str, int]()
        for i, source in enumerate(self.sources):
            if names.setdefault(source.name, i) != i:
                problems.append((f"sources[{i}].name", f"sources[{names[source.name]}] has it too"))
            if isinstance(source, WebhookSourceConfig) and paths.setdefault(source.path, i) != i:
                problems.append((f"sources[{i}].path", f"sources[{paths[source.path]}] has it too"))
        http, admin = self.http, self.admin
        if http.port and http.port == admin.port and _overlap(http.host, admin.host):
            problems.append(("admin.port", "http.port is the same port on the same address"))
        if problems:
            raise ProviderSettingsError(problems)
        if self.cluster.enabled and "heartbeat" not in self.broker.model_fields_set:
            # Detection within two heartbeats is part of the failover promise (CONTRACT §10).
            broker = self.broker.model_copy(update={"heartbeat": CLUSTER_HEARTBEAT})
            object.__setattr__(self, "broker", broker)
        return self
