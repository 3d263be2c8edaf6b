"""The stream's claim step: a payment or posting against the claim stored under its key.

    mallwatt.payments / mallwatt.postings (partition = claim key's shard)
        -> claims table (key = claim key; value = the claim + the outbox of its last change)
        -> forwarder -> mallwatt.payments-accepted / mallwatt.postings-accepted
           (partition = account shard) -> the account's wallet

The accepted record carries the partition and offset of the input that won the claim; the
wallet uses them as its high-water mark, so a forwarder that publishes an accepted record
twice moves no money twice, and the account state never holds an id. No Kafka here.

Before the claim, a posting or manual top-up must carry a valid operator signature within its
role's and account's limits (pipelines.core.money_authority); a refusal is a routing problem
(dead letter with the verdict) plus an audit event (`refused_money_audit`), and an accepted
signed record is audited with its verified signer through the claim's outbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from infra import topics as T
from pipelines.audit import audit_item, audit_record
from pipelines.context import BillingContext
from pipelines.core.claims import (
    Claim,
    ClaimResult,
    Decision,
    claim_key,
    decide_payment,
    decide_posting,
    expired,
)
from pipelines.core.money_authority import MoneyDecision, decide_money
from pipelines.envelope import OutboxItem, frame_value, pack_state, unframe_value
from schemas import codec
from schemas.keys import account_shard

NAMESPACES = {T.PAYMENTS: "pay", T.POSTINGS: "post"}


def encode_claim(claim: Claim | None, outbox: list[OutboxItem]) -> bytes:
    return frame_value(outbox, pack_state(claim.to_row() if claim else None))


def decode_claim(raw: bytes | None) -> Claim | None:
    if not raw:
        return None
    _, state = unframe_value(raw)
    row = msgpack.unpackb(state, raw=False)
    return Claim.from_row(row) if row is not None else None


@dataclass(frozen=True)
class ClaimStep:
    key: str
    decision: Decision
    value: bytes | None  # what to store under `key` (None: nothing changed, nothing to publish)


def record_problem(record: dict[str, Any], topic: str, partition: int, ctx: BillingContext) -> str | None:
    """Why a payment or posting cannot be claimed here (a routing problem: dead letter)."""
    namespace = NAMESPACES[topic]
    account = record["account_id"]
    if account not in ctx.accounts:
        return f"unknown account {account!r}"
    owner = account_shard(claim_key(record, namespace), ctx.partitions)
    if owner != partition:
        return (f"claim key {claim_key(record, namespace)!r} belongs to partition {owner}, not {partition} "
                f"(produce with pipelines.core.claims.claim_partition)")
    return money_decision(record, ctx).problem()


def money_decision(record: dict[str, Any], ctx: BillingContext) -> MoneyDecision:
    """pipelines.core.money_authority.decide_money against the current config."""
    rating = ctx.accounts.get(record["account_id"])
    return decide_money(record, ctx.config.rules.security, known_account=rating is not None,
                        policy=rating.policy if rating is not None else None)


def _money_action(record: dict[str, Any]) -> str:
    return "money.post" if "entry_id" in record else f"money.{str(record['kind']).lower()}"


def refused_money_audit(record: dict[str, Any], ctx: BillingContext, problem: str) -> dict[str, Any]:
    """A refused posting or manual payment: the verified signer, else the claimed one marked
    unverified (a forged record must not be booked under the name it claims)."""
    decision = money_decision(record, ctx)
    claimed = record.get("operator_id")
    principal = decision.principal or (f"unverified:{claimed}" if claimed else "anonymous")
    record_id = record.get("entry_id") or record.get("payment_id")
    return audit_record(int(record["ts_ms"]), principal, f"{_money_action(record)}.refused",
                        f"account:{record['account_id']}", decision.verdict.value, "worker",
                        f"{record_id} amount_minor {record['amount_minor']}: {problem}",
                        event_id=f"{record_id}:money:refused")


def claim_step(existing: Claim | None, record: dict[str, Any], topic: str, partition: int, offset: int,
               ctx: BillingContext) -> ClaimStep:
    """Decide a decoded Payment (topic mallwatt.payments) or LedgerPosting (mallwatt.postings)."""
    namespace = NAMESPACES[topic]
    key = claim_key(record, namespace)
    account = record["account_id"]
    if namespace == "pay":
        decision = decide_payment(existing, record, ctx.accounts[account].policy)
    else:
        decision = decide_posting(existing, record)
    if decision.result is ClaimResult.DUPLICATE:  # a re-send: nothing moves, nothing to say
        return ClaimStep(key, decision, None)
    if decision.accepted:
        accepted = {**record, "claim_partition": partition, "claim_offset": offset}
        if namespace == "pay":
            accepted["amount_minor"] = decision.amount_minor  # a reversal moves the top-up's amount
        item = OutboxItem(T.PAYMENTS_ACCEPTED if namespace == "pay" else T.POSTINGS_ACCEPTED, account.encode(),
                          codec.encode("Payment" if namespace == "pay" else "LedgerPosting", accepted),
                          account_shard(account, ctx.partitions))
        outbox = [item]
        if record.get("operator_id"):  # an operator's money command: audited under its verified signer
            outbox.append(_accepted_audit(record, ctx, decision.amount_minor))
        return ClaimStep(key, decision, encode_claim(decision.stored, outbox))
    record_id = record["payment_id"] if namespace == "pay" else record["entry_id"]
    alert = {"alert_id": f"{record_id}:claim:{decision.result.value}",
             "kind": "rejected_topup" if namespace == "pay" else "rejected_posting", "severity": "WARNING",
             "mall_id": ctx.account_mall.get(account, "unknown"), "account_id": account, "meter_id": None,
             "ts_ms": int(record["ts_ms"]),
             "message": f"{'payment' if namespace == 'pay' else 'posting'} refused: {decision.reason(record_id)}",
             "details": {"reason": decision.result.value, "amount_minor": str(record["amount_minor"]),
                         "kind": str(record["kind"])}}
    item = OutboxItem(T.ALERTS, account.encode(), codec.encode("Alert", alert))
    return ClaimStep(key, decision, encode_claim(existing, [item]))


def _accepted_audit(record: dict[str, Any], ctx: BillingContext, amount_minor: int) -> OutboxItem:
    record_id = record.get("entry_id") or record.get("payment_id")
    principal = money_decision(record, ctx).principal or f"unverified:{record['operator_id']}"
    return audit_item(audit_record(int(record["ts_ms"]), principal, _money_action(record),
                                   f"account:{record['account_id']}", "accepted", "worker",
                                   f"{record_id} amount_minor {amount_minor} kind {record['kind']}",
                                   event_id=f"{record_id}:money:accepted"))


def accepted_position(record: dict[str, Any], topic: str) -> tuple[str, int] | None:
    """The wallet's high-water mark source and offset of an accepted record (None: unclaimed)."""
    if record.get("claim_partition") is None or record.get("claim_offset") is None:
        return None
    origin = T.PAYMENTS if topic == T.PAYMENTS_ACCEPTED else T.POSTINGS
    return f"{origin}:{record['claim_partition']}", int(record["claim_offset"])


