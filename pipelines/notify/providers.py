"""Built-in providers: a structured log line, and a signed JSON webhook (SMS/voice/push gateways).

The webhook only talks to public https endpoints (`pipelines.notify.outbound`), never
follows a redirect, and signs "<timestamp>.<nonce>.<body>" with a secret of at least 32
bytes, so a receiver can refuse stale and replayed requests (`verify`, `NonceCache`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import aiohttp

from pipelines.notify.base import Channel, DeliveryResult, Recipient
from pipelines.notify.outbound import (
    Lookup,
    OutboundRefused,
    check_secret,
    check_url,
    checked_session,
    describe,
    system_lookup,
)

log = logging.getLogger("mallwatt.notify")

SIGNATURE_HEADER = "X-Mallwatt-Signature"
TIMESTAMP_HEADER = "X-Mallwatt-Timestamp"
NONCE_HEADER = "X-Mallwatt-Nonce"
MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's answer is read (to free the connection) up to this
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


def sign(secret: bytes, timestamp: str, nonce: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<nonce>.<body>": the time bounds a replay's window and
    the nonce (unique per request) lets the receiver refuse a replay inside it."""
    message = timestamp.encode() + b"." + nonce.encode() + b"." + body
    return "sha256=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


class NonceCache:
    """Nonces a receiver has accepted within the signature's age window (bounded)."""

    def __init__(self, max_age_s: float = 300, capacity: int = 100_000) -> None:
        self.max_age_s = max_age_s
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, nonce: str, now: float) -> bool:
        """True the first time `nonce` is offered; False for a replay."""
        while self._seen and (next(iter(self._seen.values())) < now - 2 * self.max_age_s
                              or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def verify(secret: bytes, timestamp: str, nonce: str, body: bytes, signature: str, *,
           max_age_s: float | None = 300, now: float | None = None, nonces: NonceCache | None = None) -> bool:
    """What a receiver runs: constant-time compare, reject stale timestamps and (with a
    NonceCache) replayed nonces."""
    now = time.time() if now is None else now
    if max_age_s is not None:
        try:
            age = abs(now - int(timestamp))
        except ValueError:
            return False
        if age > max_age_s:
            return False
    if not 16 <= len(nonce) <= 128:
        return False
    if not hmac.compare_digest(sign(secret, timestamp, nonce, body), signature):
        return False
    return nonces is None or nonces.first_use(nonce, now)


class WebhookNotifier:
    """POSTs {"alert", "recipient", "channel", "provider"} as JSON, signed, with retries.

    Retries connection errors, timeouts and 408/425/429/5xx with exponential backoff
    (backoff_s * 2**n, +-20 % jitter); any other non-2xx, a redirect, or a destination
    refused by the outbound rules is a permanent failure. The Idempotency-Key header lets
    the receiver drop a repeat after our own crash. `allow_loopback_http` (tests only)
    permits http://127.0.0.1 and friends; `lookup` replaces DNS (tests).
    """

    def __init__(self, name: str, url: str, secret: bytes, *, channel: Channel = Channel.SMS,
                 timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.5,
                 headers: dict[str, str] | None = None, allow_loopback_http: bool = False,
                 lookup: Lookup = system_lookup, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.channel = channel
        self.target = check_url(url, allow_loopback_http=allow_loopback_http)
        self.url = url
        self._secret = check_secret(secret, f"provider {name}: webhook secret")
        self._allow_loopback = allow_loopback_http
        self._lookup = lookup
        self._clock = clock
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
            self._session = checked_session(self.timeout, allow_loopback=self._allow_loopback, lookup=self._lookup)
        body = self._body(alert, recipient)
        error, status = "", None
        for attempt in range(1, self.retries + 2):
            ts, nonce = str(int(self._clock())), secrets.token_hex(16)
            headers = {**self.headers, "Content-Type": "application/json", TIMESTAMP_HEADER: ts,
                       NONCE_HEADER: nonce, SIGNATURE_HEADER: sign(self._secret, ts, nonce, body),
                       "Idempotency-Key": f"{alert['alert_id']}:{self.name}:{recipient.key}"}
            try:
                async with self._session.post(self.url, data=body, headers=headers,
                                              allow_redirects=False) as resp:
                    status = resp.status
                    await resp.content.read(MAX_RESPONSE_BYTES)
                if 200 <= status < 300:
                    return DeliveryResult(self.name, recipient.key, ok=True, attempts=attempt, status=status)
                error = f"HTTP {status}"
                if 300 <= status < 400:
                    error = f"HTTP {status}: redirects are not followed (fix the provider URL)"
                if status not in RETRY_STATUSES:
                    return DeliveryResult(self.name, recipient.key, ok=False, attempts=attempt, status=status,
                                          error=error, permanent=True)
            except OutboundRefused as exc:
                return DeliveryResult(self.name, recipient.key, ok=False, attempts=attempt, status=None,
                                      error=f"{describe(self.target)}: {exc}", permanent=True)
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
