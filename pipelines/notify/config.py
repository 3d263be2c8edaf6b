"""notify.yaml: providers, routes, recipients, rate limits, dedup. Errors name the field.

Provider entries are validated by the model registered for their ``type`` (see
``register_provider_type``), so a plug-in brings its own settings and its own errors.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from infra.redact import redact_mapping
from pipelines.notify.base import SEVERITY_RANK, Channel, Notifier, Recipient
from pipelines.notify.outbound import MIN_SECRET_BYTES, OutboundRefused, check_secret, check_url
from pipelines.notify.providers import LogNotifier, WebhookNotifier


class NotifyConfigError(ValueError):
    """A notify config that cannot be used; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Severity = Literal["INFO", "WARNING", "CRITICAL"]


class ProviderSettings(_Model):
    """Fields every provider has; plug-ins subclass this with their own."""

    type: str
    channel: Channel = Channel.LOG


class LogSettings(ProviderSettings):
    type: Literal["log"] = "log"


class WebhookSettings(ProviderSettings):
    type: Literal["webhook"] = "webhook"
    channel: Channel = Channel.SMS
    url: Annotated[str, Field(pattern=r"^https?://")]
    # SecretStr: a printed or logged settings object shows '**********', never the secret.
    secret: SecretStr | None = None
    secret_env: str | None = None  # name of an environment variable holding the secret
    allow_loopback_http: bool = False  # tests only: http:// to a loopback host
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0)] = 0.5
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must have at least {MIN_SECRET_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSettings:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret / secret_env")
        try:
            check_url(self.url, allow_loopback_http=self.allow_loopback_http)
        except OutboundRefused as exc:
            raise ValueError(f"url: {exc}") from None
        return self

    def secret_bytes(self) -> bytes:
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        value = os.environ.get(self.secret_env or "")
        if not value:
            raise NotifyConfigError(f"environment variable {self.secret_env} (webhook secret) is not set")
        try:
            return check_secret(value.encode(), f"environment variable {self.secret_env} (webhook secret)")
        except OutboundRefused as exc:
            raise NotifyConfigError(str(exc)) from None


Factory = Callable[[str, Any], Notifier]
PROVIDER_TYPES: dict[str, tuple[type[ProviderSettings], Factory]] = {
    "log": (LogSettings, lambda name, s: LogNotifier(name, s.channel)),
    "webhook": (WebhookSettings, lambda name, s: WebhookNotifier(
        name, s.url, s.secret_bytes(), channel=s.channel, timeout_s=s.timeout_s, retries=s.retries,
        backoff_s=s.backoff_s, headers=s.headers, allow_loopback_http=s.allow_loopback_http)),
}


def register_provider_type(type_name: str, settings: type[ProviderSettings], factory: Factory) -> None:
    """Plug a provider kind in (call it from a module listed under ``plugins:``)."""
    PROVIDER_TYPES[type_name] = (settings, factory)


class Route(_Model):
    """Alerts of these kinds (``"*"`` = any) at or above min_severity go to these providers."""

    kinds: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    min_severity: Severity = "INFO"
    malls: list[str] | None = None  # None: every mall
    to: Literal["merchant", "mall_ops", "both"] = "merchant"
    providers: list[str] = Field(min_length=1)

    def matches(self, alert: dict[str, Any]) -> bool:
        return (("*" in self.kinds or alert["kind"] in self.kinds)
                and SEVERITY_RANK.get(alert["severity"], 0) >= SEVERITY_RANK[self.min_severity]
                and (self.malls is None or alert["mall_id"] in self.malls))


class Contact(_Model):
    name: str = ""
    phone: str | None = None
    push_tokens: list[str] = Field(default_factory=list)
    language: str = "zh-CN"

    def recipient(self, key: str) -> Recipient:
        return Recipient(key, self.name, self.phone, tuple(self.push_tokens), self.language)


class Recipients(_Model):
    merchants: dict[str, Contact] = Field(default_factory=dict)  # merchant (account) id -> contact
    mall_ops: dict[str, Contact] = Field(default_factory=dict)  # mall id -> operations desk
    default_ops: Contact | None = None  # operations contact for malls not listed


class Budget(_Model):
    per_hour: Annotated[float, Field(gt=0)]
    burst: Annotated[int, Field(ge=1)] | None = None  # default: per_hour rounded up


class RateLimit(_Model):
    """Non-critical alerts: ``per_hour`` per recipient. CRITICAL: "bypass" or its own budget."""

    per_hour: Annotated[float, Field(gt=0)] = 6.0
    burst: Annotated[int, Field(ge=1)] | None = 3
    critical: Literal["bypass"] | Budget = "bypass"


class Dedup(_Model):
    capacity: Annotated[int, Field(ge=1)] = 100_000
    path: str | None = None  # persisted set of delivered keys (survives restarts)


class KafkaSettings(_Model):
    topic: str = "mallwatt.alerts"
    deadletter_topic: str = "mallwatt.deadletter"
    group: str = "mallwatt-notify"


class NotifyConfig(_Model):
    plugins: list[str] = Field(default_factory=list)  # modules that call register_provider_type
    providers: dict[str, dict[str, Any]] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    recipients: Recipients = Field(default_factory=Recipients)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    dedup: Dedup = Field(default_factory=Dedup)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    def provider_settings(self) -> dict[str, ProviderSettings]:
        return _provider_settings(self.providers)

    def __repr_args__(self) -> Any:
        # providers hold raw entries (secrets of plug-ins too): printed redacted
        for name, value in super().__repr_args__():
            yield name, (redact_mapping(value) if name == "providers" else value)


def _provider_settings(raw: dict[str, dict[str, Any]]) -> dict[str, ProviderSettings]:
    out: dict[str, ProviderSettings] = {}
    problems: list[str] = []
    for name, entry in raw.items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in PROVIDER_TYPES:
            problems.append(f"providers.{name}.type: unknown provider type {kind!r} "
                            f"(known: {sorted(PROVIDER_TYPES)})")
            continue
        try:
            out[name] = PROVIDER_TYPES[kind][0].model_validate(entry)
        except ValidationError as exc:
            problems += [f"{_path(('providers', name, *e['loc']))}: {e['msg']}" for e in exc.errors()]
    if problems:
        raise NotifyConfigError("\n".join(problems))
    return out


def _path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def parse_config(data: Any, source: str = "<notify config>") -> NotifyConfig:
    try:
        if isinstance(data, dict):
            for module in data.get("plugins") or []:
                importlib.import_module(module)
        config = NotifyConfig.model_validate(data)
        config.provider_settings()
    except ValidationError as exc:
        lines = [f"  {_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise NotifyConfigError(f"{source}: invalid notify config\n" + "\n".join(lines)) from None
    except NotifyConfigError as exc:
        lines = [f"  {line}" for line in str(exc).splitlines()]
        raise NotifyConfigError(f"{source}: invalid notify config\n" + "\n".join(lines)) from None
    except ImportError as exc:
        raise NotifyConfigError(f"{source}: plugins: cannot import {exc.name!r}") from None
    problems = [f"routes[{i}].providers: unknown provider {p!r}"
                for i, r in enumerate(config.routes) for p in r.providers if p not in config.providers]
    if problems:
        raise NotifyConfigError(f"{source}: invalid notify config\n  " + "\n  ".join(problems))
    return config


def load_config(path: str | Path) -> NotifyConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NotifyConfigError(f"{path}: cannot read notify config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise NotifyConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise NotifyConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, str(path))


def build_providers(config: NotifyConfig) -> dict[str, Notifier]:
    return {name: PROVIDER_TYPES[s.type][1](name, s) for name, s in config.provider_settings().items()}
