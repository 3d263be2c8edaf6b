"""The stream's claim step without Kafka: one claim per id across the portfolio, the accepted
record carrying the claimed position, and the wallet crediting an accepted payment once."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra import topics as T
from pipelines import batching, billing, claiming
from pipelines.context import build_context
from pipelines.core.claims import ClaimResult, claim_key, claim_partition
from pipelines.core.money_authority import sign_money
from pipelines.envelope import Envelope, unframe_value
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from pipelines.signing import public_key_text
from schemas import codec
from schemas.keys import account_shard

T0 = 1_784_080_800_000
PARTITIONS = 8
FIN = Ed25519PrivateKey.generate()  # the finance operator the portfolio below registers


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 12, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 0  # balances below are the payments' alone
    data["security"] = {"operators": [{"id": "fin", "public_key": public_key_text(FIN.public_key()),
                                       "roles": ["finance"]}]}
    return build_context(parse_portfolio(data), PARTITIONS)


def _merchants(ctx: billing.BillingContext) -> list[str]:
    return sorted(a for a in ctx.accounts if not a.endswith("LANDLORD"))


def _topup(pid: str, account: str, amount: int = 500) -> dict:
    """A provider's payment (the portal's webhook path): not operator-signed."""
    return {"payment_id": pid, "account_id": account, "kind": "TOPUP", "amount_minor": amount, "ts_ms": T0,
            "provider": "sim", "reverses_payment_id": None}


def _claim(ctx, existing, record, offset: int, topic: str = T.PAYMENTS) -> claiming.ClaimStep:
    namespace = claiming.NAMESPACES[topic]
    partition = claim_partition(record, PARTITIONS, namespace)
    assert claiming.record_problem(record, topic, partition, ctx) is None
    return claiming.claim_step(existing, record, topic, partition, offset, ctx)


def test_accepted_payment_goes_to_the_account_partition_with_its_claimed_position(ctx) -> None:
    account = _merchants(ctx)[0]
    step = _claim(ctx, None, _topup("p1", account), 7)
    assert step.decision.result is ClaimResult.ACCEPTED and step.key == "pay:p1"
    [item] = unframe_value(step.value)[0]
    assert item.topic == T.PAYMENTS_ACCEPTED and item.partition == account_shard(account, PARTITIONS)
    accepted = codec.decode("Payment", item.value)
    assert (accepted["claim_partition"], accepted["claim_offset"]) == (claim_partition(_topup("p1", account),
                                                                                       PARTITIONS), 7)
    assert claiming.accepted_position(accepted, T.PAYMENTS_ACCEPTED) == (
        f"{T.PAYMENTS}:{accepted['claim_partition']}", 7)


def test_same_id_on_another_account_is_refused_with_an_alert_naming_the_first_use(ctx) -> None:
    first, second = _merchants(ctx)[:2]
    stored = claiming.decode_claim(_claim(ctx, None, _topup("p1", first), 1).value)
    again = _claim(ctx, stored, _topup("p1", first), 2)
    assert again.decision.result is ClaimResult.DUPLICATE and again.value is None  # a provider re-send
    other = _claim(ctx, stored, _topup("p1", second), 3)
    assert other.decision.result is ClaimResult.EXISTS_WITH_DIFFERENT_ACCOUNT
    outbox, _ = unframe_value(other.value)
    alert = codec.decode("Alert", outbox[0].value)
    assert alert["kind"] == "rejected_topup" and f"first used by account {first}" in alert["message"]
    assert claiming.decode_claim(other.value) == stored  # the first claim stays


def test_a_payment_on_the_wrong_partition_or_unknown_account_is_a_routing_problem(ctx) -> None:
    account = _merchants(ctx)[0]
    record = _topup("p9", account)
    right = claim_partition(record, PARTITIONS)
    assert "belongs to partition" in claiming.record_problem(record, T.PAYMENTS, (right + 1) % PARTITIONS, ctx)
    assert "unknown account" in claiming.record_problem({**record, "account_id": "nobody"}, T.PAYMENTS, right, ctx)


def test_reversal_is_claimed_under_the_topup_and_moves_its_amount(ctx) -> None:
    account = _merchants(ctx)[0]
    stored = claiming.decode_claim(_claim(ctx, None, _topup("p1", account, 800), 1).value)
    reversal = {**_topup("r1", account, 1), "kind": "REVERSAL", "reverses_payment_id": "p1"}
    assert claim_key(reversal) == "pay:p1"
    step = _claim(ctx, stored, reversal, 2)
    outbox, _ = unframe_value(step.value)
    assert codec.decode("Payment", outbox[0].value)["amount_minor"] == 800
    assert claiming.decode_claim(step.value).reversed_by == "r1"


def test_wallet_credits_an_accepted_payment_once_even_when_republished(ctx) -> None:
    account = _merchants(ctx)[0]
    step = _claim(ctx, None, _topup("p1", account, 500), 4)
    outbox, _ = unframe_value(step.value)
    accepted = codec.decode("Payment", outbox[0].value)
    message = (accepted["claim_partition"], accepted["claim_offset"], accepted)
    table = {account: Envelope()}
    for changed in batching.apply_payments_many(table, [message, message], ctx, T.PAYMENTS):
        table.update(changed)
    assert table[account].accounts[account].balance == 500
    # the forwarder published it again after a crash: same claimed position, nothing moves
    assert batching.apply_payments_many(table, [message], ctx, T.PAYMENTS) == []


def _posting(entry: str, account: str, amount: int) -> dict:
    return {"entry_id": entry, "account_id": account, "mall_id": "M01", "kind": "adjustment",
            "amount_minor": amount, "ts_ms": T0, "source_id": "ticket-1", "rate": None}


def test_a_signed_posting_is_claimed_and_audited_under_its_verified_signer(ctx) -> None:
    account = _merchants(ctx)[0]
    signed = sign_money(_posting("adj-1", account, 2_500), "fin", FIN)
    step = _claim(ctx, None, signed, 3, T.POSTINGS)
    accepted, audit = unframe_value(step.value)[0]
    assert accepted.topic == T.POSTINGS_ACCEPTED and codec.decode("LedgerPosting", accepted.value)["operator_id"] == "fin"
    event = codec.decode("AuditEvent", audit.value)
    assert audit.topic == T.AUDIT and (event["principal"], event["action"], event["result"]) == (
        "fin", "money.post", "accepted")


def test_unsigned_forged_and_over_limit_money_is_a_routing_problem_with_an_audit_record(ctx) -> None:
    account = _merchants(ctx)[0]
    unsigned = _posting("adj-2", account, 2_500)
    part = claim_partition(unsigned, PARTITIONS, "post")
    assert claiming.record_problem(unsigned, T.POSTINGS, part, ctx).startswith("unauthorized (unsigned)")
    manual = {**_topup("cli-2", account), "provider": "cli"}
    assert "unsigned" in claiming.record_problem(manual, T.PAYMENTS, claim_partition(manual, PARTITIONS), ctx)
    over = sign_money(_posting("adj-3", account, -100_001), "fin", FIN)  # finance: max_adjustment_minor 100,000
    problem = claiming.record_problem(over, T.POSTINGS, claim_partition(over, PARTITIONS, "post"), ctx)
    assert problem.startswith("unauthorized (above_role_limit)") and "max_adjustment_minor" in problem
    event = claiming.refused_money_audit(over, ctx, problem)
    assert (event["principal"], event["action"], event["result"]) == ("fin", "money.post.refused", "above_role_limit")
    forged = {**sign_money(_posting("adj-4", account, 100), "fin", FIN), "amount_minor": 90_000}
    problem = claiming.record_problem(forged, T.POSTINGS, claim_partition(forged, PARTITIONS, "post"), ctx)
    assert claiming.refused_money_audit(forged, ctx, problem)["principal"] == "unverified:fin"
