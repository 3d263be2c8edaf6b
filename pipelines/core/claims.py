"""Claims: each payment and posting id moves money at most once across the whole portfolio.

Why a separate store: an account that kept every payment, reversal and posting id it ever
saw grew without bound (a year of daily top-ups is 365 ids), and an id was unique only per
account, so the same provider id on two accounts credited both. Claims live in their own
store, keyed by the id, for a documented horizon (`CLAIM_HORIZON_DAYS`); the stream keeps
them in the `claims` table, partitioned by the id, so every use of an id meets the first.

The result is an enum, as in TigerBeetle's "exists with different amount": the same id with
the same account, kind and amount is a DUPLICATE (a provider's re-send: nothing moves, no
alert); the same id with anything else is rejected with the field that differs. A reversal
is claimed under the id it reverses, so it meets that top-up's claim: it is accepted only
for a top-up of the same account not reversed before, with the top-up's amount.

Pure: the caller passes the stored claim (or None) and stores what comes back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipelines.core.models import MAX_MINOR, WalletPolicy
from schemas.keys import account_shard

#: How long a claim is kept. A provider re-send or a reversal older than this is not
#: recognised (a reversal is then refused as "nothing to reverse"; a re-send would credit
#: again, so the horizon must exceed the providers' retry and chargeback windows).
CLAIM_HORIZON_DAYS = int(os.environ.get("MALLWATT_CLAIM_HORIZON_DAYS", 400))
DAY_MS = 86_400_000


class ClaimResult(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    EXISTS_WITH_DIFFERENT_ACCOUNT = "exists_with_different_account"
    EXISTS_WITH_DIFFERENT_KIND = "exists_with_different_kind"
    EXISTS_WITH_DIFFERENT_AMOUNT = "exists_with_different_amount"
    NOTHING_TO_REVERSE = "nothing_to_reverse"
    REVERSES_OTHER_ACCOUNT = "reverses_other_account"
    REVERSES_NON_TOPUP = "reverses_non_topup"
    ALREADY_REVERSED = "already_reversed"
    BELOW_MINIMUM_TOPUP = "below_minimum_topup"
    ABOVE_MAXIMUM_TOPUP = "above_maximum_topup"
    NOT_POSITIVE = "amount_not_positive"
    ABOVE_AMOUNT_LIMIT = "amount_above_limit"  # beyond MAX_MINOR: no real payment, and int64 columns overflow


@dataclass(frozen=True, slots=True)
class Claim:
    """What an id was first used for (payment: topup/refund; posting: its kind)."""

    account_id: str
    kind: str
    amount_minor: int
    ts_ms: int
    reversed_by: str | None = None  # the reversal's own id, once reversed

    def to_row(self) -> list[Any]:
        return [self.account_id, self.kind, self.amount_minor, self.ts_ms, self.reversed_by]

    @classmethod
    def from_row(cls, row: list[Any]) -> Claim:
        return cls(*row)


def claim_key(record: dict[str, Any], namespace: str = "pay") -> str:
    """The key a payment or posting is claimed under: a reversal under the id it reverses.
    Producers partition the payments and postings topics by this key."""
    if namespace == "pay" and str(record.get("kind", "")).lower() == "reversal":
        return f"pay:{record.get('reverses_payment_id')}"
    return f"{namespace}:{record['payment_id'] if namespace == 'pay' else record['entry_id']}"


def claim_partition(record: dict[str, Any], partitions: int, namespace: str = "pay") -> int:
    """The partition of mallwatt.payments (namespace "pay") or mallwatt.postings ("post")
    that a record must be produced to: the one holding its claim."""
    return account_shard(claim_key(record, namespace), partitions)


@dataclass(frozen=True, slots=True)
class Decision:
    result: ClaimResult
    stored: Claim | None  # the claim to store under the key (unchanged when nothing moved)
    amount_minor: int  # what the accepted payment moves (a reversal: the top-up's amount)

    @property
    def accepted(self) -> bool:
        return self.result is ClaimResult.ACCEPTED

    def reason(self, record_id: str) -> str:
        """A message naming what collided, for alerts and dead letters."""
        s = self.stored
        if s is None:
            return f"{record_id}: {self.result.value}"
        return (f"{record_id}: {self.result.value} (first used by account {s.account_id}, kind {s.kind}, "
                f"amount {s.amount_minor})")


def decide_payment(existing: Claim | None, payment: dict[str, Any], policy: WalletPolicy | None = None
                   ) -> Decision:
    """A Payment (payment_id, account_id, kind, amount_minor, ts_ms, reverses_payment_id)
    against the claim stored under its claim_key. The account's top-up limits are checked
    here, before the id is claimed, so a refused top-up leaves nothing to reverse."""
    kind = str(payment["kind"]).lower()
    account, amount = payment["account_id"], int(payment["amount_minor"])
    if kind == "reversal":
        return _decide_reversal(existing, payment["payment_id"], account)
    if existing is not None:
        return Decision(_compare(existing, account, kind, amount), existing, 0)
    if amount <= 0:
        return Decision(ClaimResult.NOT_POSITIVE, None, 0)
    if amount > MAX_MINOR:
        return Decision(ClaimResult.ABOVE_AMOUNT_LIMIT, None, 0)
    if kind == "topup" and policy is not None:
        if amount < policy.min_topup:
            return Decision(ClaimResult.BELOW_MINIMUM_TOPUP, None, 0)
        if policy.max_topup is not None and amount > policy.max_topup:
            return Decision(ClaimResult.ABOVE_MAXIMUM_TOPUP, None, 0)
    return Decision(ClaimResult.ACCEPTED, Claim(account, kind, amount, int(payment["ts_ms"])), amount)


def decide_posting(existing: Claim | None, posting: dict[str, Any]) -> Decision:
    """A LedgerPosting (entry_id, account_id, kind, amount_minor, ts_ms) against its claim."""
    account, kind, amount = posting["account_id"], str(posting["kind"]), int(posting["amount_minor"])
    if existing is None and abs(amount) > MAX_MINOR:
        return Decision(ClaimResult.ABOVE_AMOUNT_LIMIT, None, 0)
    if existing is None:
        return Decision(ClaimResult.ACCEPTED, Claim(account, kind, amount, int(posting["ts_ms"])), amount)
    return Decision(_compare(existing, account, kind, amount), existing, 0)


def _compare(existing: Claim, account: str, kind: str, amount: int) -> ClaimResult:
    if existing.account_id != account:
        return ClaimResult.EXISTS_WITH_DIFFERENT_ACCOUNT
    if existing.kind != kind:
        return ClaimResult.EXISTS_WITH_DIFFERENT_KIND
    if existing.amount_minor != amount:
        return ClaimResult.EXISTS_WITH_DIFFERENT_AMOUNT
    return ClaimResult.DUPLICATE


def _decide_reversal(original: Claim | None, reversal_id: str, account: str) -> Decision:
    if original is None:
        return Decision(ClaimResult.NOTHING_TO_REVERSE, None, 0)
    if original.reversed_by == reversal_id:
        same = original.account_id == account
        return Decision(ClaimResult.DUPLICATE if same else ClaimResult.REVERSES_OTHER_ACCOUNT, original, 0)
    if original.account_id != account:
        return Decision(ClaimResult.REVERSES_OTHER_ACCOUNT, original, 0)
    if original.kind != "topup":
        return Decision(ClaimResult.REVERSES_NON_TOPUP, original, 0)
    if original.reversed_by is not None:
        return Decision(ClaimResult.ALREADY_REVERSED, original, 0)
    reversed_claim = Claim(original.account_id, original.kind, original.amount_minor, original.ts_ms, reversal_id)
    return Decision(ClaimResult.ACCEPTED, reversed_claim, original.amount_minor)


def expired(claim: Claim, newest_ts_ms: int, horizon_days: int | None = None) -> bool:
    """Whether a claim is past the horizon, measured from the newest timestamp seen (never the
    wall clock), so the stream and a replay forget the same claims."""
    days = CLAIM_HORIZON_DAYS if horizon_days is None else horizon_days
    return claim.ts_ms < newest_ts_ms - days * DAY_MS


class ClaimBook:
    """Claims in memory, for offline replay and tests (the stream keeps them in a table)."""

    def __init__(self) -> None:
        self.claims: dict[str, Claim] = {}

    def payment(self, payment: dict[str, Any], policy: WalletPolicy | None = None) -> Decision:
        key = claim_key(payment, "pay")
        decision = decide_payment(self.claims.get(key), payment, policy)
        if decision.accepted and decision.stored is not None:
            self.claims[key] = decision.stored
        return decision

    def posting(self, posting: dict[str, Any]) -> Decision:
        key = claim_key(posting, "post")
        decision = decide_posting(self.claims.get(key), posting)
        if decision.accepted and decision.stored is not None:
            self.claims[key] = decision.stored
        return decision


def claim_payment_rows(rows: list[dict[str, Any]], policies: dict[str, WalletPolicy],
                       book: ClaimBook | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Payments in the given order through one ClaimBook (offline replay, tests): the accepted
    ones (a reversal with its top-up's amount) and the refused ones with their reason, as the
    stream's claim step decides them. Duplicates are neither: a re-send moves nothing."""
    book = book or ClaimBook()
    accepted: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for row in rows:
        policy = policies.get(row["account_id"])
        if policy is None:
            refused.append({**row, "reason": "unknown_account"})
            continue
        decision = book.payment(row, policy)
        if decision.accepted:
            accepted.append({**row, "amount_minor": decision.amount_minor})
        elif decision.result is not ClaimResult.DUPLICATE:
            refused.append({**row, "reason": decision.result.value})
    return accepted, refused
