"""Load control rules on worked examples (times in seconds from T0, polls every 15 s)."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from pipelines.generate import generate
from pipelines.loadcontrol import (
    BannedBand,
    LoadLimits,
    LoadPolicy,
    limits_from_portfolio,
    process_load,
    release,
    tripped_rules,
)
from pipelines.portfolio import parse_portfolio
from schemas import codec
from schemas.readings import FRAME_SCHEMA

T0 = 1_784_080_800_000
SCHEMA = {k: FRAME_SCHEMA[k] for k in
          ("circuit_id", "meter_id", "account_id", "ts_ms", "power_w", "power_factor", "relay")}


def frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    """rows: (circuit, account, seconds, power_w, power_factor, relay)."""
    return pl.DataFrame([(c, f"m-{c}", a, T0 + int(s * 1000), p, pf, relay) for c, a, s, p, pf, relay in rows],
                        schema=SCHEMA, orient="row")


def series(circuit: str, powers: list[float], *, start: float = 0, step: float = 15, pf: float = 0.8,
           account: str = "A", relay: int = 0) -> list[tuple[Any, ...]]:
    return [(circuit, account, start + i * step, p, pf, relay) for i, p in enumerate(powers)]


def limits(**policy: Any) -> dict[str, LoadLimits]:
    trip = policy.pop("trip", True)
    return {"A": LoadLimits("M1", max_power_w=5000, debounce_s=30, policy=LoadPolicy(**policy), trip=trip)}


def kinds(out: Any) -> list[tuple[str, int]]:
    return [(a["kind"], (a["ts_ms"] - T0) // 1000) for a in out.alerts]


def actions(out: Any) -> list[tuple[str, str, int]]:
    return [(c["action"], c["reason"], (c["cause_ts_ms"] - T0) // 1000) for c in out.commands]


def test_kettle_spike_shorter_than_debounce_never_trips() -> None:
    # 2 kW base, a 4 kW kettle for two polls (15 s of "over") then off, three times
    powers = [2000, 6000, 6000, 2000] * 3
    state, out = process_load(frame(series("c1", powers)), {}, limits())
    assert out.commands == [] and out.alerts == []
    assert state["A"]["over_since"] is None and tripped_rules(state, "A") == []


def test_sustained_overload_trips_exactly_once() -> None:
    # over from t=15; debounce 30 s -> trip at t=45; the meter keeps drawing (relay ignored)
    powers = [2000] + [6500] * 20
    _, out = process_load(frame(series("c1", powers)), {}, limits(restore="manual"))
    assert actions(out) == [("TRIP", "overload", 45)]
    assert kinds(out) == [("overload", 45)]
    alert = out.alerts[0]
    assert alert["severity"] == "CRITICAL" and alert["details"]["over_since_ms"] == str(T0 + 15_000)
    assert out.commands[0]["command_id"] == f"A:overload:{T0 + 45_000}:trip"
    assert out.commands[0]["hold"] == "overload"


def test_debounce_is_continuous_time_above_not_count_of_readings() -> None:
    # above at 15 and 30, dips at 40, above again from 45: 45+30 = 75 is the first trip point
    rows = series("c1", [2000, 6000, 6000], step=15) + [("c1", "A", 40, 1000, 0.8, 0)]
    rows += series("c1", [6000] * 4, start=45)
    _, out = process_load(frame(rows), {}, limits(restore="manual"))
    assert actions(out) == [("TRIP", "overload", 75)]


def test_total_is_the_sum_of_the_latest_reading_of_each_circuit() -> None:
    # two circuits read at different instants, each 3 kW: the account draws 6 kW > 5 kW
    rows = series("c1", [3000] * 5) + series("c2", [3000] * 5, start=7)
    _, out = process_load(frame(rows), {}, limits(restore="manual"))
    # over from t=7 (second circuit's first reading); c2 is read again at t=37 = 7 + 30
    assert actions(out) == [("TRIP", "overload", 37)]


def test_auto_restore_after_cool_down() -> None:
    # trip at 45; relay opens, power 0; cool-down 120 s -> restore at the first reading >= 165
    powers = [2000, 6000, 6000, 6000] + [0] * 10
    rows = [(c, a, s, p, pf, 1 if s > 45 else 0) for c, a, s, p, pf, _ in series("c1", powers)]
    state, out = process_load(frame(rows), {}, limits(cooldown_s=120))
    assert actions(out) == [("TRIP", "overload", 45), ("RECONNECT", "restore", 165)]
    assert out.commands[1]["command_id"] == f"A:overload:{T0 + 45_000}:restore"
    assert out.commands[1]["hold"] == "overload"
    assert ("reconnect", 165) in kinds(out)
    assert tripped_rules(state, "A") == []


def test_overload_resumes_after_restore_needs_a_new_debounce_run() -> None:
    # the load is still there after the restore: trip again one full debounce later
    powers = [6000] * 3 + [0] * 8 + [6000] * 4
    _, out = process_load(frame(series("c1", powers)), {}, limits(cooldown_s=120))
    assert actions(out) == [("TRIP", "overload", 30), ("RECONNECT", "restore", 150),
                            ("TRIP", "overload", 195)]


def test_manual_restore_never_happens_by_itself() -> None:
    powers = [6000] * 3 + [0] * 200  # almost an hour of readings after the trip
    state, out = process_load(frame(series("c1", powers)), {}, limits(restore="manual", cooldown_s=60))
    assert actions(out) == [("TRIP", "overload", 30)]
    assert tripped_rules(state, "A") == ["overload"]
    lim = limits(restore="manual")["A"]
    state2, released = release(state, "A", "overload", T0 + 4_000_000, lim, by="operator:li")
    assert actions(released) == [("RECONNECT", "restore", 4000)]
    assert released.commands[0]["requested_by"] == "operator:li"
    assert tripped_rules(state2, "A") == [] and tripped_rules(state, "A") == ["overload"]  # input untouched
    # releasing again (e.g. a re-delivered operator command) is a no-op
    _, again = release(state2, "A", "overload", T0 + 4_000_001, lim)
    assert again.commands == [] and again.alerts == []


def test_protected_account_is_alerted_not_tripped() -> None:
    _, out = process_load(frame(series("c1", [6000] * 10)), {}, limits(trip=False))
    assert out.commands == []
    assert kinds(out) == [("overload", 30)] and out.alerts[0]["severity"] == "WARNING"


BANNED = dict(banned=(BannedBand(name="resistive", min_w=800, max_w=3000, min_pf=0.95),))


def test_banned_step_detected_on_a_resistive_load() -> None:
    # a 2 kW heater switched on at t=30 on a purely resistive base (pf 1.0)
    rows = series("c1", [300, 300, 2300, 2300], pf=1.0)
    _, out = process_load(frame(rows), {}, limits(**BANNED))
    assert kinds(out) == [("banned_appliance", 30)]
    a = out.alerts[0]
    assert a["meter_id"] == "m-c1" and a["details"]["band"] == "resistive" and a["severity"] == "WARNING"
    assert out.commands == []  # banned_action defaults to "alert"


def test_heater_added_to_an_inductive_base_is_recognised_by_its_incremental_pf() -> None:
    # base: 1 kW motor load at pf 0.6 (Q = 1333 var); + 2 kW heater: P 3 kW, Q unchanged
    p0, q0 = 1000.0, 1000.0 * (1 - 0.36) ** 0.5 / 0.6
    pf_after = 3000.0 / (3000.0**2 + q0**2) ** 0.5  # ~0.91: the meter's total pf is below 0.95
    rows = [("c1", "A", 0, p0, 0.6, 0), ("c1", "A", 15, 3000.0, pf_after, 0)]
    _, out = process_load(frame(rows), {}, limits(**BANNED, banned_action="trip"))
    assert kinds(out) == [("banned_appliance", 15)]
    assert float(out.alerts[0]["details"]["step_pf"]) > 0.99
    assert actions(out) == [("TRIP", "banned_appliance", 15)]
    assert out.commands[0]["hold"] == "banned_appliance"


def test_steps_that_are_not_banned() -> None:
    motor = series("c1", [300, 2300], pf=0.7, account="A")  # inductive step (compressor)
    small = series("c2", [300, 800], pf=1.0)  # +500 W below the band
    large = series("c3", [300, 4300], pf=1.0)  # +4 kW above the band
    slow = [("c4", "A", 0, 300, 1.0, 0), ("c4", "A", 600, 2300, 1.0, 0)]  # 10 minutes apart: not sudden
    down = series("c5", [2300, 300], pf=1.0)  # switching off is never a violation
    _, out = process_load(frame(motor + small + large + slow + down), {},
                          {"A": LoadLimits("M1", 1e9, 30, LoadPolicy(**BANNED))})
    assert out.alerts == []


def test_relay_mismatch_alerts_once_per_episode() -> None:
    # relay OPEN from t=15; drawing 1 kW at 15..45, 0 W at 60, 900 W again at 75
    rows = [("c1", "A", 0, 1000, 0.9, 0), ("c1", "A", 15, 1000, 0.9, 1), ("c1", "A", 30, 1000, 0.9, 1),
            ("c1", "A", 45, 1000, 0.9, 1), ("c1", "A", 60, 0, 0.9, 1), ("c1", "A", 75, 900, 0.9, 1)]
    _, out = process_load(frame(rows), {}, limits())
    assert kinds(out) == [("relay_mismatch", 15), ("relay_mismatch", 75)]
    assert out.alerts[0]["severity"] == "CRITICAL" and out.alerts[0]["meter_id"] == "m-c1"


def test_duplicates_late_readings_and_unknown_accounts_are_ignored() -> None:
    state, out = process_load(frame(series("c1", [6000] * 2)), {}, limits())
    assert out.late == 0
    rows = [("c1", "A", 0, 6000, 0.8, 0), ("c1", "A", 15, 6000, 0.8, 0),  # already seen
            ("c1", "A", 30, 6000, 0.8, 0), ("c1", "A", 30, 100, 0.8, 0),  # same ts twice: first wins
            ("x1", "ZZ", 30, 99_000, 0.8, 0)]  # no limits for ZZ
    before = json.dumps(state, sort_keys=True)
    new_state, out = process_load(frame(rows), state, limits())
    assert json.dumps(state, sort_keys=True) == before  # the caller's state is never mutated
    state = new_state
    assert out.late == 3
    assert actions(out) == [("TRIP", "overload", 30)]
    assert "ZZ" not in state


def test_null_power_does_not_move_anything() -> None:
    rows = series("c1", [6000, 6000]) + [("c1", "A", 30, None, None, 0)] + series("c1", [6000], start=45)
    _, out = process_load(frame(rows), {}, limits(restore="manual"))
    assert actions(out) == [("TRIP", "overload", 45)]


def test_state_is_json_and_outputs_fit_the_contracts() -> None:
    rows = series("c1", [300, 300, 2300, 6000, 6000, 6000], pf=1.0) + [("c1", "A", 90, 800, 1.0, 1)]
    state, out = process_load(frame(rows), {}, limits(**BANNED, banned_action="trip"))
    assert json.loads(json.dumps(state)) == state
    assert {a["kind"] for a in out.alerts} >= {"banned_appliance", "overload", "relay_mismatch"}
    for alert in out.alerts:
        assert codec.decode("Alert", codec.encode("Alert", alert)) == alert
    for cmd in out.commands:
        record = {k: v for k, v in cmd.items() if k != "hold"} | {"gateway_id": "g1", "meter_id": "m-c1"}
        # the forwarder adds the signature at publish time (pipelines/signing.py)
        unsigned = {"key_id": None, "signature": None}
        assert codec.decode("RelayCommand", codec.encode("RelayCommand", record)) == record | unsigned


def test_limits_from_portfolio_use_the_level_and_protection() -> None:
    data = generate(1, 4, seed=3, mall_prefix="LC")
    data["malls"][0]["merchants"][0]["protected"] = True
    portfolio = parse_portfolio(data)
    policy = LoadPolicy(restore="manual", **BANNED)
    lims = limits_from_portfolio(portfolio, {lv.name: policy for lv in portfolio.levels})
    mall, first = next(portfolio.merchants())
    assert set(lims) == {m.id for _, m in portfolio.merchants()}
    lim = lims[first.id]
    level = portfolio.level(first.level)
    assert (lim.mall_id, lim.max_power_w, lim.debounce_s, lim.trip) == (
        mall.id, level.max_power_w, level.overload_debounce_s, False)
    assert lim.policy.restore == "manual"
