"""Worked examples for the interval step (register resolution 0.01 kWh = 10 Wh)."""

from __future__ import annotations

from decimal import Decimal

from billing_helpers import readings

from pipelines.core.interval import compute_intervals
from pipelines.core.models import CircuitConfig

MIN = 60_000


def cfg(**kw):
    return {"c1": CircuitConfig(circuit_id="c1", account_id="a1", **kw)}


def run(rows, states=None, flush=True, **kw):
    return compute_intervals(states or {}, readings(rows), cfg(**kw.pop("c", {})), flush=flush, **kw)


def test_rollover_at_99999_99():
    # 99999.90 -> 0.05 kWh: wrapped delta = (100000.00 - 99999.90) + 0.05 = 0.15 kWh = 150 Wh
    _, iv, rej = run([("c1", "m1", 0, 99999.90), ("c1", "m1", MIN, 0.05)])
    assert iv["energy_wh"].to_list() == [150]
    assert iv["flag"].to_list() == ["rollover"]
    assert rej.is_empty()


def test_uint32_rollover_42949672_95():
    # 42949672.90 -> 0.10: (42949672.96 - 42949672.90) + 0.10 = 0.16 kWh = 160 Wh
    _, iv, _ = run([("c1", "m1", 0, 42949672.90), ("c1", "m1", MIN, 0.10)],
                   c={"register_max_kwh": Decimal("42949672.95")})
    assert iv["energy_wh"].to_list() == [160]


def test_meter_swap_keeps_energy_before_and_never_bills_negative():
    # m1: 500.00 -> 500.20 (200 Wh); swap to m2 at 0.10 (0 Wh, "replaced"); m2 0.10 -> 0.30 (200 Wh)
    s, iv, _ = run([("c1", "m1", 0, 500.0), ("c1", "m1", MIN, 500.2), ("c1", "m2", 2 * MIN, 0.1),
                    ("c1", "m2", 3 * MIN, 0.3)])
    assert iv["energy_wh"].to_list() == [200, 0, 200]
    assert iv["flag"].to_list() == ["", "replaced", ""]
    assert s["c1"].billed_wh == 400


def test_reset_same_meter_starts_new_baseline():
    # 500.00 -> 10.00 is no plausible rollover (needs 99,510 kWh in a minute) -> reset, 0 Wh;
    # then 10.00 -> 10.50 = 500 Wh
    _, iv, _ = run([("c1", "m1", 0, 500.0), ("c1", "m1", MIN, 10.0), ("c1", "m1", 2 * MIN, 10.5)])
    assert iv["energy_wh"].to_list() == [0, 500]
    assert iv["flag"].to_list() == ["reset", ""]


def test_duplicates_within_and_across_batches_bill_once():
    rows = [("c1", "m1", 0, 1.0), ("c1", "m1", MIN, 1.1), ("c1", "m1", MIN, 1.1)]
    s, iv, rej = run(rows)
    assert iv["energy_wh"].to_list() == [100]
    s, iv2, rej2 = run(rows, states=s)
    assert iv2.is_empty()
    assert set(rej["reason"]) == {"duplicate"}
    # an already-billed older reading cannot be told from a late one: either way, no energy
    assert set(rej2["reason"]) == {"duplicate", "late"}


def test_out_of_order_within_lateness_and_late_reading_becomes_adjustment():
    lat = 2 * MIN
    s, iv, _ = run([("c1", "m1", 0, 1.0), ("c1", "m1", 2 * MIN, 1.2)], flush=False, lateness_ms=lat)
    assert iv.is_empty()  # the 2-min reading waits for stragglers; the first sets the baseline
    s, iv, _ = run([("c1", "m1", MIN, 1.1), ("c1", "m1", 5 * MIN, 1.5)], states=s, flush=False, lateness_ms=lat)
    # watermark = 5 - 2 = 3 min: 0->1 (100 Wh) and 1->2 (100 Wh) released in time order
    assert iv.select("start_ms", "energy_wh").rows() == [(0, 100), (MIN, 100)]
    s, iv, rej = run([("c1", "m1", MIN + 30_000, 1.15)], states=s, flush=False, lateness_ms=lat)
    assert iv.is_empty() and rej["reason"].to_list() == ["late"]


def test_spike_quarantined_with_reason_and_baseline_kept():
    # max 10 kW for 1 min -> 166 Wh + 20 Wh slack = 186 Wh; 1.00 -> 9.00 is 8000 Wh: quarantined
    _, iv, rej = run([("c1", "m1", 0, 1.0), ("c1", "m1", MIN, 9.0), ("c1", "m1", 2 * MIN, 1.2)],
                     c={"max_kw": Decimal(10)})
    assert rej["reason"].str.starts_with("spike: 8000 Wh in 60000 ms > 186 Wh").to_list() == [True]
    assert iv.select("start_ms", "end_ms", "energy_wh").rows() == [(0, 2 * MIN, 200)]


def test_gap_billed_by_register_difference_and_flagged_estimated():
    # 3-hour gap, 1.00 -> 4.00 = 3000 Wh, above gap_ms (20 min) -> estimated
    _, iv, _ = run([("c1", "m1", 0, 1.0), ("c1", "m1", 180 * MIN, 4.0)])
    assert iv.select("energy_wh", "estimated").rows() == [(3000, True)]


def test_state_round_trips_through_dict():
    from pipelines.core.interval import CircuitState
    s, _, _ = run([("c1", "m1", 0, 1.0), ("c1", "m1", 3 * MIN, 1.5)], flush=False, lateness_ms=5 * MIN)
    assert CircuitState.from_dict(s["c1"].to_dict()) == s["c1"]
    assert s["c1"].pending  # both readings still buffered
