"""Routing, dedup and rate limiting around the providers. No Kafka here (see service.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines import metrics as M
from pipelines.notify.base import DeliveryResult, Notifier, Recipient
from pipelines.notify.config import NotifyConfig, build_providers
from pipelines.notify.dedup import Dedup
from pipelines.notify.ratelimit import RateLimiter

log = logging.getLogger("mallwatt.notify")


@dataclass(frozen=True)
class Target:
    provider: str
    recipient: Recipient

    def key(self, alert_id: str) -> str:
        return f"{alert_id}|{self.provider}|{self.recipient.key}"


class Router:
    """Which providers and recipients an alert goes to: the union of every matching route."""

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config

    def recipients(self, alert: dict[str, Any], to: str) -> list[Recipient]:
        r = self.config.recipients
        out: list[Recipient] = []
        account = alert.get("account_id")
        if to in ("merchant", "both") and account and account in r.merchants:
            out.append(r.merchants[account].recipient(account))
        if to in ("mall_ops", "both"):
            contact = r.mall_ops.get(alert["mall_id"], r.default_ops)
            if contact is not None:
                out.append(contact.recipient(f"ops:{alert['mall_id']}"))
        return out

    def targets(self, alert: dict[str, Any]) -> list[Target]:
        seen: dict[tuple[str, str], Target] = {}
        for route in self.config.routes:
            if not route.matches(alert):
                continue
            for recipient in self.recipients(alert, route.to):
                for provider in route.providers:
                    seen.setdefault((provider, recipient.key), Target(provider, recipient))
        return list(seen.values())


@dataclass
class Outcome:
    alert_id: str
    status: str  # sent | partial | failed | duplicate | rate_limited | no_route | error
    results: list[DeliveryResult] = field(default_factory=list)
    already_delivered: int = 0
    rate_limited: list[str] = field(default_factory=list)  # recipient keys
    error: str | None = None

    @property
    def failures(self) -> list[DeliveryResult]:
        return [r for r in self.results if not r.ok]


class Dispatcher:
    def __init__(self, router: Router, providers: Mapping[str, Notifier], dedup: Dedup, limiter: RateLimiter,
                 *, concurrency: int = 16) -> None:
        self.router = router
        self.providers = dict(providers)
        self.dedup = dedup
        self.limiter = limiter
        self._concurrency = concurrency

    @classmethod
    def from_config(cls, config: NotifyConfig, *, clock: Callable[[], float] = time.monotonic,
                    providers: Mapping[str, Notifier] | None = None) -> Dispatcher:
        rl = config.rate_limit
        crit = None if rl.critical == "bypass" else rl.critical
        limiter = RateLimiter(rl.per_hour, rl.burst, critical_per_hour=crit.per_hour if crit else None,
                              critical_burst=crit.burst if crit else None, clock=clock)
        return cls(Router(config), providers if providers is not None else build_providers(config),
                   Dedup(config.dedup.capacity, config.dedup.path), limiter)

    async def handle(self, alert: dict[str, Any]) -> Outcome:
        """Deliver one alert; never raises (a bug in a provider becomes a failed result)."""
        alert_id = alert["alert_id"]
        targets = self.router.targets(alert)
        if not targets:
            return self._log(Outcome(alert_id, "no_route"))
        pending = [t for t in targets if t.key(alert_id) not in self.dedup]
        outcome = Outcome(alert_id, "sent", already_delivered=len(targets) - len(pending))
        for t in targets:
            if t not in pending:
                self._delivery_metric(t, "deduplicated")
        if not pending:
            outcome.status = "duplicate"
            return self._log(outcome)
        allowed: list[Target] = []
        for key in dict.fromkeys(t.recipient.key for t in pending):
            group = [t for t in pending if t.recipient.key == key]
            if self.limiter.allow(key, alert["severity"]):
                allowed += group
            else:
                outcome.rate_limited.append(key)
                for t in group:
                    self._delivery_metric(t, "rate_limited")
        outcome.results = list(await asyncio.gather(*(self._send(alert, t) for t in allowed)))
        for target, result in zip(allowed, outcome.results, strict=True):
            self._delivery_metric(target, "sent" if result.ok else "failed")
            if result.ok:
                self.dedup.add(target.key(alert_id))
        ok = sum(r.ok for r in outcome.results)
        if not allowed:
            outcome.status = "rate_limited"
        elif outcome.failures:
            outcome.status = "partial" if ok else "failed"
        return self._log(outcome)

    def _channel(self, provider: str) -> str:
        return str(getattr(self.providers.get(provider), "channel", "unknown"))

    def _delivery_metric(self, target: Target, result: str) -> None:
        M.NOTIFY_DELIVERIES.labels(self._channel(target.provider), target.provider, result).inc()

    async def _send(self, alert: dict[str, Any], target: Target) -> DeliveryResult:
        provider = self.providers.get(target.provider)
        if provider is None:
            return DeliveryResult(target.provider, target.recipient.key, ok=False, error="provider not configured",
                                  permanent=True)
        try:
            with M.NOTIFY_SEND_SECONDS.labels(self._channel(target.provider)).time():
                return await provider.send(alert, target.recipient)
        except Exception as exc:  # a provider bug must not stop the others
            log.exception("provider %s raised", target.provider)
            return DeliveryResult(target.provider, target.recipient.key, ok=False,
                                  error=f"{type(exc).__name__}: {exc}")

    async def handle_many(self, alerts: list[dict[str, Any]]) -> list[Outcome]:
        """Alerts of one account in order (so a duplicate in the same batch is seen as one),
        different accounts concurrently."""
        groups: dict[str, list[int]] = {}
        for i, alert in enumerate(alerts):
            groups.setdefault(alert.get("account_id") or alert.get("mall_id") or "", []).append(i)
        outcomes: list[Outcome | None] = [None] * len(alerts)
        gate = asyncio.Semaphore(self._concurrency)

        async def run(indexes: list[int]) -> None:
            async with gate:
                for i in indexes:
                    try:
                        outcomes[i] = await self.handle(alerts[i])
                    except Exception as exc:  # a bug here dead-letters one alert, not the service
                        log.exception("alert %s failed", alerts[i].get("alert_id"))
                        outcomes[i] = Outcome(str(alerts[i].get("alert_id")), "error",
                                              error=f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(run(ix) for ix in groups.values()))
        return [o for o in outcomes if o is not None]

    async def tick(self) -> int:
        """Let providers send what they held back (quiet hours); never raises."""
        done = 0
        for name, provider in self.providers.items():
            tick = getattr(provider, "tick", None)
            if tick is None:
                continue
            try:
                done += await tick()
            except Exception:  # a provider bug must not stop the service
                log.exception("provider %s tick failed", name)
        return done

    async def close(self) -> None:
        for provider in self.providers.values():
            close = getattr(provider, "close", None)
            if close is not None:
                await close()
        self.dedup.close()

    @staticmethod
    def _log(outcome: Outcome) -> Outcome:
        line = {"event": "notify_outcome", "alert_id": outcome.alert_id, "status": outcome.status,
                "delivered": [r.provider + ">" + r.recipient for r in outcome.results if r.ok],
                "failed": [f"{r.provider}>{r.recipient}: {r.error}" for r in outcome.failures],
                "already_delivered": outcome.already_delivered, "rate_limited": outcome.rate_limited}
        level = logging.WARNING if outcome.failures else logging.INFO
        # the text log keeps its one-JSON-object message; JSON logs get the fields as fields
        log.log(level, json.dumps(line, ensure_ascii=False), extra={"alert_id": outcome.alert_id,
                                                                   "status": outcome.status})
        return outcome
