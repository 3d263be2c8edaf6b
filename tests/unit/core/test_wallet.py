"""Worked wallet examples, event by event (amounts in fen; 1 fen = 1e9 nano)."""

from __future__ import annotations

from billing_helpers import make_ctx, ms

from pipelines.core.models import AMOUNT_SCALE, DebtRecovery, FriendlyCredit, Tariff, WalletPolicy
from pipelines.core.wallet import (
    AccountState,
    Charge,
    Payment,
    Wallet,
    WalletOut,
    evaluate_deferred,
)

N = AMOUNT_SCALE
T0 = ms(2024, 5, 6, 12)  # a Monday noon, Asia/Shanghai


def wallet(policy: WalletPolicy, balance: int = 0, tariff: Tariff | None = None, **state) -> tuple[Wallet, WalletOut]:
    ctx = make_ctx(tariff, policy)
    s = AccountState("a1", balance=balance, standing_day="2024-05-06", **state)
    out = WalletOut()
    return Wallet(s, ctx.accounts["a1"], ctx.tariffs[ctx.accounts["a1"].tariff_id], "Asia/Shanghai",
                  frozenset(), out), out


def chg(w: Wallet, fen: float, ts: int = T0, key: str = "k") -> None:
    w.charge(Charge(ts, int(fen * N), f"{key}:{ts}"))


def pay(w: Wallet, pid: str, amount: int, ts: int = T0, kind: str = "topup", rev: str | None = None) -> None:
    w.payment(Payment(pid, ts, amount, kind, rev))


def check_sum(w: Wallet, out: WalletOut, opening: int = 0) -> None:
    assert w.s.balance == opening + sum(e["amount_minor"] for e in out.ledger)


def test_floor_rounding_carries_the_residue():
    # three charges of 0.4 fen: posted 0, 0, 1 (floor 0.4, floor 0.8, floor 1.2 = 1); residue 0.2
    w, out = wallet(WalletPolicy(alert_levels=[]), 1000)
    for i in range(3):
        chg(w, 0.4, T0 + i)
    assert [e["amount_minor"] for e in out.ledger] == [-1]
    assert w.s.acc_n == N // 5 and w.s.balance == 999
    check_sum(w, out, 1000)


def test_alert_hysteresis_one_per_crossing_rearmed_by_topup():
    w, out = wallet(WalletPolicy(alert_levels=[500, 100]), 600)
    chg(w, 150, T0 + 1)  # 450: crosses 500 -> alert
    chg(w, 50, T0 + 2)  # 400: no new alert
    pay(w, "p1", 300, T0 + 3)  # 700: re-arms 500
    chg(w, 220, T0 + 4)  # 480: alert again
    lows = [a for a in out.alerts if a["kind"] == "low_balance"]
    assert [(a["details"]["level"], a["details"]["balance"]) for a in lows] == [("500", "450"), ("500", "480")]
    check_sum(w, out, 600)


def test_cutoff_trip_and_reconnect_only_above_cutoff():
    w, out = wallet(WalletPolicy(alert_levels=[], cutoff=-100), 50)
    chg(w, 120, T0 + 1)  # -70: overdraft still allowed
    assert not out.commands
    chg(w, 40, T0 + 2)  # -110 <= -100: trip
    pay(w, "p1", 5, T0 + 3)  # -105: still tripped
    pay(w, "p2", 10, T0 + 4)  # -95 > -100: reconnect
    assert [(c["action"], c["reason"]) for c in out.commands] == [("TRIP", "credit"), ("RECONNECT", "topup")]


def test_emergency_credit_draw_and_repay():
    w, out = wallet(WalletPolicy(alert_levels=[], emergency_credit=500), 100)
    chg(w, 150, T0 + 1)  # -50 -> draw 500 -> 450, owed 500, no trip
    assert w.s.balance == 450 and w.s.ec_owed == 500 and not out.commands
    chg(w, 500, T0 + 2)  # -50, credit already drawn -> trip
    pay(w, "p1", 400, T0 + 3)  # -50 + 400 = 350, repay min(500, 400) -> -50 (owed 100): still tripped
    assert w.s.balance == -50 and w.s.ec_owed == 100 and w.s.relay == "tripped"
    pay(w, "p2", 300, T0 + 4)  # -50 + 300 = 250, repay 100 -> 150 > 0: reconnect
    assert w.s.balance == 150 and w.s.ec_owed == 0
    kinds = [e["kind"] for e in out.ledger]
    assert kinds.count("emergency_credit_draw") == 1 and kinds.count("emergency_credit_repay") == 2
    assert [c["action"] for c in out.commands] == ["TRIP", "RECONNECT"]
    check_sum(w, out, 100)


