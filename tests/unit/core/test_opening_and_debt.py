"""Opening balances and arrears enter as ledger entries when the core first sees an account; the
operator can add or write off debt; debt_recovery works from them. Balance and debt both equal
the sums of their ledger columns."""

from __future__ import annotations

from decimal import Decimal

import polars as pl
from billing_helpers import ms, readings

from pipelines.core.context import RatingContext
from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import (
    AccountRating,
    CircuitConfig,
    DebtRecovery,
    Mall,
    Tariff,
    WalletPolicy,
)
from pipelines.core.postings import apply_postings
from pipelines.core.replay import replay

T0 = ms(2024, 5, 6, 12)  # a Monday, noon Shanghai
DAY0 = ms(2024, 5, 6)


def ctx(opening: int = 0, debt: int = 0, recovery: DebtRecovery | None = None) -> RatingContext:
    t = Tariff.flat("t", 1000)  # 1 Wh = 1 fen
    policy = WalletPolicy(alert_levels=[], debt_recovery=recovery)
    return RatingContext(
        circuits={"c1": CircuitConfig(circuit_id="c1", account_id="a1")},
        accounts={"a1": AccountRating(account_id="a1", mall_id="m", tariff_id="t", policy=policy,
                                      opening_balance_minor=opening, opening_debt_minor=debt)},
        tariffs={"t": t}, malls={"m": Mall(mall_id="m")}, lateness_ms=0)


def pay(pid: str, amount: int, ts: int) -> dict:
    return {"payment_id": pid, "account_id": "a1", "ts_ms": ts, "amount_minor": amount, "kind": "topup",
            "reverses_payment_id": None}


def check_sums(state: CoreState, ledger: pl.DataFrame) -> None:
    s = state.accounts["a1"]
    assert s.balance == ledger["amount_minor"].sum()
    assert s.debt == ledger["debt_change_minor"].fill_null(0).sum()


def test_opening_balance_is_the_first_entry_and_posted_once() -> None:
    c = ctx(opening=648)
    rows = [("c1", "m1", T0 + i * 60_000, 10.0 + i * 0.1) for i in range(3)]  # 2 x 100 Wh
    state, out = process_batch(CoreState(), readings(rows[:2]), None, c)
    first = out.ledger.row(0, named=True)
    assert (first["entry_id"], first["kind"], first["amount_minor"], first["ts_ms"]) == \
        ("a1:opening_balance", "opening_balance", 648, DAY0)
    state, out2 = process_batch(state, readings(rows[2:]), None, c)  # a known account: no second opening
    assert "opening_balance" not in out2.ledger["kind"].to_list()
    assert state.accounts["a1"].balance == 648 - 200
    check_sums(state, pl.concat([out.ledger, out2.ledger]))


def test_opening_debt_recovered_by_percent_of_topup_with_cap() -> None:
    c = ctx(debt=1000, recovery=DebtRecovery(percent_of_topup=Decimal(10), cap_per_period=150))
    pays = [pay("p1", 1000, T0), pay("p2", 1000, T0 + 1000)]
    state, out = process_batch(CoreState(), readings([]), pays, c)
    kinds = out.ledger.select("kind", "amount_minor", "debt_change_minor").rows()
    assert kinds == [("debt_opening", 0, 1000), ("topup", 1000, None), ("debt_recovery", -100, -100),
                     ("topup", 1000, None), ("debt_recovery", -50, -50)]  # cap 150 per week
    s = state.accounts["a1"]
    assert (s.balance, s.debt) == (1850, 850)
    check_sums(state, out.ledger)


def test_operator_adds_and_writes_off_debt_and_fixed_recovery_follows() -> None:
    c = ctx(recovery=DebtRecovery(fixed_per_period=200, period="day"))
    state, out1 = process_batch(CoreState(), readings([]), [pay("p1", 5000, T0)], c)
    post = [{"entry_id": "add-1", "account_id": "a1", "kind": "debt_add", "amount_minor": 700, "ts_ms": T0 + 10,
             "source_id": "migration"},
            {"entry_id": "off-1", "account_id": "a1", "kind": "debt_writeoff", "amount_minor": 100,
             "ts_ms": T0 + 20, "source_id": "goodwill"},
            {"entry_id": "off-2", "account_id": "a1", "kind": "debt_writeoff", "amount_minor": 9999,
             "ts_ms": T0 + 30, "source_id": "too much"}]
    state, out2 = apply_postings(state, post, c)
    assert out2.ledger.select("entry_id", "amount_minor", "debt_change_minor").rows() == \
        [("add-1", 0, 700), ("off-1", 0, -100)]
    assert out2.rejected_payments["reason"].to_list() == ["write-off 9999 exceeds the debt 600"]
    assert (state.accounts["a1"].balance, state.accounts["a1"].debt) == (5000, 600)
    # the next local day: the fixed recovery takes 200 from the balance and the debt
    state, out3 = process_batch(state, readings([]), [pay("p2", 100, T0 + 86_400_000)], c)
    rec = out3.ledger.filter(pl.col("kind") == "debt_recovery")
    assert rec.select("amount_minor", "debt_change_minor").rows() == [(-200, -200)]
    assert (state.accounts["a1"].balance, state.accounts["a1"].debt) == (4900, 400)
    check_sums(state, pl.concat([out1.ledger, out2.ledger, out3.ledger]))


def test_a_posting_to_a_new_account_opens_it_first() -> None:
    c = ctx(opening=300, debt=50)
    post = [{"entry_id": "adj-1", "account_id": "a1", "kind": "adjustment", "amount_minor": 20, "ts_ms": T0,
             "source_id": "x"}]
    state, out = apply_postings(CoreState(), post, c)
    assert out.ledger["kind"].to_list() == ["opening_balance", "debt_opening", "adjustment"]
    assert (state.accounts["a1"].balance, state.accounts["a1"].debt) == (320, 50)


def test_replay_in_any_batch_size_posts_the_same_opening_entries() -> None:
    c = ctx(opening=500, debt=300, recovery=DebtRecovery(percent_of_topup=Decimal(50)))
    rows = [("c1", "m1", T0 + i * 60_000, 10.0 + i * 0.1) for i in range(6)]
    payments = pl.DataFrame([pay("p1", 400, T0 + 150_000)])
    results = [replay(c, readings(rows), payments, batch_size=b) for b in (1, 2, 100)]
    ledgers = [t["ledger"].sort("entry_id") for _, t in results]
    assert all(x.equals(ledgers[0]) for x in ledgers[1:])
    s = results[0][0].accounts["a1"]
    assert (s.balance, s.debt) == (500 - 500 + 400 - 200, 100)
    check_sums(results[0][0], ledgers[0])
