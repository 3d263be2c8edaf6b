"""Payment providers: verify a webhook notification and read the payment it reports.

The generic HMAC provider checks, in this order: the signature headers are present, the
timestamp is within the window, the HMAC-SHA256 over ``timestamp \\n nonce \\n body`` matches
(constant-time), the nonce was not used within the window, then the body's fields. A nonce is
reserved while the request is handled and kept only once the payment is acknowledged by Kafka
(`confirm`), so a provider retrying after a failed produce is not refused as a replay.

The payment id is the provider's transaction id: whatever gets past the nonce check (a retry
with a new nonce), the worker's claims credit each id once (pipelines.core.claims).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

TS_HEADER = "X-Signature-Timestamp"  # epoch seconds, as most providers send it
NONCE_HEADER = "X-Signature-Nonce"
SIG_HEADER = "X-Signature"  # lowercase hex of HMAC-SHA256
WINDOW_MS = 5 * 60 * 1000
MAX_NONCES = 100_000  # per provider; the oldest go first (they are past the window anyway)
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9._\-]{8,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")


class WebhookError(Exception):
    """A refused notification: HTTP status, a stable code and the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "field": self.field, "message": str(self)}


@dataclass(frozen=True)
class Notification:
    provider: str
    payment_id: str  # the provider's transaction id
    account_id: str
    amount_minor: int
    currency: str
    ts_ms: int
    nonce: str

    def payment(self) -> dict[str, Any]:
        """The Payment record (schemas/payment.avsc) for mallwatt.payments."""
        return {"payment_id": self.payment_id, "account_id": self.account_id, "kind": "TOPUP",
                "amount_minor": self.amount_minor, "currency": self.currency, "ts_ms": self.ts_ms,
                "provider": self.provider, "reverses_payment_id": None}


class NonceCache:
    """Nonces seen within the window: reserved during a request, kept after `confirm`."""

    def __init__(self, window_ms: int = WINDOW_MS, max_size: int = MAX_NONCES) -> None:
        self.window_ms, self.max_size = window_ms, max_size
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> expiry ms

    def reserve(self, nonce: str, now_ms: int) -> None:
        while self._seen and next(iter(self._seen.values())) <= now_ms:
            self._seen.popitem(last=False)
        expiry = self._seen.get(nonce)
        if expiry is not None and expiry > now_ms:
            raise WebhookError(409, "replayed_nonce", "this nonce was already used", NONCE_HEADER)
        # kept twice the window: a timestamp may be up to a window in the future
        self._seen[nonce] = now_ms + 2 * self.window_ms
        self._seen.move_to_end(nonce)
        if len(self._seen) > self.max_size:
            self._seen.popitem(last=False)

    def release(self, nonce: str) -> None:
        self._seen.pop(nonce, None)


