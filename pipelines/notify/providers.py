"""Built-in providers: a structured log line, and a signed JSON webhook (SMS/voice/push gateways)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections import deque
from typing import Any

import aiohttp

from pipelines.notify.base import Channel, DeliveryResult, Recipient

log = logging.getLogger("mallwatt.notify")

SIGNATURE_HEADER = "X-Mallwatt-Signature"
TIMESTAMP_HEADER = "X-Mallwatt-Timestamp"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class LogNotifier:
    """Writes one JSON log line per notification; keeps the last few for inspection."""

    def __init__(self, name: str = "log", channel: Channel = Channel.LOG, history: int = 1000) -> None:
        self.name = name
        self.channel = channel
        self.history: deque[dict[str, Any]] = deque(maxlen=history)

    async def send(self, alert: dict[str, Any], recipient: Recipient) -> DeliveryResult:
        line = {"event": "notification", "provider": self.name, "channel": str(self.channel),
                "to": recipient.key, "alert_id": alert["alert_id"], "kind": alert["kind"],
                "severity": alert["severity"], "mall_id": alert["mall_id"],
                "account_id": alert.get("account_id"), "message": alert["message"]}
        log.info(json.dumps(line, ensure_ascii=False, sort_keys=True))
        self.history.append(line)
        return DeliveryResult(self.name, recipient.key, ok=True)

    async def close(self) -> None:
        return None


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>": binding the time stops replays of old requests."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *, max_age_s: float | None = 300,
           now: float | None = None) -> bool:
    """What a receiver runs: constant-time compare, and reject stale timestamps."""
    if max_age_s is not None:
        try:
            age = abs((time.time() if now is None else now) - int(timestamp))
        except ValueError:
            return False
        if age > max_age_s:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookNotifier:
    """POSTs {"alert", "recipient", "channel", "provider"} as JSON, signed, with retries.

    Retries connection errors, timeouts and 408/425/429/5xx with exponential backoff
    (backoff_s * 2**n, +-20 % jitter); any other non-2xx is a permanent failure.
    The Idempotency-Key header lets the receiver drop a repeat after our own crash.
    """

    def __init__(self, name: str, url: str, secret: bytes, *, channel: Channel = Channel.SMS,
                 timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.5,
                 headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.channel = channel
        self.url = url
        self._secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _body(self, alert: dict[str, Any], recipient: Recipient) -> bytes:
        payload = {"alert": alert, "recipient": recipient.to_json(), "channel": str(self.channel),
                   "provider": self.name}
        return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()

    async def send(self, alert: dict[str, Any], recipient: Recipient) -> DeliveryResult:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        body = self._body(alert, recipient)
        error, status = "", None
        for attempt in range(1, self.retries + 2):
            ts = str(int(time.time()))
            headers = {**self.headers, "Content-Type": "application/json", TIMESTAMP_HEADER: ts,
                       SIGNATURE_HEADER: sign(self._secret, ts, body),
                       "Idempotency-Key": f"{alert['alert_id']}:{self.name}:{recipient.key}"}
            try:
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    status = resp.status
                    await resp.read()
                if 200 <= status < 300:
                    return DeliveryResult(self.name, recipient.key, ok=True, attempts=attempt, status=status)
                error = f"HTTP {status}"
                if status not in RETRY_STATUSES:
                    return DeliveryResult(self.name, recipient.key, ok=False, attempts=attempt, status=status,
                                          error=error, permanent=True)
            except (aiohttp.ClientError, TimeoutError) as exc:
                error, status = f"{type(exc).__name__}: {exc}", None
            if attempt <= self.retries:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.8, 1.2))
        return DeliveryResult(self.name, recipient.key, ok=False, attempts=self.retries + 1, status=status,
                              error=error)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