#: Claims looked at per sweep tick. A tick costs about 2 us per claim on the event loop, so a
#: slice of 2,000 pauses billing for a few ms; 20M claims (350,000 merchants with weekly
#: top-ups over the horizon) take a pass of under 3 hours at one tick a second.
SWEEP_KEYS_PER_TICK = 2_000


class ClaimSweeper:
    """Forgets claims past the horizon from the worker's local store, a bounded slice per tick.

    It used to list every key once an hour (20M keys: gigabytes and seconds of event loop in
    one call). Now one pass walks the store with a live iterator, `budget` keys per tick, and
    a new pass starts at most every `pass_interval_s`. The changelog's retention (the same
    horizon) forgets them for a restart, so only the local store is touched, never the
    changelog. A rebalance (a new `generation`) ends the pass: its iterator may belong to
    partitions this worker no longer holds. Expiry compares claim times with the newest
    claimed timestamp (`core.claims.expired`), never the wall clock; `now_s` only paces passes.
    """

    def __init__(self, iter_keys: Any, get: Any, delete: Any, *, budget: int = SWEEP_KEYS_PER_TICK,
                 pass_interval_s: float = 3600.0) -> None:
        self._iter_keys, self._get, self._delete = iter_keys, get, delete
        self.budget = budget
        self.pass_interval_s = pass_interval_s
        self._keys: Any = None  # the current pass's iterator, None between passes
        self._generation: int | None = None
        self._pass_started_s: float | None = None
        self.passes_done = 0
        self.forgotten = 0

    def tick(self, newest_ts_ms: int, generation: int, now_s: float) -> int:
        """Look at up to `budget` claims; returns how many were forgotten."""
        if not newest_ts_ms:
            return 0
        if generation != self._generation:
            self._keys, self._generation = None, generation
        if self._keys is None:
            if self._pass_started_s is not None and now_s - self._pass_started_s < self.pass_interval_s:
                return 0
            self._keys, self._pass_started_s = iter(self._iter_keys()), now_s
        gone = 0
        for _ in range(self.budget):
            key = next(self._keys, None)
            if key is None:
                self._keys = None
                self.passes_done += 1
                break
            claim = decode_claim(self._get(key))
            if claim is not None and expired(claim, newest_ts_ms):
                self._delete(key)
                gone += 1
        self.forgotten += gone
        return gone
