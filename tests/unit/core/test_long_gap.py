"""A gap of decades between two readings bills in bounded memory and time, and sanely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
from billing_helpers import make_ctx, ms, readings
from test_tariff import GD, iv

from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import GRID_MS
from pipelines.core.tariff import MAX_PIECES, rate

ROOT = Path(__file__).resolve().parents[3]
# One process per year: ru_maxrss is a high-water mark, so each case needs its own process.
SCRIPT = r"""
import json, resource, sys, time
sys.path.insert(0, "tests/unit/core")
from billing_helpers import make_ctx, ms, readings
from test_tariff import GD
from pipelines.core.engine import CoreState, process_batch
ctx = make_ctx(GD)
state, _ = process_batch(CoreState(), readings([("c1", "m1", ms(2026, 7, 1, 10), 100.0)]), None, ctx)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
year = int(sys.argv[1])
state, out = process_batch(state, readings([("c1", "m1", ms(year, 7, 1, 10), 1100.0)]), None, ctx)
print(json.dumps({"s": time.perf_counter() - t, "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                  "charged": -sum(out.ledger["amount_minor"]), "wh": int(out.rated["energy_wh"].sum()),
                  "est": bool(out.intervals["estimated"].all()), "last": state.circuits["c1"].last_ts_ms}))
"""


def run(year: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLARS_MAX_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(year)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_decades_gap_is_bounded_and_billed_sanely() -> None:
    # Before the bound, 2026 -> 2100 took 0.8 GB and ~3 s (one piece per 15-minute slot).
    far, near = run(2100), run(2026 + 1)
    for r in (far, near):
        assert r["wh"] == 1_000_000 and r["est"]  # the energy is the register difference, exact
        # 1000 kWh between the valley (38) and the critical-peak (212.5) price: 380..2125 CNY
        assert 38_000 <= r["charged"] <= 212_500
    assert far["grew_kb"] < 100 * 1024, far  # generous: the 2100 case is within noise of a 1-year gap
    assert far["s"] < 5, far
    assert far["last"] == ms(2100, 7, 1, 10)
    # time-of-use shares follow time: 7 peak/sharp hours, 9 flat, 8 valley of 24 -> about 81 fen/kWh
    assert abs(far["charged"] - near["charged"]) < 0.05 * near["charged"], (far, near)


def test_long_interval_is_cut_into_at_most_max_pieces_that_add_up() -> None:
    start = ms(2026, 1, 5)
    end = start + 3 * MAX_PIECES * GRID_MS + 7 * 60_000  # ~3.4 months, not on the grid
    r, _ = rate(iv(start, end, 987_654), make_ctx(GD), {})
    assert r.height <= MAX_PIECES and r["energy_wh"].sum() == 987_654
    assert r["piece_ms"].min() >= start and r["piece_ms"].max() < end
    months = r.group_by("month").agg(pl.col("energy_wh").sum()).sort("month")
    assert months["month"].to_list() == [202601, 202602, 202603, 202604]  # energy spread over the gap


def test_pieces_of_whole_days_still_spread_over_the_hours() -> None:
    # Each piece exactly one day long: labelling every piece with its first slot would price the
    # whole gap at midnight (valley). Valley is 8 of 24 hours.
    start = ms(2025, 1, 1)
    r, _ = rate(iv(start, start + MAX_PIECES * 96 * GRID_MS, 24_000_000), make_ctx(GD), {})
    share = r.group_by("period").agg(pl.col("energy_wh").sum()).with_columns(
        share=pl.col("energy_wh") / 24_000_000)
    valley = share.filter(pl.col("period") == "valley")["share"].item()
    assert abs(valley - 8 / 24) < 0.03, share


def test_gaps_up_to_the_bound_are_split_per_slot() -> None:
    start = ms(2026, 3, 2)
    r, _ = rate(iv(start, start + MAX_PIECES * GRID_MS, MAX_PIECES * 10), make_ctx(GD), {})
    assert r.height == MAX_PIECES and (r["energy_wh"] == 10).all()
    assert (r["piece_ms"].diff().drop_nulls() == GRID_MS).all()


def test_reading_stream_keeps_billing_after_the_gap() -> None:
    ctx = make_ctx(GD)
    state, _ = process_batch(CoreState(), readings([("c1", "m1", ms(2026, 7, 1, 10), 100.0)]), None, ctx)
    state, _ = process_batch(state, readings([("c1", "m1", ms(2027, 7, 1, 10), 200.0)]), None, ctx)
    state, out = process_batch(state, readings([("c1", "m1", ms(2027, 7, 1, 10, 15), 201.0)]), None, ctx)
    assert out.rejected_readings.height == 0 and int(out.rated["energy_wh"].sum()) == 1000
