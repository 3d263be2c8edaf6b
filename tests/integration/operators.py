"""Registered test operators: their keys, their entries in a portfolio, their signed power commands
and signed money (postings and manual top-ups, by the finance operator)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipelines.core.money_authority import sign_money
from pipelines.portfolio import Portfolio
from pipelines.power_cli import new_order, signed_commands
from pipelines.signing import public_key_text

OPERATOR, APPROVER = "tester", "approver"
KEY = Ed25519PrivateKey.generate()  # one per test session: the portfolio below registers it
APPROVER_KEY = Ed25519PrivateKey.generate()
FINANCE = "finance-tester"  # role finance: money.topup (max 1,000,000 minor), money.adjust (max 100,000)
FINANCE_KEY = Ed25519PrivateKey.generate()


def register(data: dict[str, Any]) -> dict[str, Any]:
    """The portfolio dict with the test operators in `security.operators`."""
    data["security"] = {"operators": [
        {"id": who, "public_key": public_key_text(key.public_key()), "roles": [role]}
        for who, key, role in ((OPERATOR, KEY, "operator"), (APPROVER, APPROVER_KEY, "operator"),
                               (FINANCE, FINANCE_KEY, "finance"))]}
    return data


def signed(record: dict[str, Any]) -> dict[str, Any]:
    """A posting or manual top-up signed by the finance operator (the worker accepts it within
    the finance role's limits)."""
    return sign_money(record, FINANCE, FINANCE_KEY)


def power_commands(portfolio: Portfolio, action: str, scope: str, target: str, reason: str, ts_ms: int,
                   order_id: str, approved: bool = False) -> list[dict[str, Any]]:
    """Signed by the test operator, and by the approver too when `approved`."""
    signers = [(OPERATOR, KEY)] + ([(APPROVER, APPROVER_KEY)] if approved else [])
    return signed_commands(portfolio, new_order(action, scope, target, reason, ts_ms, order_id), signers)
