"""An account new to the state is opened (its opening entries) and then billed on the vectorised
wallet when no rule can fire, exactly as the per-event wallet bills it: the same entries (its
first day's standing charge included), balances after, order, alerts and state."""

from __future__ import annotations

import polars as pl
import pytest
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

T0 = ms(2024, 5, 6, 20)  # Shanghai evening: the batch crosses a local midnight
OPENING = {"rich": 1_000_000, "poor": 3_000, "none": 0, "land": 0}


def ctx(per_event: bool) -> RatingContext:
    t = Tariff(id="t", versions=[TariffVersion(prices={"flat": "1000"}, standing_charge_per_day=25)])
    pol = WalletPolicy(alert_levels=[5000, 1000], cutoff=-2000,
                       debt_recovery=DebtRecovery() if per_event else None)
    land = pol.model_copy(update={"protected": True, "alert_levels": []})  # no rule can fire
    accounts = {a: AccountRating(account_id=a, mall_id="m", tariff_id="t", policy=land if a == "land" else pol,
                                 opening_balance_minor=o) for a, o in OPENING.items()}
    circuits = {f"{a}.{k}": CircuitConfig(circuit_id=f"{a}.{k}", account_id=a) for a in OPENING for k in (1, 2)}
    return RatingContext(circuits, accounts, {"t": t}, {"m": Mall(mall_id="m", tz="Asia/Shanghai")}, lateness_ms=0)


def batch(first: int, n: int) -> pl.DataFrame:
    rows = [(c, "m-" + c, T0 + k * 900_000, 100 + k * (0.05 if c.startswith("rich") else 0.4))
            for k in range(first, first + n) for c in (f"{a}.{i}" for a in OPENING for i in (1, 2))]
    return readings(rows)


def run(c: RatingContext) -> tuple[CoreState, list[engine.BatchOutputs]]:
    state, outs = CoreState(), []
    for first, n in ((0, 24), (24, 8)):  # the first call opens every account
        state, out = process_batch(state, batch(first, n), None, c)
        outs.append(out)
    return state, outs


@pytest.mark.parametrize("splice_max", [engine.SPLICE_MAX, 0])  # the ledger spliced, or merged by a gather
def test_opened_accounts_on_the_vectorised_wallet_equal_the_per_event_wallet(monkeypatch, splice_max) -> None:
    monkeypatch.setattr(engine, "SPLICE_MAX", splice_max)
    per_event: list[str] = []
    slow = engine._slow_path
    monkeypatch.setattr(engine, "_slow_path", lambda s, *a: (per_event.append(s.account_id), slow(s, *a))[1])
    fast_state, fast = run(ctx(per_event=False))
    assert "rich" not in per_event and "land" not in per_event  # opened, then billed vectorised
    assert "poor" in per_event  # crosses its alert levels in the first call
    slow_state, slow_out = run(ctx(per_event=True))
    for x, y in zip(fast, slow_out, strict=True):
        assert x.ledger.drop("debt_change_minor").equals(y.ledger.drop("debt_change_minor"))
        assert x.alerts.equals(y.alerts) and x.commands.equals(y.commands)
    first = fast[0].ledger.filter(pl.col("account_id") == "rich")
    assert first["kind"].to_list()[:2] == ["opening_balance", "standing_charge"]
    assert first.filter(pl.col("kind") == "standing_charge").height == 2  # both local days
    for a in OPENING:
        f, s = fast_state.accounts[a].to_dict(), slow_state.accounts[a].to_dict()
        assert {k: v for k, v in f.items() if "recover" not in k} == {k: v for k, v in s.items() if "recover" not in k}
        assert f["balance"] == sum(int(o.ledger.filter(pl.col("account_id") == a)["amount_minor"].sum()) for o in fast)
