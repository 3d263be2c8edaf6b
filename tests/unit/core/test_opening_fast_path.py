"""The vectorised wallet posts every charge that can fire no rule, and the per-event wallet takes
over from the first one that might (or from a payment): an account new to the state is opened
(its opening entries) and billed vectorised; an account crossing a level, or receiving a payment,
mid-batch has its charges before that point posted vectorised. All exactly as the per-event
wallet alone posts them: the same entries (standing charges included), balances after, order,
alerts, commands and states."""

from __future__ import annotations

from collections import Counter

import polars as pl
from billing_helpers import ms, readings

from pipelines.core import engine
from pipelines.core.context import RatingContext
from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import (
    AccountRating,
    CircuitConfig,
    DebtRecovery,
    Mall,
    Tariff,
    TariffVersion,
    WalletPolicy,
)

T0 = ms(2024, 5, 6, 20)  # Shanghai evening: the first batch crosses a local midnight
STEP = 900_000
OPENING = {"rich": 1_000_000, "poor": 9_000, "edge": 5_825, "payer": 500_000, "late": 500_000, "none": 0, "land": 0}
# edge: after its first day's standing charge (25) and two charges of 400, exactly at a level (5000): it fires
PAYMENTS = [  # second call (steps 24..31): one mid-batch, one after its last reading
    {"payment_id": "p1", "account_id": "payer", "ts_ms": T0 + 27 * STEP + 1, "amount_minor": 7_000, "kind": "topup"},
    {"payment_id": "p2", "account_id": "late", "ts_ms": T0 + 40 * STEP, "amount_minor": 9_000, "kind": "topup"}]


SLOW_PATH = engine._slow_path


def ctx(per_event: bool) -> RatingContext:
    t = Tariff(id="t", versions=[TariffVersion(prices={"flat": "1000"}, standing_charge_per_day=25)])  # 1 fen/Wh
    pol = WalletPolicy(alert_levels=[5000, 1000], cutoff=-2000,
                       debt_recovery=DebtRecovery() if per_event else None)  # debt recovery: per-event only
    land = pol.model_copy(update={"protected": True, "alert_levels": []})  # no rule can fire
    accounts = {a: AccountRating(account_id=a, mall_id="m", tariff_id="t", policy=land if a == "land" else pol,
                                 opening_balance_minor=o) for a, o in OPENING.items()}
    circuits = {f"{a}.{k}": CircuitConfig(circuit_id=f"{a}.{k}", account_id=a) for a in OPENING for k in (1, 2)}
    return RatingContext(circuits, accounts, {"t": t}, {"m": Mall(mall_id="m", tz="Asia/Shanghai")}, lateness_ms=0)


def batch(first: int, n: int) -> pl.DataFrame:
    rows = [(c, "m-" + c, T0 + k * STEP, 100 + k * (0.05 if c.startswith("rich") else 0.4))
            for k in range(first, first + n) for c in (f"{a}.{i}" for a in OPENING for i in (1, 2))]
    return readings(rows)


def run(c: RatingContext, monkeypatch) -> tuple[CoreState, list[engine.BatchOutputs], list[Counter]]:
    """Two calls; per call, the charges each account's per-event wallet received."""
    state, outs, seen = CoreState(), [], []
    slow = SLOW_PATH

    def counting(s, chs, *a):
        seen[-1][s.account_id] += len(chs) or 0.5  # an account with no charge left (a payment only) counts
        return slow(s, chs, *a)

    monkeypatch.setattr(engine, "_slow_path", counting)
    for (first, n), pays in (((0, 24), None), ((24, 8), PAYMENTS)):
        seen.append(Counter())
        state, out = process_batch(state, batch(first, n), pays, c)
        outs.append(out)
    return state, outs, seen


def test_vectorised_prefix_equals_the_per_event_wallet(monkeypatch) -> None:
    fast_state, fast, fast_seen = run(ctx(per_event=False), monkeypatch)
    slow_state, slow, slow_seen = run(ctx(per_event=True), monkeypatch)
    for x, y in zip(fast, slow, strict=True):
        assert x.ledger.drop("debt_change_minor").equals(y.ledger.drop("debt_change_minor"))
        assert x.alerts.equals(y.alerts) and x.commands.equals(y.commands)
    for a in OPENING:
        f, s = fast_state.accounts[a].to_dict(), slow_state.accounts[a].to_dict()
        assert {k: v for k, v in f.items() if "recover" not in k} == {k: v for k, v in s.items() if "recover" not in k}
        assert f["balance"] == sum(int(o.ledger.filter(pl.col("account_id") == a)["amount_minor"].sum()) for o in fast)
    # which path billed what: opened accounts vectorised, the others per event only from their point on
    assert not {"rich", "land"} & set(fast_seen[0])
    assert 0 < fast_seen[0]["poor"] < slow_seen[0]["poor"]  # crossed its levels mid-batch
    assert 0 < fast_seen[1]["payer"] < slow_seen[1]["payer"]  # a payment mid-batch
    assert fast_seen[1]["late"] == 0.5  # its payment came after all of its charges
    first = fast[0].ledger.filter(pl.col("account_id") == "rich")
    assert first["kind"].to_list()[:2] == ["opening_balance", "standing_charge"]
    assert first.filter(pl.col("kind") == "standing_charge").height == 2  # both local days
    assert "low_balance" in fast[0].alerts.filter(pl.col("account_id") == "poor")["kind"].to_list()
