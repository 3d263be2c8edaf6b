"""Interval facts in the stream's billing step: packed per account in the outbox of the state
change that produced them, batched by the forwarder's helpers, equal to the billed energy."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines import billing
from pipelines.context import build_context
from pipelines.envelope import Envelope
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas import codec
from schemas.intervals import (
    INTERVAL_COLUMNS,
    INTERVAL_ROWS,
    interval_batch_to_frame,
    rows_to_interval_batch,
    unpack_interval_rows,
)
from schemas.ledger import LEDGER_ROWS, row_entries

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00
STEP = 900_000
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"] = "standard"
        merchant["protected"] = False
        merchant["opening_balance_minor"] = 10_000_000
    return build_context(parse_portfolio(data), PARTITIONS)


def _route(ctx: billing.BillingContext, account: str = "M01-S0001") -> tuple[str, str, str]:
    route = next(r for r in ctx.meter_route.values() if r.account_id == account)
    circuit = next(c for c, r in ctx.circuit_meter.items() if r.meter_id == route.meter_id)
    return account, route.meter_id, circuit


def _frame(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64,
                                      "import_kwh": pl.Float64}, orient="row")


def _facts(env: Envelope) -> list[dict]:
    names = list(INTERVAL_COLUMNS)
    return [dict(zip(names, r, strict=True)) for o in env.outbox if o.topic == INTERVAL_ROWS
            for r in unpack_interval_rows(o.value)]


def test_facts_travel_with_the_state_change_and_match_billing(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _route(ctx)
    wrap = ctx.rating.circuits[circuit].register_max_kwh
    assert wrap is not None
    top = float(wrap) - 0.5
    env = billing.apply_readings(Envelope(), _frame([(circuit, meter, T0, top), (circuit, meter, T0 + STEP, top + 0.2)]),
                                 ctx, "readings:0", 1)
    first = _facts(env)
    assert [(f["energy_wh"], f["billed_total_wh"], f["flag"]) for f in first] == [(200, 200, "")]
    assert first[0]["mall_id"] == ctx.account_mall[account] and first[0]["account_id"] == account
    # a wrap, a swap and a late reading (resets: see the warehouse test)
    rows = [(circuit, meter, T0 + 2 * STEP, 0.44),  # wrap: 0.3 + 0.01 + 0.44 = 750 Wh
            (circuit, meter, T0 + 3 * STEP, 0.60),  # 160 Wh
            (circuit, "NEW-METER", T0 + 4 * STEP, 5.0),  # swap: new baseline, 0 Wh
            (circuit, "NEW-METER", T0 + 5 * STEP, 5.5),  # 500 Wh
            (circuit, meter, T0 + STEP // 2, 123.0)]  # late: older than the last billed reading
    env = billing.apply_readings(env, _frame(rows), ctx, "readings:0", 2)
    facts = _facts(env)
    billed = [f for f in facts if f["start_ms"] < f["end_ms"]]
    assert [(f["flag"], f["energy_wh"]) for f in billed] == [("rollover", 750), ("", 160), ("replaced", 0), ("", 500)]
    assert [f["billed_total_wh"] for f in billed] == [950, 1110, 1110, 1610]
    assert env.circuits[circuit].billed_wh == 1610
    markers = [f for f in facts if f["start_ms"] == f["end_ms"]]
    assert [(m["flag"], m["end_ms"], m["energy_wh"]) for m in markers] == [("late", T0 + STEP // 2, 0)]
    ledger = [e for o in env.outbox if o.topic == LEDGER_ROWS for e in row_entries(o.value)]
    charged = sum(e["energy_wh"] or 0 for e in ledger if e["kind"] == "charge")
    assert charged == sum(f["energy_wh"] for f in facts) == 750 + 160 + 500


def test_interval_batch_round_trip(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _route(ctx)
    env = billing.apply_readings(Envelope(), _frame([(circuit, meter, T0 + i * STEP, 10.0 + i) for i in range(4)]),
                                 ctx, "readings:0", 1)
    rows = [r for o in env.outbox if o.topic == INTERVAL_ROWS for r in unpack_interval_rows(o.value)]
    decoded = codec.decode("IntervalBatch", codec.encode("IntervalBatch", rows_to_interval_batch(rows, "b")))
    frame = interval_batch_to_frame(decoded)
    assert frame.rows() == rows
    assert frame["energy_wh"].to_list() == [1000, 1000, 1000]
    empty = interval_batch_to_frame(codec.decode("IntervalBatch", codec.encode("IntervalBatch",
                                                                               rows_to_interval_batch([], "e"))))
    assert empty.height == 0
    bad = dict(decoded, energy_wh=decoded["energy_wh"][:8])
    with pytest.raises(ValueError, match="energy_wh"):
        interval_batch_to_frame(bad)


def test_facts_are_grouped_per_account_outbox(ctx: billing.BillingContext) -> None:
    a1, m1, c1 = _route(ctx, "M01-S0001")
    a2, m2, c2 = _route(ctx, "M01-S0002")
    frame = _frame([(c, m, T0 + i * STEP, 1.0 + i) for c, m in ((c1, m1), (c2, m2)) for i in range(3)])
    envs = {a1: Envelope(), a2: Envelope()}
    out = billing.step(envs, frame, None, ctx, {a1: ("r:0", 1), a2: ("r:0", 1)}, lambda a: a)
    for account, circuit in ((a1, c1), (a2, c2)):
        facts = _facts(out[account])
        assert {f["account_id"] for f in facts} == {account} and {f["circuit_id"] for f in facts} == {circuit}
        assert sum(f["energy_wh"] for f in facts) == 2000
