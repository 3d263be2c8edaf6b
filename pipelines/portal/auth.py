"""Portal access: merchant and mall-operator tokens, stored hashed, and a per-token rate limit.

A token is shown once, when created; the store keeps only its SHA-256 (a leaked store file
does not let anyone in). Tokens look like ``mwp_<id>_<secret>``: the id names the token in the
store, in logs and for revocation, and is not a secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("merchant", "operator")
MAX_TOKEN_LENGTH = 128  # a longer Authorization value is refused before hashing


@dataclass(frozen=True)
class Principal:
    token_id: str
    role: str  # merchant: one account; operator: every account of one mall
    subject: str  # account id or mall id

    def can_see(self, account_id: str, account_mall: str | None) -> bool:
        if self.role == "merchant":
            return account_id == self.subject
        return account_mall is not None and account_mall == self.subject


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """A JSON file {token_id: {sha256, role, subject, created_ms, revoked_ms}}, re-read when it
    changes on disk (the CLI creates and revokes while the service runs)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._by_hash: dict[str, str] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._records, self._by_hash, self._mtime = {}, {}, None
            return
        if mtime == self._mtime:
            return
        try:
            records = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not a token store ({exc})") from exc
        self._records = records
        self._by_hash = {r["sha256"]: tid for tid, r in records.items() if not r.get("revoked_ms")}
        self._mtime = mtime

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        with os.fdopen(fd, "w") as out:
            json.dump(self._records, out, indent=1, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._mtime = None

    def create(self, role: str, subject: str, now_ms: int) -> tuple[str, str]:
        """(token id, token); the token is not stored and cannot be shown again."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} must be one of {ROLES}")
        if not subject:
            raise ValueError("subject (account or mall id) must not be empty")
        self._load()
        token_id = secrets.token_hex(4)
        while token_id in self._records:
            token_id = secrets.token_hex(4)
        token = f"mwp_{token_id}_{secrets.token_urlsafe(24)}"
        self._records[token_id] = {"sha256": _digest(token), "role": role, "subject": subject,
                                   "created_ms": now_ms, "revoked_ms": None}
        self._save()
        return token_id, token

    def revoke(self, token_id: str, now_ms: int) -> bool:
        self._load()
        record = self._records.get(token_id)
        if record is None or record.get("revoked_ms"):
            return False
        record["revoked_ms"] = now_ms
        self._save()
        return True

    def list(self) -> list[dict[str, Any]]:
        self._load()
        return [{"token_id": tid, **{k: v for k, v in r.items() if k != "sha256"}}
                for tid, r in sorted(self._records.items())]

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a live token, else None. Looked up by the token's hash, so no
        comparison of secrets happens here at all."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        self._load()
        token_id = self._by_hash.get(_digest(token))
        if token_id is None:
            return None
        record = self._records[token_id]
        return Principal(token_id, record["role"], record["subject"])


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts up to `burst`. Bounded: at
    most `max_keys` buckets (the oldest are dropped; a dropped key starts full again)."""

    def __init__(self, rate: float = 10.0, burst: float = 30.0, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now_s: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now_s)  # re-inserted: newest last
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return allowed


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
