"""Property-based checks of the whole batch step (hypothesis)."""

from __future__ import annotations

import polars as pl
from billing_helpers import make_ctx, ms, readings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import (
    CriticalPeak,
    DebtRecovery,
    Season,
    Tariff,
    TariffVersion,
    TierBlock,
    WalletPolicy,
)

MOD_WH = 100_000_000  # 99999.99 kWh + 0.01
T0 = ms(2024, 7, 31, 20)  # crosses a month end (tiers restart) and TOU boundaries
TARIFF = Tariff(id="p", versions=[TariffVersion(
    prices={"peak": "170.3", "flat": "100.07", "valley": "38.011"},
    weekday=[Season(hours="VVVVVVVVFFPPFFPPPPPFFFFF")],
    critical_peak=[CriticalPeak(months=[7], hours=[21, 22])],
    tiers=[TierBlock(upto_kwh=3), TierBlock(adder="7.5")], standing_charge_per_day=13)])

series = st.tuples(
    st.integers(0, MOD_WH - 1),  # first register value in Wh
    st.lists(st.tuples(st.integers(30_000, 90_000), st.integers(0, 800)), min_size=2, max_size=60),
    st.randoms(use_true_random=False),
)


def build(first: int, steps: list[tuple[int, int]]) -> tuple[list[tuple], int]:
    rows, ts, reg, total = [("c1", "m1", T0, first / 1000)], T0, first, 0
    for dt, wh in steps:
        ts, reg, total = ts + dt, (reg + wh) % MOD_WH, total + wh
        rows.append(("c1", "m1", ts, reg / 1000))
    return rows, total


def run(batches: list[list[tuple]], policy: WalletPolicy | None = None):
    ctx = make_ctx(TARIFF, policy or WalletPolicy(alert_levels=[50_000, 100], cutoff=-200), lateness_ms=300_000)
    state, ledgers, energy = CoreState(), [], 0
    pay = [{"payment_id": "p0", "account_id": "a1", "ts_ms": T0, "amount_minor": 10_000}]
    for i, b in enumerate(batches):
        state, out = process_batch(state, readings(b), pay if i == 0 else None, ctx, flush=i == len(batches) - 1)
        ledgers.append(out.ledger)
        energy += out.intervals["energy_wh"].sum()
    ledger = pl.concat(ledgers)
    return state, ledger, energy


def key(ledger: pl.DataFrame) -> list[tuple]:
    return ledger.select("entry_id", "kind", "amount_minor", "balance_after_minor").rows()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(series)
def test_batching_duplicates_and_shuffle_do_not_change_the_ledger(s):
    first, steps, rnd = s
    rows, total = build(first, steps)
    state, ledger, energy = run([rows])
    # reference invariants
    assert energy == total  # billed energy == register delta corrected for rollover
    assert state.circuits["c1"].billed_wh == total
    assert state.accounts["a1"].balance == ledger["amount_minor"].sum()
    assert (ledger.filter(pl.col("kind") == "charge")["amount_minor"] < 0).all()

    # the same readings, shuffled within blocks of 3 (< lateness), with duplicates, in random batches
    noisy: list[tuple] = []
    for i in range(0, len(rows), 3):
        block = rows[i:i + 3] + [r for r in rows[i:i + 3] if rnd.random() < 0.3]
        rnd.shuffle(block)
        noisy += block
    cuts = sorted(rnd.sample(range(1, len(noisy)), k=min(3, len(noisy) - 1)))
    batches = [noisy[a:b] for a, b in zip([0, *cuts], [*cuts, len(noisy)], strict=True)]
    state2, ledger2, energy2 = run(batches)
    assert energy2 == total
    assert sorted(key(ledger2)) == sorted(key(ledger))
    assert state2.accounts["a1"].balance == state.accounts["a1"].balance


@settings(max_examples=20, deadline=None)
@given(series)
def test_fast_path_equals_per_event_wallet(s):
    first, steps, _ = s
    rows, _ = build(first, steps)
    # a (no-op) debt-recovery policy forces every account through the per-event wallet
    slow = WalletPolicy(alert_levels=[50_000, 100], cutoff=-200, debt_recovery=DebtRecovery())
    _, fast_ledger, _ = run([rows[: len(rows) // 2], rows[len(rows) // 2:]])
    _, slow_ledger, _ = run([rows[: len(rows) // 2], rows[len(rows) // 2:]], slow)
    assert sorted(key(fast_ledger)) == sorted(key(slow_ledger))


def test_state_round_trips_through_bytes():
    rows, _ = build(5_000, [(60_000, 100)] * 10)
    state, _, _ = run([rows])
    assert CoreState.from_bytes(state.to_bytes()).to_dict() == state.to_dict()
