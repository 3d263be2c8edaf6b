"""Batch-split invariance: a time-ordered stream gives the same outputs in one batch or many."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.loadcontrol import BannedBand, LoadLimits, LoadPolicy, process_load
from schemas.readings import FRAME_SCHEMA

SCHEMA = {k: FRAME_SCHEMA[k] for k in
          ("circuit_id", "meter_id", "account_id", "ts_ms", "power_w", "power_factor", "relay")}
CIRCUITS = {"a1": "A", "a2": "A", "b1": "B"}
LIMITS = {
    "A": LoadLimits("M", 5000, 20, LoadPolicy(cooldown_s=60, banned=(BannedBand(),), banned_action="trip")),
    "B": LoadLimits("M", 3000, 0, LoadPolicy(restore="manual", banned=(BannedBand(min_w=500, max_w=1500),))),
}

reading = st.tuples(
    st.sampled_from(sorted(CIRCUITS)),
    st.integers(0, 20_000),  # gap in ms since the previous reading in the stream (0: same instant)
    st.one_of(st.none(), st.sampled_from([0.0, 150.0, 1200.5, 2000.0, 2600.0, 3100.0, 4999.999, 6000.0])),
    st.one_of(st.none(), st.sampled_from([0.5, 0.8, 0.96, 1.0])),
    st.sampled_from([0, 0, 0, 1, 2]),
)


def to_frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def run(rows: list[tuple[Any, ...]], cuts: list[int]) -> tuple[dict, list, list, int]:
    state: dict = {}
    alerts: list = []
    commands: list = []
    late = 0
    bounds = [0, *sorted(set(cuts)), len(rows)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        state, out = process_load(to_frame(rows[lo:hi]), state, LIMITS)
        state = json.loads(json.dumps(state))  # what the worker stores between batches
        alerts += out.alerts
        commands += out.commands
        late += out.late
    return state, sorted(alerts, key=lambda a: a["alert_id"]), sorted(commands, key=lambda c: c["command_id"]), late


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(reading, min_size=1, max_size=60), st.lists(st.integers(0, 60), max_size=6))
def test_batch_split_invariance(steps: list[tuple[Any, ...]], cuts: list[int]) -> None:
    ts = 1_700_000_000_000
    rows = []
    for circuit, gap, power, pf, relay in steps:
        ts += gap
        rows.append((circuit, f"m-{circuit}", CIRCUITS[circuit], ts, power, pf, relay))
    whole = run(rows, [])
    split = run(rows, [c for c in cuts if c <= len(rows)])
    assert split == whole


def test_the_generator_reaches_every_rule() -> None:
    """Guard against a vacuous property: a plain stream exercises trips, restores and steps."""
    rows = []
    ts = 1_700_000_000_000
    for i, p in enumerate([1000, 3100, 6000, 6000, 6000, 0, 0, 0, 0, 0, 0, 2000]):
        rows.append(("a1", "m-a1", "A", ts + i * 10_000, float(p), 1.0, 0))
    state, alerts, commands, _ = run(rows, [3, 7])
    assert {c["action"] for c in commands} == {"TRIP", "RECONNECT"}
    assert {a["kind"] for a in alerts} >= {"overload", "banned_appliance", "reconnect"}


any_reading = st.tuples(  # arbitrary floats: both passes must do the same floating-point operations
    st.sampled_from(sorted(CIRCUITS)),
    st.integers(0, 20_000),
    st.one_of(st.none(), st.floats(0, 8000), st.sampled_from([0.0, 1200.5, 2600.0, 6000.0])),
    st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0.96, 1.0])),
    st.sampled_from([0, 0, 0, 1, 2]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_reading, min_size=1, max_size=60), st.lists(st.integers(0, 60), max_size=6))
def test_small_batch_pass_equals_polars_pass(steps: list[tuple[Any, ...]], cuts: list[int]) -> None:
    """Small batches run a plain-Python pass; it must match the polars pass exactly."""
    import pipelines.loadcontrol as lc

    ts = 1_700_000_000_000
    rows = []
    for circuit, gap, power, pf, relay in steps:
        ts += gap
        rows.append((circuit, f"m-{circuit}", CIRCUITS[circuit], ts, power, pf, relay))
    cuts = [c for c in cuts if c <= len(rows)]
    small = run(rows, cuts)
    saved = lc.SMALL
    lc.SMALL = -1  # every batch through the polars pass
    try:
        big = run(rows, cuts)
    finally:
        lc.SMALL = saved
    assert small == big


def test_live_shape_without_windows_equals_the_small_pass() -> None:
    """Live input (every account once per batch) skips the per-account windows of the polars
    pass, and readings of accounts without limits are dropped per distinct account: both must
    give what the plain-Python pass gives, also when a second reading of an account (or a late
    one) makes the batch not live-shaped."""
    import pipelines.loadcontrol as lc

    ts = 1_700_000_000_000
    limits = {f"A{i}": LoadLimits("M", 2000 + i, 0, LoadPolicy(banned=(BannedBand(),))) for i in range(40)}
    first = [(f"c{i}", f"m{i}", f"A{i}", ts, 1000.0 + 50 * i, 0.97, 0) for i in range(40)]
    first.append(("x1", "mx", "NOLIMITS", ts, 9000.0, 1.0, 0))
    second = [(f"c{i}", f"m{i}", f"A{i}", ts + 10_000, 1000.0 + 100 * i, 1.0, 0) for i in range(40)]
    second += [("c3", "m3", "A3", ts + 20_000, 5000.0, 1.0, 0), ("c4", "m4", "A4", ts - 5, 10.0, 1.0, 0)]

    def run_two(small: int) -> tuple[Any, ...]:
        saved = lc.SMALL
        lc.SMALL = small
        try:
            state, out1 = process_load(to_frame(first), {}, limits)
            state = json.loads(json.dumps(state))
            live, out2 = process_load(to_frame(second[:40]), state, limits)
            mixed, out3 = process_load(to_frame(second), state, limits)
            # every circuit once, but account A5 twice (two circuits): its total is a sum
            two, out4 = process_load(to_frame([*second[:40], ("c5b", "m5b", "A5", ts + 10_000, 4000.0, 1.0, 0)]),
                                     state, limits)
        finally:
            lc.SMALL = saved
        return state, live, mixed, [(o.alerts, o.commands, o.late) for o in (out1, out2, out3, out4)], two

    polars_pass, python_pass = run_two(-1), run_two(10**9)
    assert polars_pass == python_pass
    assert "NOLIMITS" not in polars_pass[0] and polars_pass[3][2][2] == 1  # the late reading
    assert any(a["kind"] == "overload" for a in polars_pass[3][2][0])  # A3 at 5 kW: the rules ran
    assert any(a["account_id"] == "A5" and a["kind"] == "overload" for a in polars_pass[3][3][0])
