"""The power loop in the billing step: commands stamped with the step's time, outcomes and
timers re-issue them, and a deferred trip is raised at its friendly period's end, the same in
the stream (billing.step + billing.tick) and in replay."""

from __future__ import annotations

import msgpack
import polars as pl
import pytest

from pipelines import billing, powerloop
from pipelines.context import build_context
from pipelines.core.replay import replay
from pipelines.envelope import Envelope, frame_value
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas import codec

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00 (Wednesday)
HOUR = 3_600_000
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for level in data["levels"]:
        level["policy"] = {"alert_levels": [], "cutoff": 0, "friendly": {"weekday_hours": [[18, 8]]}}
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant.pop("opening_balance_minor", None)
    return build_context(parse_portfolio(data), PARTITIONS)


def _merchant(ctx: billing.BillingContext) -> tuple[str, str, str]:
    account = "M01-S0001"
    route = next(r for r in ctx.meter_route.values() if r.account_id == account)
    circuit = next(c for c, r in ctx.circuit_meter.items() if r.meter_id == route.meter_id)
    return account, route.meter_id, circuit


def _readings(meter: str, circuit: str, account: str, stamps: list[int], kwh: list[float]) -> pl.DataFrame:
    n = len(stamps)
    return pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter] * n, "account_id": [account] * n,
                         "ts_ms": stamps, "import_kwh": kwh})


def _commands(env: Envelope) -> list[dict]:
    return [codec.decode("RelayCommand", o.value) for o in env.outbox if o.topic == "mallwatt.relay-commands"]


def _ledger_rows(env: Envelope) -> list[dict]:
    from schemas.ledger import LEDGER_ROWS, row_entries

    return [r for o in env.outbox if o.topic == LEDGER_ROWS for r in row_entries(o.value)]


def _alerts(env: Envelope) -> list[dict]:
    return [codec.decode("Alert", o.value) for o in env.outbox if o.topic == "mallwatt.alerts"]


def _pay(ctx, env, account, pid, amount, ts, now=None, offset=0):  # type: ignore[no-untyped-def]
    row = billing.payment_row({"payment_id": pid, "account_id": account, "ts_ms": ts, "amount_minor": amount,
                               "kind": "TOPUP"})
    return billing.step({"k": env}, None, [row], ctx, {"k": ("payments:0", offset)}, lambda _a: "k",
                        now_ms=now)["k"]


def _trip(ctx, account, meter, circuit):  # type: ignore[no-untyped-def]
    """An account tripped for credit at 10:30 (daytime), its TRIP confirmed."""
    env = _pay(ctx, Envelope(), account, "p0", 100, T0 - 1, now=T0)
    frame = _readings(meter, circuit, account, [T0, T0 + 900_000], [100.0, 102.0]).with_columns(
        msg_ts_ms=pl.lit(T0 + 1_000_000))
    env = billing.step({"k": env}, frame, None, ctx, {"k": ("readings:0", 1)}, lambda _a: "k",
                       now_ms=T0 + 1_000_000)["k"]
    trip = _commands(env)[0]
    assert trip["action"] == "TRIP" and trip["issued_at_ms"] == T0 + 1_000_000
    outcome = {"command_id": trip["command_id"], "action": "TRIP", "status": "CONFIRMED", "meter_id": meter,
               "relay_after": "OPEN", "ts_ms": T0 + 1_001_000, "detail": ""}
    env = billing.apply_outcomes(env, account, [outcome], ctx, "outcomes:0", 0, T0 + 1_002_000)
    assert env.relays[meter][9] == -1  # confirmed: at rest, nothing due
    return env