def test_friendly_credit_defers_trip_until_period_ends():
    p = WalletPolicy(alert_levels=[], friendly=FriendlyCredit(weekday_hours=[(18, 8)]))
    w, out = wallet(p, 10)
    chg(w, 20, ms(2024, 5, 6, 20))  # -10 at 20:00: friendly -> deferred, no trip
    chg(w, 5, ms(2024, 5, 7, 7, 45))  # still friendly
    assert not out.commands and w.s.deferred
    chg(w, 5, ms(2024, 5, 7, 8, 15))  # first event after 08:00 -> trip
    assert [c["action"] for c in out.commands] == ["TRIP"] and w.s.balance == -20


def test_evaluate_deferred_timer_trips_after_period():
    p = WalletPolicy(alert_levels=[], friendly=FriendlyCredit(weekends=True))
    w, out = wallet(p, 10)
    chg(w, 20, ms(2024, 5, 11, 20))  # Saturday: deferred
    ctx = make_ctx(None, p)
    s, o = evaluate_deferred(w.s, ms(2024, 5, 12, 23), ctx.accounts["a1"], ctx.tariffs["t"], "Asia/Shanghai", frozenset())
    assert not o.commands  # still Sunday
    s, o = evaluate_deferred(s, ms(2024, 5, 13, 0, 1), ctx.accounts["a1"], ctx.tariffs["t"], "Asia/Shanghai", frozenset())
    assert [c["action"] for c in o.commands] == ["TRIP"] and s.relay == "tripped"


def test_protected_account_billed_and_alerted_never_tripped():
    w, out = wallet(WalletPolicy(alert_levels=[100], protected=True), 50)
    chg(w, 500, T0 + 1)
    assert w.s.balance == -450 and not out.commands and [a["kind"] for a in out.alerts] == ["low_balance"]


def test_warning_trip_once_then_cutoff():
    w, out = wallet(WalletPolicy(alert_levels=[], warning_trip_level=100), 300)
    chg(w, 250, T0 + 1)  # 50 <= 100: warning trip
    assert [(c["action"], c["reason"]) for c in out.commands] == [("TRIP", "warning")]
    pay(w, "p1", 100, T0 + 2)  # 150 > 100: reconnect, warning re-armed
    chg(w, 60, T0 + 3)  # 90: warning trip again
    assert [c["reason"] for c in out.commands] == ["warning", "topup", "warning"]


def test_debt_recovery_percent_with_weekly_cap():
    p = WalletPolicy(alert_levels=[], debt_recovery=DebtRecovery(percent_of_topup=10, cap_per_period=50))
    w, out = wallet(p, 0, debt=1000)
    pay(w, "p1", 300, T0)  # 10 % = 30
    pay(w, "p2", 400, T0 + 1)  # 10 % = 40, only 20 left under the cap of 50
    pay(w, "p3", 100, ms(2024, 5, 13, 12))  # next ISO week: 10
    rec = [-e["amount_minor"] for e in out.ledger if e["kind"] == "debt_recovery"]
    assert rec == [30, 20, 10] and w.s.debt == 940 and w.s.balance == 800 - 60
    check_sum(w, out)


def test_reversal_debits_the_amount_its_claim_carries():
    # duplicates, limits and "nothing to reverse" are decided by the claims (test_claims.py)
    w, out = wallet(WalletPolicy(alert_levels=[]), 0)
    pay(w, "p1", 500)
    pay(w, "r1", 500, kind="reversal", rev="p1")
    assert w.s.balance == 0 and [e["kind"] for e in out.ledger] == ["topup", "reversal"]
    assert out.ledger[1]["source_id"] == "p1" and out.ledger[1]["amount_minor"] == -500
    check_sum(w, out)


def test_standing_charge_per_local_day_with_deterministic_ids():
    w, out = wallet(WalletPolicy(alert_levels=[]), 1000, tariff=Tariff.flat("t", 1000, standing_charge_per_day=30))
    chg(w, 0, ms(2024, 5, 8, 9))  # charges 05-07 and 05-08
    assert [(e["entry_id"], e["amount_minor"]) for e in out.ledger] == [
        ("a1:standing:2024-05-07", -30), ("a1:standing:2024-05-08", -30)]


def test_refund_cannot_exceed_balance():
    w, out = wallet(WalletPolicy(alert_levels=[]), 100)
    pay(w, "f1", 150, kind="refund")
    pay(w, "f2", 60, kind="refund")
    assert w.s.balance == 40 and [r["reason"] for r in out.rejected] == ["refund exceeds available balance"]
