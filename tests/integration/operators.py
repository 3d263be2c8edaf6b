"""A registered test operator: its key, its entry in a portfolio, and its signed power commands."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipelines.portfolio import Portfolio
from pipelines.power_cli import new_order, signed_commands
from pipelines.signing import public_key_text

OPERATOR, APPROVER = "tester", "approver"
KEY = Ed25519PrivateKey.generate()  # one per test session: the portfolio below registers it
APPROVER_KEY = Ed25519PrivateKey.generate()


def register(data: dict[str, Any]) -> dict[str, Any]:
    """The portfolio dict with the test operator in `security.operators`."""
    data["security"] = {"operators": [
        {"id": who, "public_key": public_key_text(key.public_key()), "roles": ["operator"]}
        for who, key in ((OPERATOR, KEY), (APPROVER, APPROVER_KEY))]}
    return data


def power_commands(portfolio: Portfolio, action: str, scope: str, target: str, reason: str, ts_ms: int,
                   order_id: str, approved: bool = False) -> list[dict[str, Any]]:
    """Signed by the test operator, and by the approver too when `approved`."""
    signers = [(OPERATOR, KEY)] + ([(APPROVER, APPROVER_KEY)] if approved else [])
    return signed_commands(portfolio, new_order(action, scope, target, reason, ts_ms, order_id), signers)
