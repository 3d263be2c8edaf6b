"""Who may switch power: the worker's check of an operator power command (pure, no I/O).

An operator's order (`mallwatt power`) is signed by the operator's Ed25519 key over the
order's canonical fields (`ORDER_FIELDS`); an area- or mall-wide order also carries the
signature of a second operator who approved it. Every per-meter command carries the order's
signatures, so each worker checks the whole order for the meters it owns. The result is an
enum, never a silent drop: a refused command goes to the dead letters with this reason, and an
accepted one is audited with the verified principals, never the free-text `operator` field.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipelines.security_config import SecurityConfig, public_key_bytes
from pipelines.signing import canonical

ORDER_FIELDS = ("order_id", "action", "scope", "target_id", "reason", "ts_ms")
#: Circuit purposes an area- or mall-wide order never switches (elevators, fire systems,
#: emergency lighting); a meter-scope order by a permitted operator still can (maintenance).
LIFE_SAFETY = frozenset({"elevator", "fire", "emergency_lighting"})
WIDE_SCOPES = ("AREA", "MALL")
MAX_SIGNATURES = 4  # proposer plus approvers: more is not an order, it is an attack on the verifier


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    UNSIGNED = "unsigned"
    UNKNOWN_OPERATOR = "unknown_operator"
    BAD_SIGNATURE = "bad_signature"
    NOT_PERMITTED = "not_permitted"
    NEEDS_APPROVAL = "needs_approval"
    SELF_APPROVAL = "self_approval"
    LIFE_SAFETY = "life_safety"
    NO_REASON = "no_reason"
    OUT_OF_SCOPE = "out_of_scope"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    principals: tuple[str, ...]  # verified signers, proposer first
    detail: str

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPTED

    def problem(self) -> str | None:
        return None if self.accepted else f"unauthorized ({self.verdict.value}): {self.detail}"


def order_of(command: dict[str, Any]) -> dict[str, Any]:
    return {k: command[k] for k in ORDER_FIELDS}


def sign_order(order: dict[str, Any], operator_id: str, private_key: Any) -> dict[str, str]:
    """One signature entry for an order (the CLI's side)."""
    from pipelines.signing import key_id_of

    signature = private_key.sign(canonical(order))
    return {"operator_id": operator_id, "key_id": key_id_of(private_key.public_key()),
            "signature": base64.b64encode(signature).decode()}


def _verified(order: dict[str, Any], signatures: list[dict[str, Any]], security: SecurityConfig
              ) -> tuple[list[str], Decision | None]:
    keys = {op.id: op for op in security.operators}
    signed = canonical(order)
    who: list[str] = []
    for entry in signatures[:MAX_SIGNATURES]:
        op = keys.get(entry.get("operator_id") or "")
        if op is None or op.disabled:
            return who, Decision(Verdict.UNKNOWN_OPERATOR, tuple(who),
                                 f"operator {entry.get('operator_id')!r} is not an active operator in the config")
        try:
            key = Ed25519PublicKey.from_public_bytes(public_key_bytes(op.public_key))
            key.verify(base64.b64decode(entry.get("signature") or "", validate=True), signed)
        except (InvalidSignature, ValueError):
            return who, Decision(Verdict.BAD_SIGNATURE, tuple(who),
                                 f"signature of {op.id!r} does not match the order {order['order_id']!r}")
        who.append(op.id)
    return who, None


def decide(command: dict[str, Any], security: SecurityConfig, *, meter_purpose: str | None,
           in_scope: bool) -> Decision:
    """Whether a per-meter operator command may be executed. `meter_purpose` is the meter's
    circuit purpose and `in_scope` whether the meter belongs to the order's target, both from
    the worker's current config."""
    order = order_of(command)
    signatures = list(command.get("signatures") or [])
    if not signatures:
        return Decision(Verdict.UNSIGNED, (), f"order {order['order_id']!r} carries no operator signature")
    if len(signatures) > MAX_SIGNATURES:
        return Decision(Verdict.BAD_SIGNATURE, (), f"{len(signatures)} signatures (at most {MAX_SIGNATURES})")
    who, refused = _verified(order, signatures, security)
    if refused is not None:
        return refused
    principals = tuple(who)
    if not str(order["reason"]).strip():
        return Decision(Verdict.NO_REASON, principals, "an order needs a reason")
    scope = str(order["scope"])
    wanted = f"power.{scope.lower()}"
    if wanted not in security.permissions_of(who[0]):
        return Decision(Verdict.NOT_PERMITTED, principals, f"{who[0]!r} lacks {wanted}")
    if not in_scope:
        return Decision(Verdict.OUT_OF_SCOPE, principals,
                        f"meter {command['meter_id']!r} is not in {scope.lower()} {order['target_id']!r}")
    if scope in security.approval_scopes:
        approvers = [w for w in who[1:] if w != who[0] and "power.approve" in security.permissions_of(w)]
        if not approvers:
            verdict = Verdict.SELF_APPROVAL if who[0] in who[1:] else Verdict.NEEDS_APPROVAL
            return Decision(verdict, principals, f"a {scope.lower()}-wide order needs the approval of a second "
                                                 "operator with power.approve")
    if scope in WIDE_SCOPES and meter_purpose in LIFE_SAFETY:
        return Decision(Verdict.LIFE_SAFETY, principals,
                        f"meter {command['meter_id']!r} feeds a {meter_purpose} circuit: never switched by "
                        f"a {scope.lower()}-wide order")
    return Decision(Verdict.ACCEPTED, principals, "")
