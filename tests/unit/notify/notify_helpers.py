"""Shared builders for the notify tests."""

from __future__ import annotations

from typing import Any

from pipelines.notify.base import Channel, DeliveryResult, Recipient


def alert(alert_id: str = "a1", *, kind: str = "low_balance", severity: str = "WARNING", account: str | None = "M1",
          mall: str = "MALL1") -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": kind, "severity": severity, "mall_id": mall, "account_id": account,
            "meter_id": None, "ts_ms": 1_784_080_800_000, "message": f"{kind} for {account}", "details": {}}


class FakeNotifier:
    """Records sends; fails for alert ids listed in ``fail``."""

    def __init__(self, name: str, fail: set[str] | None = None, channel: Channel = Channel.SMS) -> None:
        self.name = name
        self.channel = channel
        self.fail = fail or set()
        self.sent: list[tuple[str, str]] = []

    async def send(self, alert: dict[str, Any], recipient: Recipient) -> DeliveryResult:
        self.sent.append((alert["alert_id"], recipient.key))
        ok = alert["alert_id"] not in self.fail
        return DeliveryResult(self.name, recipient.key, ok=ok, error=None if ok else "boom")

    async def close(self) -> None:
        return None


def config_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "providers": {"sms": {"type": "log", "channel": "sms"}, "voice": {"type": "log", "channel": "voice"},
                      "ops": {"type": "log"}},
        "routes": [
            {"kinds": ["low_balance", "credit_trip", "overload"], "providers": ["sms"]},
            {"kinds": ["*"], "min_severity": "CRITICAL", "providers": ["voice"]},
            {"kinds": ["relay_mismatch", "collector_offline"], "to": "mall_ops", "providers": ["ops"]},
        ],
        "recipients": {"merchants": {"M1": {"name": "Tea shop", "phone": "+8613800000001"},
                                     "M2": {"name": "Noodles", "phone": "+8613800000002"}},
                       "mall_ops": {"MALL1": {"name": "Ops desk", "phone": "+862000000000"}}},
        "rate_limit": {"per_hour": 2, "burst": 2, "critical": "bypass"},
    }
    data.update(over)
    return data
