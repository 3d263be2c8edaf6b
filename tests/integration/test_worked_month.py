"""The worked example of docs/billing.md: one month of one merchant gives the same kWh and
money in the stream, replay, the warehouse and the bill (embedded chDB, no Kafka broker)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from infra import warehouse as wh
from infra.warehouse_catalog import run_catalog
from pipelines import worked_example as w

pytestmark = pytest.mark.integration


def _expected_wh(inp: w.MonthInput) -> int:
    """The month's energy from the readings themselves, by hand: on-time readings in order,
    a wrap adds the register's modulus, a new meter starts a new baseline, the late one is out."""
    cfg = inp.ctx.rating.circuits[inp.circuit]
    modulus = Decimal(str(cfg.register_max_kwh)) + Decimal(str(cfg.register_resolution_kwh))
    rows = sorted((r for _, m in inp.messages for r in m.iter_rows(named=True) if r["ts_ms"] % w.STEP_MS == 0),
                  key=lambda r: r["ts_ms"])
    total = Decimal(0)
    for a, b in zip(rows, rows[1:], strict=False):
        if a["meter_id"] == b["meter_id"]:
            delta = Decimal(str(b["import_kwh"])) - Decimal(str(a["import_kwh"]))
            total += delta + modulus if delta < 0 else delta  # Decimal's % keeps the sign
    return int(total * 1000)


def test_one_month_agrees_in_stream_replay_warehouse_and_bill(tmp_path: Path) -> None:
    inp = w.month_input()
    run = w.run_stream(inp)
    facts = pl.DataFrame(run.intervals, schema=w.INTERVAL_COLUMNS, orient="row")
    # the month has what makes energy hard: a wrap, a meter swap and a late reading
    assert {"rollover", "replaced", "late"} <= set(facts["flag"].to_list())
    figures = [w.stream_figures(run, inp), w.replay_figures(inp)]
    folder = tmp_path / "chdb"
    try:
        with wh.open_owner(folder, serve=False) as owner:
            w.load_warehouse(run, inp, owner.client)
            figures += [w.warehouse_figures(inp, str(folder)), w.bill_figures(inp, str(folder))]
            monthly = run_catalog("consumption_monthly", {"from_day": "2026-07-01", "to_day": "2026-07-31",
                                                          "mall_id": w.MALL, "by": "mall"}, path=str(folder)).frame
    finally:
        wh.release_folder(folder)
    assert [f.source for f in figures] == ["stream", "replay", "warehouse", "bill"]
    stream = figures[0]
    for other in figures[1:]:
        assert other.key() == stream.key(), (other, stream)
    # ... and they are the right figures, not just equal ones
    assert stream.energy_wh == _expected_wh(inp) > 0
    assert stream.opening_minor == w.OPENING_MINOR
    assert stream.topups_minor == sum({p["payment_id"]: p["amount_minor"] for _, p in inp.payments}.values())
    assert stream.shared_cost_minor == inp.posting["amount_minor"]
    assert stream.energy_minor < 0
    assert stream.closing_minor == (stream.opening_minor + stream.energy_minor + stream.topups_minor
                                    + stream.shared_cost_minor)
    # the analysts' catalog query reads the same Wh (only this merchant is metered in the mall)
    assert monthly.height == 1 and round(monthly["kwh"][0] * 1000) == stream.energy_wh
    assert "| bill | " in w.table(figures)
