"""Tokens: shown once, stored hashed, revocable, scoped; the per-token rate limit."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.portal.auth import Principal, RateLimiter, TokenStore, bearer_token


def test_token_is_stored_hashed_and_authenticates(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token_id, token = store.create("merchant", "M01-S0001", 1)
    text = (tmp_path / "tokens.json").read_text()
    # the secret is url-safe base64 and may itself hold "_" (a random 1-in-50 failure split on the last "_")
    secret = token.split("_", 2)[2]
    assert token.startswith(f"mwp_{token_id}_") and len(secret) >= 30
    assert token not in text and secret not in text
    assert json.loads(text)[token_id]["role"] == "merchant"
    assert store.authenticate(token) == Principal(token_id, "merchant", "M01-S0001")
    assert store.authenticate(token + "x") is None
    assert store.authenticate("") is None and store.authenticate("a" * 500) is None
    # a second store (the service) sees the CLI's token and its revocation
    service = TokenStore(tmp_path / "tokens.json")
    assert service.authenticate(token) is not None
    assert store.revoke(token_id, 2) and not store.revoke(token_id, 3)
    assert service.authenticate(token) is None


def test_scoping() -> None:
    merchant = Principal("a", "merchant", "M01-S0001")
    operator = Principal("b", "operator", "M01")
    assert merchant.can_see("M01-S0001", "M01") and not merchant.can_see("M01-S0002", "M01")
    assert operator.can_see("M01-S0002", "M01") and not operator.can_see("M02-S0001", "M02")
    assert not operator.can_see("X", None)


def test_rate_limit_per_token() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # another token has its own bucket
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)


def test_bearer_header() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer ") is None
