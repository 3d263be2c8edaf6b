"""The notifier plug-in contract: a provider sends one alert to one recipient on one channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

SEVERITY_RANK = {"INFO": 0, "WARNING": 1, "CRITICAL": 2}


class Channel(StrEnum):
    SMS = "sms"
    VOICE = "voice"
    APP_PUSH = "app_push"
    LOG = "log"  # operators' log / console only


@dataclass(frozen=True)
class Recipient:
    """Who receives a notification. ``key`` is the rate-limit and dedup identity."""

    key: str  # merchant id, or "ops:<mall id>" for a mall's operations desk
    name: str = ""
    phone: str | None = None
    push_tokens: tuple[str, ...] = ()
    language: str = "zh-CN"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "phone": self.phone,
                "push_tokens": list(self.push_tokens), "language": self.language}


@dataclass
class DeliveryResult:
    provider: str
    recipient: str
    ok: bool
    attempts: int = 1
    status: int | None = None  # HTTP status for HTTP providers
    error: str | None = None
    permanent: bool = False  # a failure retrying cannot fix (e.g. HTTP 400)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Notifier(Protocol):
    """A delivery provider. ``send`` must not raise for delivery problems: return ok=False."""

    name: str
    channel: Channel

    async def send(self, alert: dict[str, Any], recipient: Recipient) -> DeliveryResult: ...

    async def close(self) -> None: ...
