"""Who may move money by hand: the check of a manual top-up or a posting (pure, no I/O).

Postings (`mallwatt post`, the bills tooling's shared-cost allocations piped into it) and
manual payments (`mallwatt topup`: `provider` is one of MANUAL_PROVIDERS) carry the Ed25519
signature of an operator registered in the portfolio's `security.operators`, over the record's
canonical fields (`PAYMENT_FIELDS` / `POSTING_FIELDS`, the signer's id included). The CLIs run
this check before producing (the edge) and the worker's claim step runs it again; a refusal
goes to the dead letters with the verdict and an audit event.

Provider payments (the portal's webhook path: any other `provider`) are not operator-signed:
the portal checked the provider's HMAC, and only the gateway and portal principals may write
`mallwatt.payments` (Kafka ACLs). docs/security.md, "Money commands", draws that boundary.

Limits: the signer's roles bound each record (`max_topup_minor` for top-ups, `max_adjustment_minor`
for reversals, refunds and every posting, by absolute amount; a role without the limit set is
unbounded, the largest limit among the signer's permitted roles applies), and so does the account:
its wallet policy's `max_topup` / `max_adjustment`, else the defaults below.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipelines.security_config import SecurityConfig, public_key_bytes
from pipelines.signing import canonical

#: `provider` values of a payment nobody's webhook reported: it must be operator-signed. The
#: schema's default ("unknown") is here, so a producer that names no provider is manual.
MANUAL_PROVIDERS = frozenset({"cli", "manual", "unknown", ""})
PAYMENT_FIELDS = ("payment_id", "account_id", "kind", "amount_minor", "currency", "ts_ms", "provider",
                  "reverses_payment_id", "operator_id")
POSTING_FIELDS = ("entry_id", "account_id", "mall_id", "kind", "amount_minor", "ts_ms", "source_id", "rate",
                  "operator_id")
#: The schemas' defaults, so a record signed before encoding verifies after decoding.
_DEFAULTS = {"currency": "CNY", "provider": "unknown", "reverses_payment_id": None, "rate": None,
             "operator_id": None}
#: Per-account limits when the account's wallet policy sets none (minor units): 100,000.00 for
#: one manual top-up (the CLI's typo guard), 100,000.00 for one posting or reversal.
DEFAULT_ACCOUNT_MAX_TOPUP_MINOR = 10_000_000
DEFAULT_ACCOUNT_MAX_ADJUSTMENT_MINOR = 10_000_000


class MoneyVerdict(StrEnum):
    ACCEPTED = "accepted"
    PROVIDER = "provider"  # a provider payment: not operator-signed, trusted on the Kafka ACL
    UNKNOWN_ACCOUNT = "unknown_account"
    UNSIGNED = "unsigned"
    UNKNOWN_OPERATOR = "unknown_operator"
    BAD_SIGNATURE = "bad_signature"
    NOT_PERMITTED = "not_permitted"
    ABOVE_ROLE_LIMIT = "above_role_limit"
    ABOVE_ACCOUNT_LIMIT = "above_account_limit"


@dataclass(frozen=True)
class MoneyDecision:
    verdict: MoneyVerdict
    principal: str | None  # the verified signer (None: unsigned, forged or a provider payment)
    detail: str

    @property
    def accepted(self) -> bool:
        return self.verdict in (MoneyVerdict.ACCEPTED, MoneyVerdict.PROVIDER)

    def problem(self) -> str | None:
        return None if self.accepted else f"unauthorized ({self.verdict.value}): {self.detail}"


def is_posting(record: dict[str, Any]) -> bool:
    return "entry_id" in record


def signed_body(record: dict[str, Any]) -> dict[str, Any]:
    """The fields a money signature covers, with the schema defaults filled in."""
    fields = POSTING_FIELDS if is_posting(record) else PAYMENT_FIELDS
    return {k: record.get(k, _DEFAULTS.get(k)) for k in fields}


def sign_money(record: dict[str, Any], operator_id: str, private_key: Any) -> dict[str, Any]:
    """The record with operator_id, key_id and signature set (the CLI's and tests' side)."""
    from pipelines.signing import key_id_of

    body = signed_body({**record, "operator_id": operator_id})
    signature = private_key.sign(canonical(body))
    return {**record, **body, "key_id": key_id_of(private_key.public_key()),
            "signature": base64.b64encode(signature).decode()}


def needs_signature(record: dict[str, Any]) -> bool:
    """Postings always; payments unless a provider reported them (or they carry a signature
    anyway: a signed record is always checked, a forged one is never waved through)."""
    if is_posting(record) or record.get("operator_id") or record.get("signature"):
        return True
    return str(record.get("provider", "unknown")) in MANUAL_PROVIDERS


@lru_cache(maxsize=4096)
def _public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key_bytes(text))


def _permission_and_limit(record: dict[str, Any]) -> tuple[str, str]:
    if not is_posting(record) and str(record["kind"]).upper() == "TOPUP":
        return "money.topup", "max_topup_minor"
    return "money.adjust", "max_adjustment_minor"


def role_limit(security: SecurityConfig, operator_id: str, permission: str, limit: str) -> int | None:
    """The largest `limit` among the operator's roles that grant `permission`: None when one of
    them sets no limit (unbounded), 0 when none grants it (or the operator is unknown or disabled;
    a role's limit is always positive, so 0 means "not permitted")."""
    op = next((o for o in security.operators if o.id == operator_id), None)
    if op is None or op.disabled:
        return 0
    roles = security.all_roles()
    limits = [getattr(roles[r], limit) for r in op.roles if permission in roles[r].permissions]
    if not limits:
        return 0
    return None if any(v is None for v in limits) else max(limits)


def account_limit(record: dict[str, Any], policy: Any) -> int:
    """The account's own bound for this record: its wallet policy's, else the default."""
    permission, _ = _permission_and_limit(record)
    if permission == "money.topup":
        value = getattr(policy, "max_topup", None)
        return DEFAULT_ACCOUNT_MAX_TOPUP_MINOR if value is None else int(value)
    value = getattr(policy, "max_adjustment", None)
    return DEFAULT_ACCOUNT_MAX_ADJUSTMENT_MINOR if value is None else int(value)


def decide_money(record: dict[str, Any], security: SecurityConfig, *, known_account: bool,
                 policy: Any = None) -> MoneyDecision:
    """Whether a Payment or LedgerPosting may move money. `known_account`: the account is in
    the current config; `policy`: its WalletPolicy (None: defaults)."""
    what = f"{'posting' if is_posting(record) else 'payment'} " \
           f"{record.get('entry_id') if is_posting(record) else record.get('payment_id')!r}"
    account = record.get("account_id")
    if not known_account:
        return MoneyDecision(MoneyVerdict.UNKNOWN_ACCOUNT, None, f"{what}: account_id {account!r} is not in the config")
    if not needs_signature(record):
        return MoneyDecision(MoneyVerdict.PROVIDER, None, "")
    operator_id, signature = record.get("operator_id"), record.get("signature")
    if not operator_id or not signature:
        return MoneyDecision(MoneyVerdict.UNSIGNED, None, f"{what} carries no operator signature")
    op = next((o for o in security.operators if o.id == operator_id), None)
    if op is None or op.disabled:
        return MoneyDecision(MoneyVerdict.UNKNOWN_OPERATOR, None,
                             f"{what}: operator {operator_id!r} is not an active operator in the config")
    try:
        _public_key(op.public_key).verify(base64.b64decode(signature, validate=True), canonical(signed_body(record)))
    except (InvalidSignature, ValueError):
        return MoneyDecision(MoneyVerdict.BAD_SIGNATURE, None,
                             f"{what}: signature of {operator_id!r} does not match the record")
    permission, limit_name = _permission_and_limit(record)
    limit = role_limit(security, op.id, permission, limit_name)
    amount = abs(int(record["amount_minor"]))
    if limit == 0:
        return MoneyDecision(MoneyVerdict.NOT_PERMITTED, op.id, f"{what}: {op.id!r} lacks {permission}")
    if limit is not None and amount > limit:
        return MoneyDecision(MoneyVerdict.ABOVE_ROLE_LIMIT, op.id,
                             f"{what}: amount_minor {amount} is above {op.id!r}'s {limit_name} {limit}")
    bound = account_limit(record, policy)
    if amount > bound:
        return MoneyDecision(MoneyVerdict.ABOVE_ACCOUNT_LIMIT, op.id,
                             f"{what}: amount_minor {amount} is above account {account!r}'s limit {bound}")
    return MoneyDecision(MoneyVerdict.ACCEPTED, op.id, "")


#: The exported column (pipelines/export_input.py) that carries a payment's whole record as JSON
#: when it needs an operator signature, so replay checks it as the stream's claim step did.
MONEY_RECORD = "money_record"


def refuse_unauthorised(rows: list[dict[str, Any]], security: SecurityConfig | None,
                        policies: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replay's copy of the stream's money check: rows whose `money_record` the stream would
    have refused (unsigned, forged, above a limit) go to the refused list with the verdict as
    their reason, before any claim. Rows without the column are provider payments."""
    if security is None:
        return rows, []
    import json

    kept: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for row in rows:
        raw = row.get(MONEY_RECORD)
        if not raw:
            kept.append(row)
            continue
        account = row["account_id"]
        decision = decide_money(json.loads(raw), security, known_account=account in policies,
                                policy=policies.get(account))
        if decision.verdict in (MoneyVerdict.ACCEPTED, MoneyVerdict.PROVIDER):
            kept.append(row)
        else:
            refused.append({**row, "reason": decision.verdict.value})
    return kept, refused
