"""One truth for energy: the kWh analysts and bills read from the warehouse are the kWh the
stream billed, on data with a register wrap, a reset, a meter swap and a late reading.

Path: billing step (the core) -> interval facts packed in the outbox -> IntervalBatch as the
forwarder builds it -> Avro -> the sink's decoder and insert -> embedded chDB ->
close_days -> catalog queries. The ledger goes the same way (LedgerBatch, with debt)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from infra import warehouse as wh
from infra.warehouse_catalog import close_days, run_catalog
from infra.warehouse_dims import load_dimensions
from pipelines import billing
from pipelines.context import build_context
from pipelines.envelope import Envelope
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from pipelines.sink_tables import TOPIC_TABLES, drop_known_ledger_rows, insert_arrow
from schemas import codec
from schemas.intervals import INTERVAL_ROWS, rows_to_interval_batch, unpack_interval_rows
from schemas.ledger import LEDGER_ROWS, frame_to_ledger_batch, rows_to_frame, unpack_ledger_rows

pytestmark = pytest.mark.integration

T0 = 1_784_059_200_000  # 2026-07-14 20:00 UTC (04:00 local, Asia/Shanghai)
STEP = 900_000


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chdb"
    yield path
    wh.release_folder(path)


def _setup() -> tuple[Any, billing.BillingContext]:
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"] = "standard"
        merchant["protected"] = False
        merchant["opening_balance_minor"] = 10_000_000
        merchant["opening_debt_minor"] = 1539 if merchant["id"] == "M01-S0001" else 0
    portfolio = parse_portfolio(data)
    return portfolio, build_context(portfolio, 8)


def _route(ctx: billing.BillingContext, account: str) -> tuple[str, str]:
    route = next(r for r in ctx.meter_route.values() if r.account_id == account)
    return route.meter_id, next(c for c, r in ctx.circuit_meter.items() if r.meter_id == route.meter_id)


def _messages(ctx: billing.BillingContext) -> list[pl.DataFrame]:
    """One message per poll: S0001 wraps, resets, gets a new meter and sends a late reading;
    S0002 counts plainly. 10 hours across a UTC midnight."""
    m1, c1 = _route(ctx, "M01-S0001")
    m2, c2 = _route(ctx, "M01-S0002")
    top = float(ctx.rating.circuits[c1].register_max_kwh)  # type: ignore[arg-type]
    special = [(top - 0.3, m1), (top - 0.05, m1), (0.45, m1), (1.45, m1),  # wrap at poll 2
               (0.05, m1), (0.85, m1),  # reset at poll 4 (same meter, far below)
               (7.0, "M01-S0001-E1-NEW"), (7.6, "M01-S0001-E1-NEW")]  # swap at poll 6
    out = []
    for k in range(40):
        if k < len(special):
            kwh1, meter1 = special[k]
        else:
            kwh1, meter1 = 7.6 + 0.37 * (k - len(special) + 1), "M01-S0001-E1-NEW"
        rows = [(c1, meter1, T0 + k * STEP, round(kwh1, 2)), (c2, m2, T0 + k * STEP, round(50.0 + 0.61 * k, 2))]
        if k == 12:  # late: older than the last billed reading of c1
            rows.append((c1, m1, T0 + 3 * STEP + 60_000, 1.5))
        out.append(pl.DataFrame(rows, schema={"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64,
                                              "import_kwh": pl.Float64}, orient="row"))
    return out


def test_analytics_kwh_equal_billed_kwh(folder: Path) -> None:
    portfolio, ctx = _setup()
    env = Envelope()
    interval_rows: list[tuple[Any, ...]] = []
    ledger_rows: list[tuple[Any, ...]] = []
    for offset, message in enumerate(_messages(ctx)):
        env = billing.step({"b": env}, message, None, ctx, {"b": ("readings:0", offset)}, lambda _a: "b")["b"]
        for item in env.outbox:
            if item.topic == INTERVAL_ROWS:
                interval_rows += unpack_interval_rows(item.value)
            elif item.topic == LEDGER_ROWS:
                ledger_rows += unpack_ledger_rows(item.value)
    facts = pl.DataFrame(interval_rows, schema=["circuit_id", "meter_id", "account_id", "mall_id", "start_ms",
                                                "end_ms", "energy_wh", "billed_total_wh", "estimated", "flag"],
                         orient="row")
    assert {"rollover", "reset", "replaced", "late"} <= set(facts["flag"].to_list())
    ledger = rows_to_frame(ledger_rows)
    charges = ledger.filter(pl.col("kind") == "charge")
    billed = {c: int(v) for c, v in charges.group_by("circuit_id").agg(pl.col("energy_wh").sum()).rows()}
    billed_accounts = {a: int(v) for a, v in charges.group_by("account_id").agg(pl.col("energy_wh").sum()).rows()}
    assert sum(billed.values()) == int(facts["energy_wh"].sum())

    intervals_spec = TOPIC_TABLES["mallwatt.intervals"]
    ledger_spec = TOPIC_TABLES["mallwatt.ledger"]
    with wh.open_owner(folder, serve=False) as owner:
        c = owner.client
        load_dimensions(c, portfolio)
        half = len(interval_rows) // 2
        # as the forwarder publishes them (two steps), and a re-publication after a "crash"
        for n, part in enumerate([interval_rows[:half], interval_rows[half:], interval_rows[: half + 7]]):
            value = codec.encode("IntervalBatch", rows_to_interval_batch(part, f"t:0@{n}"))
            chunk, rows, _ = intervals_spec.decode(value)
            assert rows == len(part)
            insert_arrow(c, intervals_spec.table, intervals_spec.to_arrow([chunk]), f"intervals-{n}")
        value = codec.encode("LedgerBatch", frame_to_ledger_batch(ledger, "t:0@0"))
        chunk, _, _ = ledger_spec.decode(value)
        insert_arrow(c, ledger_spec.table, drop_known_ledger_rows(ledger_spec.to_arrow([chunk]), c), "ledger-0")
        # the first UTC day is closed (billed_hour_kwh), the second stays open (derived)
        assert close_days(c, dt.date(2026, 7, 14)) is not None

        days = {"from_day": "2026-07-15", "to_day": "2026-07-15", "mall_id": "M01"}
        by_mall = run_catalog("consumption_daily", {**days, "by": "mall"}, path=str(folder)).frame
        assert by_mall["kwh"].sum() == pytest.approx(sum(billed.values()) / 1000, abs=1e-6)
        totals = run_catalog("kwh_per_m2", {**days, "by": "mall"}, path=str(folder)).frame
        assert totals["kwh"].sum() == pytest.approx(sum(billed.values()) / 1000, abs=1e-3)
        top = run_catalog("top_consumers", {"start": "2026-07-14 00:00:00", "end": "2026-07-16 00:00:00",
                                            "mall_id": "M01", "limit": 10}, path=str(folder)).frame
        assert {a: round(k * 1000) for a, k in top.select("account_id", "kwh").rows()} == billed_accounts
        window = {"start_ms": T0 - 12 * 3_600_000, "end_ms": T0 + 48 * 3_600_000, "mall_id": "M01"}
        energy = wh.run_named_query("bills_circuit_energy", window, path=str(folder))
        assert dict(energy.rows()) == billed
        # facts stored once despite the re-publication, flags kept
        stored = wh.query_df("SELECT flag, count() AS n, sum(energy_wh) AS wh FROM mallwatt.interval_energy FINAL "
                             "GROUP BY flag ORDER BY flag", path=str(folder))
        assert int(stored["n"].sum()) == facts.height and int(stored["wh"].sum()) == sum(billed.values())
        # the statement's debt line comes from the warehouse with its amount
        entries = wh.run_named_query("bills_ledger_period", window, path=str(folder))
        debt = entries.filter(pl.col("kind") == "debt_opening")
        assert debt.select("account_id", "amount_minor", "debt_change_minor").rows() == [("M01-S0001", 0, 1539)]
