"""Time-driven postings (standing charges, fixed debt recovery) and the trips they cause, posted by
the timer (`engine.tick`) when no energy arrives: once per day or period, with ids and times that
do not depend on when, or how often, the timer runs, nor on whether a charge reached the day first."""

from __future__ import annotations

from typing import Any

import polars as pl
from billing_helpers import make_ctx, ms, readings

from pipelines.core.arrival import collect, replay_arrival, tables
from pipelines.core.context import RatingContext
from pipelines.core.engine import CoreState, process_batch, tick
from pipelines.core.models import DebtRecovery, FriendlyCredit, Tariff, WalletPolicy
from pipelines.core.replay import replay

HOUR = 3_600_000
MON = ms(2024, 5, 6)  # Monday 00:00 Asia/Shanghai
DAY = 24 * HOUR


def ec_ctx(**policy: Any) -> RatingContext:
    """1 Wh = 1 fen, a standing charge of 10.00 a day, cut-off 0, emergency credit 30.00."""
    tariff = Tariff.flat("t", 1000, standing_charge_per_day=1000)
    ctx = make_ctx(tariff, WalletPolicy(**{"alert_levels": [], "cutoff": 0, "emergency_credit": 3000, **policy}))
    ctx.accounts["a1"] = ctx.accounts["a1"].model_copy(update={"opening_balance_minor": 1500})
    return ctx


def used_then_idle(until: int, step: int = HOUR) -> list[tuple[Any, ...]]:
    """200 Wh on Monday morning, then the register stands still (0 Wh) every `step` until `until`."""
    rows = [("c1", "m1", MON + 10 * HOUR, 1.0), ("c1", "m1", MON + 10 * HOUR + 900_000, 1.2)]
    t = MON + 11 * HOUR
    while t <= until:
        rows.append(("c1", "m1", t, 1.2))
        t += step
    return rows


def run(ctx: RatingContext, rows: list[tuple[Any, ...]], tick_each: bool) -> tuple[CoreState, dict[str, list]]:
    """The rows one core call each with a tick after each (a timer that never misses a beat), or
    all in one call and one tick at the end (a timer that ran once, late)."""
    state, got = CoreState(), {"ledger": [], "commands": [], "alerts": []}
    batches = [[r] for r in rows] if tick_each else [rows]
    for batch in batches:
        state, out = process_batch(state, readings(batch), None, ctx)
        now = max(r[2] for r in batch)
        state, ticked = tick(state, now, ctx)
        for o in (out, ticked):
            for k in got:
                got[k] += getattr(o, k).to_dicts()
    return state, got


def test_emergency_credit_runs_out_on_standing_charges_with_0_wh() -> None:
    ctx = ec_ctx()
    rows = used_then_idle(MON + 4 * DAY + 12 * HOUR)  # to Friday noon
    state, out = process_batch(CoreState(), readings(rows), None, ctx)
    # the 0 Wh readings move no wallet: Monday's entries only
    assert [e["kind"] for e in out.ledger.to_dicts()] == ["opening_balance", "standing_charge", "charge"]
    assert state.accounts["a1"].balance == 300 and not out.commands.height

    state, ticked = tick(state, MON + 4 * DAY + 12 * HOUR, ctx)
    ledger = [(e["entry_id"], e["kind"], e["amount_minor"], e["ts_ms"], e["balance_after_minor"])
              for e in ticked.ledger.to_dicts()]
    assert ledger == [
        ("a1:standing:2024-05-07", "standing_charge", -1000, MON + DAY, -700),
        ("a1:ecdraw:a1:standing:2024-05-07", "emergency_credit_draw", 3000, MON + DAY, 2300),
        ("a1:standing:2024-05-08", "standing_charge", -1000, MON + 2 * DAY, 1300),
        ("a1:standing:2024-05-09", "standing_charge", -1000, MON + 3 * DAY, 300),
        ("a1:standing:2024-05-10", "standing_charge", -1000, MON + 4 * DAY, -700)]
    # emergency credit exhausted: tripped at the start of Friday, named by the day's entry
    assert [(c["command_id"], c["action"], c["reason"], c["cause_ts_ms"]) for c in ticked.commands.to_dicts()] == [
        ("a1:trip:a1:standing:2024-05-10", "TRIP", "credit", MON + 4 * DAY)]
    s = state.accounts["a1"]
    assert (s.balance, s.ec_owed, s.relay, s.standing_day) == (-700, 3000, "tripped", "2024-05-10")

    # re-running the timer (a restart, a re-delivered tick) posts nothing twice
    again, twice = tick(state, MON + 4 * DAY + 13 * HOUR, ctx)
    assert not twice.ledger.height and not twice.commands.height and again.accounts["a1"] == s


def test_the_same_whether_the_timer_ticks_every_reading_or_once_late() -> None:
    ctx = ec_ctx()
    rows = used_then_idle(MON + 4 * DAY + 12 * HOUR, step=3 * HOUR)
    s1, every = run(ctx, rows, tick_each=True)
    s2, once = run(ctx, rows, tick_each=False)
    assert every == once and s1.accounts == s2.accounts
    assert [c["cause_ts_ms"] for c in every["commands"]] == [MON + 4 * DAY]