def test_topup_billed_ten_minutes_late_reconnects_with_a_fresh_stamp(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = _trip(ctx, account, meter, circuit)
    paid, billed = T0 + 2 * HOUR, T0 + 2 * HOUR + 10 * 60_000  # billed after a 10-minute outage
    env = _pay(ctx, env, account, "p1", 10_000, paid, now=billed, offset=1)
    (cmd,) = _commands(env)
    assert (cmd["action"], cmd["issued_at_ms"], cmd["cause_ts_ms"]) == ("RECONNECT", billed, paid)
    # a collector that still refused it as expired gets a fresh, chained command at once
    expired = {"command_id": cmd["command_id"], "action": "RECONNECT", "status": "FAILED", "meter_id": meter,
               "relay_after": "UNKNOWN", "ts_ms": billed + 500, "detail": "expired: issued 600s ago"}
    env = billing.apply_outcomes(env, account, [expired], ctx, "outcomes:0", 1, billed + 1_000)
    (retry,) = _commands(env)
    assert retry["command_id"] == f"{cmd['command_id']}:r2" and retry["issued_at_ms"] == billed + 1_000
    assert [(a["kind"], a["meter_id"]) for a in _alerts(env)] == [("relay_retry", meter)]
    # a redelivered outcome (at or below the mark) is skipped by the worker; confirmation settles it
    done = {**expired, "command_id": retry["command_id"], "status": "CONFIRMED", "relay_after": "CLOSED",
            "ts_ms": billed + 2_000}
    env = billing.apply_outcomes(env, account, [done], ctx, "outcomes:0", 2, billed + 3_000)
    assert env.relays[meter][9] == -1 and not _commands(env)


def test_timer_retries_a_command_without_an_answer(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = _trip(ctx, account, meter, circuit)
    env = _pay(ctx, env, account, "p1", 10_000, T0 + HOUR, now=T0 + HOUR, offset=1)
    (cmd,) = _commands(env)
    assert billing.tick(env, ctx, T0 + HOUR + 1_000) is None  # nothing due yet: nothing to write
    later = billing.tick(env, ctx, T0 + HOUR + 61_000)
    assert later is not None and later.hwm == env.hwm  # a tick consumes no input
    assert [c["command_id"] for c in _commands(later)] == [f"{cmd['command_id']}:r2"]


def test_relay_column_starts_a_reconcile(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = _pay(ctx, Envelope(), account, "p0", 100_000, T0 - 1, now=T0)
    frame = _readings(meter, circuit, account, [T0, T0 + 900_000], [100.0, 100.1]).with_columns(
        relay=pl.Series([0, 1], dtype=pl.UInt8), msg_ts_ms=pl.lit(T0 + 901_000))
    env = billing.step({"k": env}, frame, None, ctx, {"k": ("readings:0", 1)}, lambda _a: "k",
                       now_ms=T0 + 901_000)["k"]
    assert [(c["action"], c["reason"]) for c in _commands(env)] == [("RECONNECT", "reconcile")]


def test_deferred_trip_at_friendly_end_same_in_stream_and_replay(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    evening = T0 + 9 * HOUR  # 19:00, inside the friendly period 18:00-08:00
    pay = {"payment_id": "p0", "account_id": account, "ts_ms": evening - 1, "amount_minor": 100, "kind": "topup"}
    used = _readings(meter, circuit, account, [evening, evening + 900_000], [100.0, 102.0])
    # after the period: readings every 15 minutes with 0 Wh (the register stands still)
    morning = T0 + 21 * HOUR + 30 * 60_000  # 07:30 next day
    idle = _readings(meter, circuit, account, [morning + i * 900_000 for i in range(5)], [102.0] * 5)

    env = billing.step({"k": Envelope()}, used, [pay], ctx, {"k": ("in:0", 0)}, lambda _a: "k",
                       now_ms=evening + 900_000)["k"]
    assert not _commands(env) and env.accounts[account].deferred
    env = billing.step({"k": env}, idle, None, ctx, {"k": ("in:0", 1)}, lambda _a: "k",
                       now_ms=morning + 4 * 900_000)["k"]
    assert not _commands(env)  # 0 Wh: no charge notices the end of the period
    ticked = billing.tick(env, ctx, morning + 4 * 900_000)
    assert ticked is not None
    stream = [(c["command_id"], c["action"], c["cause_ts_ms"]) for c in _commands(ticked)]
    friendly_end = T0 + 22 * HOUR  # 08:00
    assert stream == [(f"{account}:trip:friendly_end:{friendly_end}:{meter}:trip", "TRIP", friendly_end)]

    _, tables = replay(ctx.rating, pl.concat([used, idle]), pl.DataFrame([pay]))
    replayed = [(f"{c['command_id']}:{meter}:trip", c["action"], c["cause_ts_ms"])
                for c in tables["commands"].iter_rows(named=True)]
    assert replayed == stream


def test_envelope_without_relays_field_still_reads() -> None:
    old = msgpack.packb([[], [], {"x:0": 3}, 1, {"m": ["credit"]}, {}], use_bin_type=True)
    env = Envelope.from_bytes(frame_value([], old))
    assert env.relays == {} and env.holds == {"m": ["credit"]}
    env.relays["m"] = ["open", 1, "c", "TRIP", "credit", 1, 1, 1, "c", 5, "", ""]
    assert Envelope.from_bytes(env.to_bytes()).relays == env.relays


def test_a_late_timer_still_trips_at_the_end_of_the_accounts_own_period(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    evening = T0 + 9 * HOUR
    pay = {"payment_id": "p0", "account_id": account, "ts_ms": evening - 1, "amount_minor": 100, "kind": "topup"}
    used = _readings(meter, circuit, account, [evening, evening + 900_000], [100.0, 102.0])
    env = billing.step({"k": Envelope()}, used, [pay], ctx, {"k": ("in:0", 0)}, lambda _a: "k",
                       now_ms=evening + 900_000)["k"]
    assert billing.tick(env, ctx, evening + 2 * HOUR) is None  # still the night's friendly period
    due = billing.next_timer_ms(env, ctx, evening + 2 * HOUR)
    assert due == T0 + 22 * HOUR  # the timer looks again at 08:00
    # the stream clock months later (another input far ahead): the trip is still the night's
    ticked = billing.tick(env, ctx, T0 + 150 * 24 * HOUR)
    assert ticked is not None
    assert [c["cause_ts_ms"] for c in _commands(ticked)] == [T0 + 22 * HOUR]


@pytest.fixture(scope="module")
def ec_ctx() -> billing.BillingContext:
    """Standing charge 10.00 a day, cut-off 0, emergency credit 30.00, no friendly period."""
    data = generate(1, 6, seed=5)
    for tariff in data["tariffs"]:
        for version in tariff["versions"]:
            version["standing_charge_per_day"] = 1000
    for level in data["levels"]:
        level["policy"] = {"alert_levels": [], "cutoff": 0, "emergency_credit": 3000}
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 1500
    return build_context(parse_portfolio(data), PARTITIONS)


def test_emergency_credit_runs_out_with_0_wh_in_stream_and_replay(ec_ctx: billing.BillingContext) -> None:
    """Readings every 15 minutes carry 0 Wh after Wednesday morning: the timer posts each day's
    standing charge, emergency credit is drawn and then exhausted, and the meter is tripped at the
    start of the day that exhausts it; replay gives the same entries and command."""
    ctx = ec_ctx
    account, meter, circuit = _merchant(ctx)
    stamps = [T0 + i * 900_000 for i in range(4 * 96)]  # Wednesday 10:00 to Sunday 09:45
    kwh = [100.0 + 0.1 * min(i, 2) for i in range(len(stamps))]  # 0.2 kWh, then the register stands still
    frame = _readings(meter, circuit, account, stamps, kwh).with_columns(msg_ts_ms=pl.col("ts_ms") + 1_000)
    env, ledger, commands = Envelope(), [], []
    for i in range(0, frame.height, 8):  # a message every two hours, the timer ticking after each
        part = frame.slice(i, 8)
        now = int(part["msg_ts_ms"].max())
        env = billing.step({"k": env}, part, None, ctx, {"k": ("readings:0", i)}, lambda _a: "k", now_ms=now)["k"]
        for e in (env, billing.tick(env, ctx, now)):
            if e is None:
                continue
            env = e
            ledger += [(r["entry_id"], r["amount_minor"], r["ts_ms"]) for r in _ledger_rows(e)]
            commands += [(c["command_id"], c["action"], c["cause_ts_ms"]) for c in _commands(e)]
    day = 24 * HOUR
    thursday, sunday = T0 - 10 * HOUR + day, T0 - 10 * HOUR + 4 * day  # local midnights
    assert (f"{account}:ecdraw:{account}:standing:2026-07-16", 3000, thursday) in ledger
    trip = f"{account}:trip:{account}:standing:2026-07-19"
    first = (f"{trip}:{meter}:trip", "TRIP", sunday)
    assert commands[0] == first
    # nobody answers in this test: the timer retries the same chain (part of the relay loop)
    assert all(c[0].startswith(f"{first[0]}:r") for c in commands[1:])
    commands = commands[:1]
    assert env.accounts[account].relay == "tripped" and env.holds == {meter: ["credit"]}
    # nothing left for the timer's wallet part until Monday's readings
    assert powerloop.day_due(env, ctx.rating) is None and not powerloop.wallet_due(env, ctx.rating, stamps[-1])

    _, tables = replay(ctx.rating, frame, None, batch_size=50)
    assert [(r["entry_id"], r["amount_minor"], r["ts_ms"]) for r in tables["ledger"].iter_rows(named=True)] == ledger
    assert [(f"{c['command_id']}:{meter}:trip", c["action"], c["cause_ts_ms"])
            for c in tables["commands"].iter_rows(named=True)] == commands


def test_next_due_names_the_day_the_readings_reached(ec_ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ec_ctx)
    frame = _readings(meter, circuit, account, [T0, T0 + 900_000], [100.0, 100.1])
    env = billing.step({"k": Envelope()}, frame, None, ec_ctx, {"k": ("r:0", 0)}, lambda _a: "k", now_ms=T0 + HOUR)["k"]
    assert powerloop.next_due(env, ec_ctx) is None  # Thursday has not begun for this meter
    midnight = T0 + 14 * HOUR
    idle = _readings(meter, circuit, account, [midnight + 60_000], [100.1])
    env = billing.step({"k": env}, idle, None, ec_ctx, {"k": ("r:0", 1)}, lambda _a: "k",
                       now_ms=midnight + 61_000)["k"]
    assert powerloop.next_due(env, ec_ctx) == midnight and powerloop.next_due(env) is None
