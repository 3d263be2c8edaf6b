from __future__ import annotations

from datetime import datetime

import pytest

from collectors.loadshape import SHAPES, daily_kwh, shape_factor
from collectors.profile import load_profile
from collectors.simulator import SimGateway, SimMeter, Simulator, apply_fault, tou_period

START_MS = 1_719_936_000_000  # 2024-07-03 00:00 in UTC+8


def _sim(business: str = "restaurant", rated_kw: float = 10.0) -> Simulator:
    m = SimMeter("M1", load_profile("acrel_ddsy1352"), 1, business, rated_kw, seed=3)
    return Simulator([SimGateway("G", {1: m})], start_ms=START_MS)


def test_shapes_are_24_fractions_and_restaurant_peaks_at_meals() -> None:
    for s in SHAPES.values():
        assert len(s) == 24 and all(0 <= v <= 1 for v in s)
    assert shape_factor("restaurant", 12) > 3 * shape_factor("restaurant", 15.5) / 2
    assert shape_factor("restaurant", 19) > shape_factor("restaurant", 3) * 5
    assert shape_factor("cinema", 20) > shape_factor("cinema", 9)


def test_energy_integrates_the_shape_over_a_day() -> None:
    sim = _sim("retail", 10.0)
    m = sim.meters["M1"]
    start = m.import_kwh
    sim.advance(86_400)
    assert sim.now_ms() == START_MS + 86_400_000
    used = m.import_kwh - start
    assert used == pytest.approx(daily_kwh("retail", 10.0), rel=0.05)
    assert sum(m.tou_kwh.values()) == pytest.approx(used)
    assert m.tou_kwh["sharp"] > 0 and m.tou_kwh["valley"] > 0  # July has sharp peak hours


def test_open_relay_stops_energy_and_invalid_writes_are_rejected() -> None:
    sim = _sim()
    m = sim.meters["M1"]
    sim.advance(3600)
    assert m.write("coil", 0, [False]) is None and not m.relay_closed
    before = m.import_kwh
    sim.advance(3600)
    assert m.import_kwh == before and m.power_w == 0
    assert m.read("coil", 0, 1) == [False]
    assert m.write("holding", 0, [1]) is not None  # energy registers are read-only
    assert m.write("coil", 0, [True]) is None and m.relay_closed


def test_faults() -> None:
    sim = _sim()
    m = sim.meters["M1"]
    apply_fault(sim, "rollover:M1:0.2")
    assert m.import_kwh == pytest.approx(42_949_672.96 - 0.2)
    apply_fault(sim, "reset:M1")
    assert m.import_kwh == 0.0
    apply_fault(sim, "silent:M1")
    apply_fault(sim, "slow:M1:0.3")
    assert m.faults.silent and m.faults.delay_s == 0.3
    apply_fault(sim, "nan:M1")
    assert m.read("holding", 0, 2) == [0xFFFF, 0xFFFF]
    with pytest.raises(ValueError):
        apply_fault(sim, "melt:M1")
    with pytest.raises(ValueError):
        apply_fault(sim, "reset:nope")


def test_tou_periods_follow_the_guangdong_example() -> None:
    assert tou_period(datetime(2024, 7, 3, 11, 30)) == "sharp"
    assert tou_period(datetime(2024, 3, 3, 11, 30)) == "peak"
    assert tou_period(datetime(2024, 3, 3, 3, 0)) == "valley"
    assert tou_period(datetime(2024, 3, 3, 20, 0)) == "flat"
