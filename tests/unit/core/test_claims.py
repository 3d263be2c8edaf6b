"""Claims: an id moves money once across the portfolio; every other use is named."""

from __future__ import annotations

from pipelines.core.claims import ClaimBook, ClaimResult, claim_key, decide_payment, expired
from pipelines.core.models import WalletPolicy

T0 = 1_784_080_800_000


def topup(pid: str, account: str = "A", amount: int = 500, ts: int = T0) -> dict:
    return {"payment_id": pid, "account_id": account, "kind": "TOPUP", "amount_minor": amount, "ts_ms": ts}


def reversal(pid: str, orig: str, account: str = "A") -> dict:
    return {"payment_id": pid, "account_id": account, "kind": "REVERSAL", "amount_minor": 1, "ts_ms": T0 + 5,
            "reverses_payment_id": orig}


def test_same_id_same_fields_is_a_duplicate_and_any_other_field_is_named() -> None:
    book = ClaimBook()
    assert book.payment(topup("p1")).result is ClaimResult.ACCEPTED
    assert book.payment(topup("p1", ts=T0 + 60_000)).result is ClaimResult.DUPLICATE  # a provider re-send
    other_account = book.payment(topup("p1", account="B"))
    assert other_account.result is ClaimResult.EXISTS_WITH_DIFFERENT_ACCOUNT
    assert "first used by account A" in other_account.reason("p1")
    assert book.payment(topup("p1", amount=501)).result is ClaimResult.EXISTS_WITH_DIFFERENT_AMOUNT
    refund = {**topup("p1"), "kind": "REFUND"}
    assert book.payment(refund).result is ClaimResult.EXISTS_WITH_DIFFERENT_KIND
    assert book.claims["pay:p1"].account_id == "A" and len(book.claims) == 1


def test_reversal_meets_its_topup_once_with_the_topup_amount() -> None:
    book = ClaimBook()
    book.payment(topup("p1", amount=700))
    assert claim_key(reversal("r1", "p1")) == claim_key(topup("p1")) == "pay:p1"
    first = book.payment(reversal("r1", "p1"))
    assert first.result is ClaimResult.ACCEPTED and first.amount_minor == 700
    assert book.payment(reversal("r1", "p1")).result is ClaimResult.DUPLICATE
    assert book.payment(reversal("r2", "p1")).result is ClaimResult.ALREADY_REVERSED
    assert book.payment(reversal("r3", "nope")).result is ClaimResult.NOTHING_TO_REVERSE
    book.payment(topup("p2", account="B"))
    assert book.payment(reversal("r4", "p2", account="A")).result is ClaimResult.REVERSES_OTHER_ACCOUNT
    book.payment({**topup("f1"), "kind": "REFUND"})
    assert book.payment(reversal("r5", "f1")).result is ClaimResult.REVERSES_NON_TOPUP


def test_topup_limits_are_checked_before_the_id_is_claimed() -> None:
    policy = WalletPolicy(alert_levels=[], min_topup=1000, max_topup=100_000)
    book = ClaimBook()
    assert book.payment(topup("p1", amount=999), policy).result is ClaimResult.BELOW_MINIMUM_TOPUP
    assert book.payment(topup("p2", amount=100_001), policy).result is ClaimResult.ABOVE_MAXIMUM_TOPUP
    assert book.payment(topup("p3", amount=0), policy).result is ClaimResult.NOT_POSITIVE
    assert book.claims == {}  # nothing claimed: a refused top-up leaves nothing to reverse
    assert book.payment(reversal("r1", "p1")).result is ClaimResult.NOTHING_TO_REVERSE


def test_postings_are_claimed_in_their_own_namespace() -> None:
    book = ClaimBook()
    posting = {"entry_id": "p1", "account_id": "A", "kind": "shared_cost", "amount_minor": -50, "ts_ms": T0}
    assert book.posting(posting).result is ClaimResult.ACCEPTED
    assert book.payment(topup("p1")).result is ClaimResult.ACCEPTED  # "pay:p1" is not "post:p1"
    assert book.posting({**posting, "amount_minor": -60}).result is ClaimResult.EXISTS_WITH_DIFFERENT_AMOUNT


def test_horizon_is_measured_from_the_newest_timestamp_not_the_clock() -> None:
    claim = decide_payment(None, topup("p1")).stored
    assert claim is not None
    assert not expired(claim, T0 + 399 * 86_400_000, 400)
    assert expired(claim, T0 + 401 * 86_400_000, 400)


def test_an_amount_beyond_the_money_limit_is_refused_before_the_claim() -> None:
    from pipelines.core.models import MAX_MINOR

    book = ClaimBook()
    assert book.payment(topup("p1", amount=MAX_MINOR + 1)).result is ClaimResult.ABOVE_AMOUNT_LIMIT
    posting = {"entry_id": "e1", "account_id": "A", "kind": "adjustment", "amount_minor": -MAX_MINOR - 1,
               "ts_ms": T0}
    assert book.posting(posting).result is ClaimResult.ABOVE_AMOUNT_LIMIT and book.claims == {}