class HmacProvider:
    """A provider that signs its notifications with a shared secret (HMAC-SHA256)."""

    def __init__(self, name: str, secret: bytes, window_ms: int = WINDOW_MS, currency: str = "CNY") -> None:
        if len(secret) < 16:
            raise ValueError(f"provider {name}: the secret must be at least 16 bytes")
        self.name, self._secret, self.window_ms, self.currency = name, secret, window_ms, currency
        self.nonces = NonceCache(window_ms)

    def signature(self, timestamp: str, nonce: str, body: bytes) -> str:
        message = timestamp.encode() + b"\n" + nonce.encode() + b"\n" + body
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, body: bytes, now_ms: int, nonce: str | None = None) -> dict[str, str]:
        """The headers a provider sends with `body` (the simulated provider and tests use it)."""
        timestamp, nonce = str(now_ms // 1000), nonce or secrets.token_hex(12)
        return {TS_HEADER: timestamp, NONCE_HEADER: nonce, SIG_HEADER: self.signature(timestamp, nonce, body),
                "Content-Type": "application/json"}

    def verify(self, headers: Any, body: bytes, now_ms: int) -> Notification:
        """The notification of a signed request; raises WebhookError. Reserves the nonce: the
        caller must `confirm` or `release` it."""
        timestamp, nonce, signature = (headers.get(h) for h in (TS_HEADER, NONCE_HEADER, SIG_HEADER))
        for name, value in ((TS_HEADER, timestamp), (NONCE_HEADER, nonce), (SIG_HEADER, signature)):
            if not value:
                raise WebhookError(401, "missing_signature", f"header {name} is required", name)
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise WebhookError(401, "bad_timestamp", "timestamp must be epoch seconds", TS_HEADER)
        if abs(int(timestamp) * 1000 - now_ms) > self.window_ms:
            raise WebhookError(401, "stale_timestamp",
                               f"timestamp is outside the {self.window_ms // 1000} s window", TS_HEADER)
        if not _NONCE.fullmatch(nonce):
            raise WebhookError(401, "bad_nonce", "nonce must be 8-64 of [A-Za-z0-9._-]", NONCE_HEADER)
        expected = self.signature(timestamp, nonce, body)
        if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
            raise WebhookError(401, "bad_signature", "signature does not match", SIG_HEADER)
        self.nonces.reserve(nonce, now_ms)
        try:
            return self.parse(body, int(timestamp) * 1000, nonce)
        except WebhookError:
            self.nonces.release(nonce)
            raise

    def confirm(self, nonce: str) -> None:
        """The payment is acknowledged: the nonce stays reserved until it expires."""

    def release(self, nonce: str) -> None:
        self.nonces.release(nonce)

    def parse(self, body: bytes, header_ts_ms: int, nonce: str) -> Notification:
        """Body: {"transaction_id", "account_id", "amount_minor", "currency"?, "paid_at_ms"?}."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WebhookError(400, "bad_json", f"body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise WebhookError(400, "bad_json", "body must be a JSON object")
        payment_id = data.get("transaction_id")
        if not isinstance(payment_id, str) or not _ID.fullmatch(payment_id):
            raise WebhookError(422, "invalid_field", "transaction_id must be 1-64 of [A-Za-z0-9._:-]",
                               "transaction_id")
        account = data.get("account_id")
        if not isinstance(account, str) or not _ID.fullmatch(account):
            raise WebhookError(422, "invalid_field", "account_id must be 1-64 of [A-Za-z0-9._:-]", "account_id")
        amount = data.get("amount_minor")
        if type(amount) is not int or amount <= 0:  # bool is an int subclass: refused too
            raise WebhookError(422, "invalid_field", "amount_minor must be a positive integer (minor units)",
                               "amount_minor")
        currency = data.get("currency", self.currency)
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency) or currency != self.currency:
            raise WebhookError(422, "invalid_field", f"currency must be {self.currency}", "currency")
        paid_at = data.get("paid_at_ms", header_ts_ms)
        if type(paid_at) is not int or abs(paid_at - header_ts_ms) > self.window_ms:
            raise WebhookError(422, "invalid_field", "paid_at_ms must be epoch ms within the signature window",
                               "paid_at_ms")
        # the provider's id is namespaced by provider: two providers may reuse each other's ids
        return Notification(self.name, f"{self.name}:{payment_id}", account, amount, currency, paid_at, nonce)


class SimulatedProvider(HmacProvider):
    """A stand-in payment provider for the demo and tests: it 'takes' a payment and signs a
    notification exactly as a real HMAC provider would; the portal verifies it the same way."""

    def __init__(self, secret: bytes | None = None, window_ms: int = WINDOW_MS) -> None:
        super().__init__("sim", secret or secrets.token_bytes(32), window_ms)

    def notification(self, account_id: str, amount_minor: int, now_ms: int,
                     transaction_id: str | None = None) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"transaction_id": transaction_id or f"sim-{secrets.token_hex(8)}",
                           "account_id": account_id, "amount_minor": amount_minor, "currency": self.currency,
                           "paid_at_ms": now_ms}).encode()
        return body, self.sign(body, now_ms)


def providers_from_env(env: dict[str, str]) -> dict[str, HmacProvider]:
    """MALLWATT_PORTAL_PROVIDERS="name=ENV_VAR_OF_SECRET,..." (the secret itself is read from
    the named variable, so it is never on a command line), plus the simulated provider unless
    MALLWATT_PORTAL_SIMULATED=0."""
    out: dict[str, HmacProvider] = {}
    for item in filter(None, (env.get("MALLWATT_PORTAL_PROVIDERS") or "").split(",")):
        name, _, var = item.partition("=")
        secret = env.get(var.strip())
        if not name.strip() or not secret:
            raise ValueError(f"MALLWATT_PORTAL_PROVIDERS item {item!r}: want name=VAR with VAR set to the secret")
        out[name.strip()] = HmacProvider(name.strip(), secret.encode())
    if env.get("MALLWATT_PORTAL_SIMULATED", "1") != "0":
        out["sim"] = SimulatedProvider()
    return out