def test_timer_waits_for_the_accounts_own_readings() -> None:
    ctx = ec_ctx()
    state, _ = process_batch(CoreState(), readings(used_then_idle(MON + 23 * HOUR)), None, ctx)
    # the stream clock is days ahead (another account's input), this meter's readings are not
    later, ticked = tick(state, MON + 5 * DAY, ctx)
    assert not ticked.ledger.height and later.accounts == state.accounts


def test_a_charge_reaching_the_day_first_posts_the_same_entries() -> None:
    """Tuesday's standing charge and the emergency credit it draws: posted by the timer after a
    0 Wh reading at 00:15, or by Tuesday's first charge at 09:00 when no timer ran in between."""
    ctx = ec_ctx()
    rows = [("c1", "m1", MON + 10 * HOUR, 1.0), ("c1", "m1", MON + 10 * HOUR + 900_000, 1.2),
            ("c1", "m1", MON + DAY + 900_000, 1.2), ("c1", "m1", MON + DAY + 9 * HOUR, 1.25)]
    _, every = run(ctx, rows, tick_each=True)
    state, out = process_batch(CoreState(), readings(rows), None, ctx)
    assert every["ledger"] == out.ledger.to_dicts()
    assert every["alerts"] == out.alerts.to_dicts() and every["commands"] == out.commands.to_dicts()
    assert ("a1:ecdraw:a1:standing:2024-05-07", MON + DAY) in [(e["entry_id"], e["ts_ms"]) for e in every["ledger"]]


def test_fixed_debt_recovery_once_per_period_at_its_start() -> None:
    ctx = ec_ctx(debt_recovery=DebtRecovery(fixed_per_period=400, period="week"), emergency_credit=0)
    ctx.accounts["a1"] = ctx.accounts["a1"].model_copy(update={"opening_balance_minor": 100_000,
                                                                "opening_debt_minor": 1000})
    rows = used_then_idle(MON + 15 * DAY + 12 * HOUR, step=6 * HOUR)  # three ISO weeks
    state, every = run(ctx, rows, tick_each=True)
    _, once = run(ctx, rows, tick_each=False)
    assert every == once
    fixed = [(e["entry_id"], e["amount_minor"], e["debt_change_minor"], e["ts_ms"])
             for e in every["ledger"] if e["kind"] == "debt_recovery"]
    assert fixed == [("a1:debtfix:2024-W19", -400, -400, MON), ("a1:debtfix:2024-W20", -400, -400, MON + 7 * DAY),
                     ("a1:debtfix:2024-W21", -200, -200, MON + 14 * DAY)]
    assert state.accounts["a1"].debt == 0
    standing = [e for e in every["ledger"] if e["kind"] == "standing_charge"]
    assert len(standing) == 16 and len({e["entry_id"] for e in standing}) == 16


def test_a_deferred_trip_comes_at_the_end_of_its_own_friendly_period() -> None:
    """Deferred on Monday evening; a timer running only on Wednesday still trips at Tuesday 08:00
    (the end of the period it was deferred in), as a timer ticking all along does."""
    ctx = ec_ctx(emergency_credit=0, friendly=FriendlyCredit(weekday_hours=[[18, 8]]))
    ctx.tariffs["t"] = Tariff.flat("t", 1000)  # no standing charge: only the deferral matters here
    ctx.accounts["a1"] = ctx.accounts["a1"].model_copy(update={"opening_balance_minor": 100})
    rows = [("c1", "m1", MON + 19 * HOUR, 1.0), ("c1", "m1", MON + 19 * HOUR + 900_000, 1.2)]
    rows += [("c1", "m1", MON + 20 * HOUR + i * 2 * HOUR, 1.2) for i in range(20)]  # 0 Wh to Wednesday
    _, every = run(ctx, rows, tick_each=True)
    _, once = run(ctx, rows, tick_each=False)
    assert every == once
    assert [(c["command_id"], c["cause_ts_ms"]) for c in every["commands"]] == [
        (f"a1:trip:friendly_end:{MON + DAY + 8 * HOUR}", MON + DAY + 8 * HOUR)]


def test_replay_ticks_like_the_stream_whatever_the_batch_size() -> None:
    """Time-ordered and arrival-order replay post the same timer entries and trip at the same
    time, whether a batch holds one reading or all of them."""
    ctx = ec_ctx()
    rows = used_then_idle(MON + 4 * DAY + 12 * HOUR, step=900_000)
    frame = readings(rows)
    results = []
    for size in (1, 7, 100_000):
        _, t = replay(ctx, frame, None, batch_size=size)
        results.append((t["ledger"].drop("balance_after_minor").to_dicts(), t["commands"].to_dicts()))
    assert results[0] == results[1] == results[2]
    ledger, commands = results[0]
    assert [c["command_id"] for c in commands] == ["a1:trip:a1:standing:2024-05-10"]
    assert sum(e["kind"] == "standing_charge" for e in ledger) == 5

    arrival = frame.with_columns(partition=pl.lit(0, pl.Int64), offset=pl.int_range(pl.len(), dtype=pl.Int64),
                                 msg_ts_ms=pl.col("ts_ms") + 1_000)
    store, sink = collect()
    replay_arrival(ctx, [(0, arrival)], None, sink)
    got = tables(store)
    assert got["ledger"].drop("balance_after_minor").to_dicts() == ledger
    assert got["commands"].to_dicts() == commands
