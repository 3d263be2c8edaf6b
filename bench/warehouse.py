"""Warehouse benchmark: bulk readings into embedded chDB, then every catalog query timed.

    python -m bench.warehouse [--json] [--scale 1.0] [--days 30] [--step-min 15]
                              [--path var/bench/chdb-warehouse] [--keep] [--repeat 3]

Full scale: 50 malls x 700 circuits (697 merchants + 3 common-area meters) = 35,000
circuits, 30 days at 15-minute resolution = 100.8 million readings. `--scale 0.1` keeps
the shape with 5 malls. Readings go in through the sink's own insert path (frames ->
`pipelines.sink_tables.readings_to_arrow` -> `pipelines.sink_tables.insert_arrow` with a
dedup token), in batches of the sink's default size (250k rows), so the materialized views
(circuit_daily) work exactly as behind the sink: `sink_rows_per_s` =
readings / seconds spent inserting (`sink_rows_per_cpu_s`: per CPU-second of this process,
chDB's threads included; steadier on a shared machine; load averages are reported too).
The ledger gets one charge per account, local day and TOU period plus weekly top-ups
(coarser than production's per-interval charges, which only makes the ledger rollups
smaller). Then each catalog query runs with dashboard-like parameters (a month of local
days; top_consumers: the last day) and `query_ms` reports the best of `--repeat` runs.

The same generator makes the small deterministic fixtures of the warehouse tests
(`synthetic_dataset`), with planted anomalies the anomaly queries must find.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.context import landlord_account
from pipelines.generate import GUANGDONG_HOURS, generate
from pipelines.portfolio import Portfolio, parse_portfolio
from pipelines.sink import DEFAULT_MAX_ROWS
from pipelines.sink_tables import LEDGER_SCHEMA, insert_arrow, readings_to_arrow

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO / "var" / "bench" / "chdb-warehouse"
START = dt.date(2026, 3, 1)  # local days; UTC+8 malls
OPEN_HOUR, CLOSE_HOUR = 10, 22
PRICES = {"P": ("peak", 136.0), "F": ("flat", 80.0), "V": ("valley", 30.4)}  # fen per kWh
TOU_BY_HOUR = GUANGDONG_HOURS.replace(" ", "")

# W per m2 of leased area while open, and the fraction of it that runs while closed.
INTENSITY = {"retail": (30.0, 0.04), "restaurant": (80.0, 0.08), "services": (25.0, 0.04),
             "supermarket": (40.0, 0.6), "cinema": (35.0, 0.05)}  # fmt: skip
# Common-area circuits: fraction of max_kw while open, while closed.
COMMON = {"hvac": (0.5, 0.04), "elevator": (0.3, 0.02), "public_lighting": (0.8, 0.1)}


@dataclass(frozen=True)
class Anomalies:
    """Planted faults (circuit ids), so tests can check the queries find exactly these."""

    night_draw: str | None = None  # draws its open-hours power all night too
    baseline_shift: str | None = None  # triples its load in the last 3 days
    tripped_drawing: str | None = None  # relay OPEN for 3 hours on day 2, still drawing
    tripped_quiet: str | None = None  # relay OPEN for 3 hours on day 2, drawing nothing (fine)


@dataclass
class Synthetic:
    portfolio: Portfolio
    circuits: pl.DataFrame  # circuit_id, meter_id, account_id, mall_id, purpose, business_type, kw_open, kw_closed
    start_ms: int
    days: int
    step_s: int
    anomalies: Anomalies = field(default_factory=Anomalies)
    noise: float = 0.1  # power varies uniformly by +-noise around the shape; 0 for exact sums


def build_synthetic(malls: int, stalls: int, days: int, step_s: int = 900, *, seed: int = 11,
                    start: dt.date = START, plant: bool = True) -> Synthetic:  # fmt: skip
    portfolio = parse_portfolio(generate(malls, stalls, seed=seed), "<bench>")
    merchants = {m.id: m for _, m in portfolio.merchants()}
    rows = []
    for mall, meter in portfolio.meters():
        circuit = meter.circuits[0]
        if meter.account is None:
            open_f, closed_f = COMMON.get(str(circuit.purpose), (0.2, 0.02))
            kw_open, kw_closed, btype = meter.max_kw * open_f, meter.max_kw * closed_f, "common"
        else:
            merchant = merchants[meter.account]
            btype = str(merchant.business_type)
            w_m2, closed_f = INTENSITY.get(btype, (30.0, 0.05))
            kw_open = merchant.leased_area_m2 * w_m2 / 1000
            kw_closed = kw_open * closed_f
        rows.append({"circuit_id": circuit.id, "meter_id": meter.id,
                     "account_id": meter.account or landlord_account(mall.id), "mall_id": mall.id,
                     "purpose": str(circuit.purpose), "business_type": btype,
                     "kw_open": round(kw_open, 3), "kw_closed": round(kw_closed, 3)})  # fmt: skip
    circuits = pl.DataFrame(rows)
    anomalies = Anomalies()
    if plant:
        retail = circuits.filter(pl.col("business_type") == "retail")["circuit_id"].to_list()
        anomalies = Anomalies(retail[0], retail[1], retail[2], retail[3])
    # Local midnight of `start` in UTC+8.
    start_ms = int(dt.datetime.combine(start, dt.time(), dt.UTC).timestamp() * 1000) - 8 * 3_600_000
    return Synthetic(portfolio, circuits, start_ms, days, step_s, anomalies)


def _collector_ids(circuits: pl.DataFrame) -> pl.Series:
    return ("collector-" + circuits["mall_id"]).alias("collector_id")


def reading_days(syn: Synthetic) -> Iterator[tuple[int, pl.DataFrame]]:
    """One frame per day with every circuit's reads, in the sink's readings columns."""
    n = syn.circuits.height
    polls = 86_400 // syn.step_s
    kw_open = syn.circuits["kw_open"].to_numpy()
    kw_closed = syn.circuits["kw_closed"].to_numpy()
    ids = syn.circuits["circuit_id"].to_list()
    index = {c: i for i, c in enumerate(ids)}
    a = syn.anomalies
    rng = np.random.default_rng(12345)
    register = np.round(rng.uniform(100, 10_000, n), 2)
    mall = syn.circuits["mall_id"]
    collectors = _collector_ids(syn.circuits)
    base_cols = {"mall_id": mall, "account_id": syn.circuits["account_id"],
                 "meter_id": syn.circuits["meter_id"], "circuit_id": syn.circuits["circuit_id"],
                 "collector_id": collectors}  # fmt: skip
    for day in range(syn.days):
        day_ms = syn.start_ms + day * 86_400_000
        # Poll k reads the register at the END of its interval [k*step, (k+1)*step).
        local_hour = (np.arange(polls) * syn.step_s // 3600 + 0) % 24  # local day starts at 0
        is_open = (local_hour >= OPEN_HOUR) & (local_hour < CLOSE_HOUR)
        power = np.where(is_open[None, :], kw_open[:, None], kw_closed[:, None])  # kW, n x polls
        power = power * rng.uniform(1 - syn.noise, 1 + syn.noise, (n, polls))
        if a.night_draw is not None:
            i = index[a.night_draw]
            power[i, ~is_open] = kw_open[i]
        if a.baseline_shift is not None and day >= syn.days - 3:
            power[index[a.baseline_shift], :] *= 3.0
        relay = np.zeros((n, polls), dtype=np.uint8)
        if day == 1:
            window = (local_hour >= 2) & (local_hour < 5)
            if a.tripped_drawing is not None:
                relay[index[a.tripped_drawing], window] = 1
                power[index[a.tripped_drawing], window] = 0.8  # 800 W through an open relay
            if a.tripped_quiet is not None:
                relay[index[a.tripped_quiet], window] = 1
                power[index[a.tripped_quiet], window] = 0.0
        energy = power * (syn.step_s / 3600)
        regs = np.round(register[:, None] + np.cumsum(energy, axis=1), 2)
        register = regs[:, -1]
        ts = day_ms + (np.arange(1, polls + 1) * syn.step_s * 1000)
        ts = ts - 1000  # read one second before the slot ends: stays inside the slot
        take = np.repeat(np.arange(n), polls)
        frame = pl.DataFrame({name: col.gather(take) for name, col in base_cols.items()})
        ts_all = np.tile(ts, n)
        frame = frame.with_columns(
            pl.Series("ts", ts_all).cast(pl.Datetime("ms", "UTC")),
            pl.Series("import_kwh", regs.ravel()),
            pl.lit(None, pl.Float64).alias("export_kwh"),
            pl.Series("power_w", np.round(power.ravel() * 1000, 1)),
            pl.Series("voltage_v", np.round(rng.normal(228, 2, n * polls), 1)),
            pl.lit(None, pl.Float64).alias("current_a"),
            pl.lit(0.95).alias("power_factor"),
            pl.Series("relay", np.where(relay.ravel() == 1, "OPEN", "CLOSED")),
            pl.lit([], pl.List(pl.String)).alias("flags"),
            pl.lit(f"bench-{day}").alias("batch_id"),
            pl.Series("collected_at", ts_all + 5_000).cast(pl.Datetime("ms", "UTC")),
        )
        yield day, frame.select(
            "mall_id", "account_id", "meter_id", "circuit_id", "ts", "import_kwh", "export_kwh",
            "power_w", "voltage_v", "current_a", "power_factor", "relay", "flags", "batch_id",
            "collector_id", "collected_at",
        )  # fmt: skip


def ledger_rows(syn: Synthetic, frames: list[pl.DataFrame] | None = None) -> pa.Table:
    """Charges per account, local day and TOU period (from the readings), weekly top-ups."""
    parts = []
    code_by_hour = {h: TOU_BY_HOUR[h] for h in range(24)}
    prev: pl.DataFrame | None = None  # each circuit's last read of the previous frame
    for day, frame in (enumerate(frames) if frames is not None else reading_days(syn)):
        reads = frame.select("circuit_id", "account_id", "mall_id", "ts", "import_kwh")
        if prev is not None:
            reads = pl.concat([prev, reads])
        reads = reads.sort("circuit_id", "ts").with_columns(
            (pl.col("import_kwh") - pl.col("import_kwh").shift(1).over("circuit_id"))
            .fill_null(0.0).clip(lower_bound=0.0).alias("kwh"),
            ((pl.col("ts").dt.epoch("ms") - syn.start_ms) // 3_600_000 % 24).alias("hour"),
        )
        prev = reads.group_by("circuit_id").agg(pl.all().sort_by("ts").last()).select(
            "circuit_id", "account_id", "mall_id", "ts", "import_kwh")
        reads = reads.filter(pl.col("ts") >= frame["ts"].min())
        reads = reads.with_columns(
            pl.col("hour").replace_strict(code_by_hour, return_dtype=pl.String).alias("code"))
        agg = reads.group_by("account_id", "mall_id", "code").agg(pl.col("kwh").sum())
        parts.append(agg.with_columns(pl.lit(day).alias("day")))
    charges = pl.concat(parts)
    price = pl.col("code").replace_strict({k: v[1] for k, v in PRICES.items()}, return_dtype=pl.Float64)
    period = pl.col("code").replace_strict({k: v[0] for k, v in PRICES.items()}, return_dtype=pl.String)
    charges = charges.with_columns(
        (pl.col("kwh") * 1000).round().cast(pl.Int64).alias("energy_wh"),
        period.alias("tou_period"),
    ).with_columns(
        (-(pl.col("energy_wh") * price / 1000).round()).cast(pl.Int64).alias("amount_minor"),
        (syn.start_ms + pl.col("day") * 86_400_000 + 86_400_000 - 1).alias("ts_ms"),
        (syn.start_ms + pl.col("day") * 86_400_000).alias("interval_start_ms"),
    )
    topups = (
        charges.group_by("account_id", "mall_id").agg((-pl.col("amount_minor").sum()).alias("cost"))
        .join(pl.DataFrame({"week": list(range((syn.days + 6) // 7))}), how="cross")
        .with_columns(
            ((pl.col("cost") * 1.1 / ((syn.days + 6) // 7)).round().cast(pl.Int64)).alias("amount_minor"),
            (syn.start_ms + pl.col("week") * 7 * 86_400_000 + 3_600_000).alias("ts_ms"),
        )
    )
    def entries(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
        key = pl.concat_str(pl.lit(kind), pl.col("account_id"), pl.col("ts_ms").cast(pl.String),
                            *( [pl.col("tou_period")] if "tou_period" in frame.columns else []), separator=":")  # fmt: skip
        return frame.select(
            key.alias("entry_id"), "account_id", "mall_id", pl.lit(kind).alias("kind"),
            "amount_minor", pl.lit(0, pl.Int64).alias("balance_after_minor"),
            pl.col("ts_ms").cast(pl.Datetime("ms", "UTC")).alias("ts"), key.alias("source_id"),
            pl.lit(None, pl.String).alias("meter_id"), pl.lit(None, pl.String).alias("circuit_id"),
            (pl.col("interval_start_ms") if "interval_start_ms" in frame.columns
             else pl.lit(None, pl.Int64)).cast(pl.Datetime("ms", "UTC")).alias("interval_start"),
            (pl.col("energy_wh") if "energy_wh" in frame.columns else pl.lit(None, pl.Int64)).alias("energy_wh"),
            (pl.col("tou_period") if "tou_period" in frame.columns else pl.lit(None, pl.String)).alias("tou_period"),
            pl.lit(None, pl.Int32).alias("tier"), pl.lit(None, pl.String).alias("rate"),
            pl.lit(False).alias("estimated"), pl.lit(None, pl.Int64).alias("debt_change_minor"),
        )  # fmt: skip
    ledger = pl.concat([entries(charges, "charge"), entries(topups, "topup")])
    # Running balance per account in time order, as the billing core would write it.
    ledger = ledger.sort("account_id", "ts", "entry_id").with_columns(
        pl.col("amount_minor").cum_sum().over("account_id").alias("balance_after_minor"))
    return ledger.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(LEDGER_SCHEMA)


def insert_readings(client: Any, frame: pl.DataFrame, token: str,
                    batch_rows: int = DEFAULT_MAX_ROWS) -> None:  # fmt: skip
    """The sink's inserts of `frame` (pipelines.sink.Sink._write): batches of the sink's
    default size, Arrow conversion included, each with its own dedup token."""
    for i, start in enumerate(range(0, frame.height, batch_rows)):
        table = readings_to_arrow([frame.slice(start, batch_rows)])
        insert_arrow(client, "mallwatt.readings", table, f"{token}-{i}")


FACT_KEYS = ["circuit_id", "meter_id", "ts", "reg", "total"]


def interval_facts(frame: pl.DataFrame, carry: pl.DataFrame | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The interval facts the core would bill for one day of clean synthetic reads (what the
    sink stores from mallwatt.intervals), and the carry (last read and billed total per
    circuit) for the next day. Register differences in integer Wh; a meter change or a
    negative step bills 0 (replaced / reset), as the core does; no wraps in synthetic data."""
    reads = frame.select("mall_id", "account_id", "circuit_id", "meter_id", "ts",
                         (pl.col("import_kwh") * 1000).round().cast(pl.Int64).alias("reg"))
    if carry is not None:
        reads = pl.concat([carry.select(reads.columns), reads], how="vertical")
    reads = reads.sort("circuit_id", "ts")
    prev = [pl.col(c).shift(1).over("circuit_id") for c in ("ts", "reg", "meter_id")]
    facts = reads.with_columns(prev_ts=prev[0], prev_reg=prev[1], prev_meter=prev[2]).filter(
        pl.col("prev_ts").is_not_null()).with_columns(
        flag=pl.when(pl.col("meter_id") != pl.col("prev_meter")).then(pl.lit("replaced"))
        .when(pl.col("reg") < pl.col("prev_reg")).then(pl.lit("reset")).otherwise(pl.lit("")))
    facts = facts.with_columns(energy_wh=pl.when(pl.col("flag") == "").then(pl.col("reg") - pl.col("prev_reg"))
                               .otherwise(0))
    base = (carry.select("circuit_id", "total") if carry is not None
            else pl.DataFrame(schema={"circuit_id": pl.String, "total": pl.Int64}))
    facts = facts.join(base, on="circuit_id", how="left").with_columns(
        billed_total_wh=pl.col("total").fill_null(0) + pl.col("energy_wh").cum_sum().over("circuit_id"))
    out = facts.select("mall_id", "circuit_id", pl.col("ts").alias("end_ts"), pl.col("prev_ts").alias("start_ts"),
                       "account_id", "meter_id", "energy_wh", "billed_total_wh",
                       ((pl.col("ts") - pl.col("prev_ts")).dt.total_minutes() > 20).alias("estimated"), "flag")
    last = reads.group_by("circuit_id").agg(pl.all().sort_by("ts").last())
    totals = out.group_by("circuit_id").agg(pl.col("billed_total_wh").max().alias("new_total"))
    last = last.join(base, on="circuit_id", how="left").join(totals, on="circuit_id", how="left").with_columns(
        total=pl.coalesce("new_total", "total", pl.lit(0))).drop("new_total")
    return out, last


def insert_facts(client: Any, facts: pl.DataFrame, token: str) -> None:
    table = facts.to_arrow(compat_level=pl.CompatLevel.oldest())
    for i, start in enumerate(range(0, table.num_rows, 250_000)):
        insert_arrow(client, "mallwatt.interval_energy", table.slice(start, 250_000), f"{token}-{i}")


def synthetic_dataset(client: Any, syn: Synthetic, *, close: bool = True) -> dict[str, Any]:
    """Dims + readings + ledger + watermark of `syn` into a migrated warehouse (tests), and
    the closed days' hourly energies as the sink's timer writes them (`closed`: first and
    last UTC day written; the last UTC day of the data stays open)."""
    from infra.warehouse_catalog import close_days
    from infra.warehouse_dims import load_dimensions

    load_dimensions(client, syn.portfolio)
    frames = []
    carry = None
    for day, frame in reading_days(syn):
        insert_readings(client, frame, f"synthetic-readings-{day}")
        facts, carry = interval_facts(frame, carry)
        insert_facts(client, facts, f"synthetic-facts-{day}")
        frames.append(frame)
    ledger = ledger_rows(syn, frames)
    client.insert_arrow("mallwatt.ledger", ledger)
    end_ms = syn.start_ms + syn.days * 86_400_000 - 1000
    write_watermark(client, {"mallwatt.readings": end_ms, "mallwatt.ledger": end_ms, "mallwatt.intervals": end_ms})
    closed = close_days(client) if close else None
    return {"readings": sum(f.height for f in frames), "ledger": ledger.num_rows, "frames": frames,
            "closed": closed}  # fmt: skip


def write_watermark(client: Any, topics: dict[str, int]) -> None:
    ts = pa.timestamp("ms", tz="UTC")
    names = list(topics)
    client.insert_arrow("mallwatt.ingest_watermark", pa.table({
        "topic": pa.array(names, pa.string()), "partition": pa.array([0] * len(names), pa.int32()),
        "max_offset": pa.array([0] * len(names), pa.int64()),
        "max_event_ts": pa.array([topics[n] for n in names], ts),
        "updated_at": pa.array([topics[n] for n in names], ts),
    }))  # fmt: skip


# --- benchmark ------------------------------------------------------------------------


def bench_params(syn: Synthetic) -> dict[str, dict[str, Any]]:
    """Dashboard-like parameters per catalog query."""
    first = START
    last = START + dt.timedelta(days=syn.days - 1)
    month = {"tz": "Asia/Shanghai", "from_day": first.isoformat(), "to_day": last.isoformat()}
    last_day_start = dt.datetime.combine(last, dt.time(), dt.UTC) - dt.timedelta(hours=8)
    week = {**month, "from_day": (last - dt.timedelta(days=6)).isoformat()}
    return {
        "consumption_daily": {**month, "by": "business_type"},
        "consumption_monthly": {**month, "by": "area"},
        "merchant_by_purpose": month,
        "kwh_per_m2": {**month, "by": "business_type"},
        "efficiency_rank": month,
        "tou_shares": month,
        "top_movers": week,
        "top_consumers": {"start": last_day_start.strftime("%Y-%m-%d %H:%M:%S"),
                          "end": (last_day_start + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")},
        "load_profile": {**month, "by": "business_type"},
        "common_area_hours": month,
        "anomaly_closed_hours": month,
        "anomaly_baseline_shift": month,
        "anomaly_tripped_drawing": month,
        "collections_vs_cost": month,
        "collector_completeness": {"from_day": (first - dt.timedelta(days=1)).isoformat(),
                                   "to_day": last.isoformat()},
        "completeness": {},
        "portfolio_daily": {k: month[k] for k in ("tz", "from_day", "to_day")},
        "account_balances": {},
        "alerts_daily": month,
        "relay_trips": month,
        "audit_trail": {"from_ts": (last_day_start - dt.timedelta(days=30)).strftime("%Y-%m-%d %H:%M:%S"),
                        "to_ts": (last_day_start + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")},
    }  # fmt: skip


def _optimize(client: Any, table: str, log: Any, attempts: int = 3) -> None:
    # chDB 4.4 once failed an OPTIMIZE FINAL racing a background merge ("file_size: No such
    # file"); the data was intact, so retry, and go on unmerged if it keeps failing.
    for attempt in range(attempts):
        try:
            client.command(f"OPTIMIZE TABLE mallwatt.{table} FINAL")
            return
        except Exception as exc:  # the engine's error, whatever its class
            log(f"OPTIMIZE {table} failed (attempt {attempt + 1}): {str(exc)[:200]}")
            time.sleep(2)


def run_bench(path: Path, scale: float, days: int, step_min: int, repeat: int,
              keep: bool, log: Any, load: bool = True) -> dict[str, Any]:  # fmt: skip
    from infra import warehouse as wh
    from infra.warehouse_catalog import catalog, close_days

    malls = max(1, round(50 * scale))
    syn = build_synthetic(malls, 697, days, step_min * 60)
    if load and path.exists():
        shutil.rmtree(path)
    out: dict[str, Any] = {"scale": scale, "malls": malls, "circuits": syn.circuits.height,
                           "days": days, "step_min": step_min,
                           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    if load:
        out.update(load_data(path, syn, days, log))
    else:
        log(f"timing queries on the data already in {path}")
    with wh.open_owner(path, serve=False, migrate=False) as owner:
        log("merging parts")
        t0 = time.perf_counter()
        for table in ("circuit_daily", "billed_daily", "ledger_tou_hourly", "ledger_hourly"):
            _optimize(owner.client, table, log)
        out["optimize_s"] = round(time.perf_counter() - t0, 1)
        if load:
            # What the sink's timer does once a day, here for every day the watermark has
            # passed: the last UTC day stays open and is derived at query time.
            t0 = time.perf_counter()
            closed = close_days(owner.client)
            _optimize(owner.client, "billed_hour_kwh", log)
            out["close_days_s"] = round(time.perf_counter() - t0, 1)
            out["closed_days"] = [d.isoformat() for d in closed] if closed else None
            log(f"closed days {out['closed_days']} in {out['close_days_s']} s")
        sizes = owner.client.query(
            "SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND "
            "database = 'mallwatt' GROUP BY table ORDER BY table").result_rows
        out["tables"] = {t: {"rows": int(r), "mb": round(b / 1e6, 1)} for t, r, b in sizes}
        if not load:
            out["readings"] = out["tables"].get("readings", {}).get("rows", 0)
    params = bench_params(syn)
    timings: dict[str, float] = {}
    result_rows: dict[str, int] = {}
    with wh.open_owner(path, serve=False, migrate=False) as owner:
        for spec in catalog():
            bound = spec.bind(params.get(spec.name, {}))
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                table = owner.client.query_arrow(spec.sql, parameters=bound)
                best = min(best, time.perf_counter() - t0)
            timings[spec.name] = round(best * 1000, 1)
            result_rows[spec.name] = table.num_rows
            log(f"{spec.name}: {best * 1000:,.0f} ms, {table.num_rows} rows")
    out["query_ms"] = timings
    out["query_rows"] = result_rows
    out["targets"] = {"sink_rows_per_s>=500000": out.get("sink_rows_per_s", 0) >= 500_000,
                      "every_query<1000ms": all(v < 1000 for v in timings.values())}  # fmt: skip
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return out


def load_data(path: Path, syn: Synthetic, days: int, log: Any) -> dict[str, Any]:
    """Dims, readings through the sink's insert path, the ledger and the watermark."""
    from infra import warehouse as wh
    from infra.warehouse_dims import load_dimensions

    out: dict[str, Any] = {}
    with wh.open_owner(path, serve=False) as owner:
        client = owner.client
        load_dimensions(client, syn.portfolio)
        rows, insert_s, gen_s, insert_cpu = 0, 0.0, 0.0, 0.0
        frames_for_ledger: list[pl.DataFrame] = []
        carry, facts_s, facts_rows = None, 0.0, 0
        t_gen = time.perf_counter()
        for day, frame in reading_days(syn):
            facts, carry = interval_facts(frame, carry)
            gen_s += time.perf_counter() - t_gen
            token = hashlib.sha1(f"bench-{day}".encode()).hexdigest()
            t0, c0 = time.perf_counter(), time.process_time()
            insert_readings(client, frame, token)
            insert_s += time.perf_counter() - t0
            t1 = time.perf_counter()
            insert_facts(client, facts, token + "-facts")
            facts_s += time.perf_counter() - t1
            facts_rows += facts.height
            # chDB runs in this process: its insert, view and merge threads count here too
            insert_cpu += time.process_time() - c0
            rows += frame.height
            # The ledger only needs hourly registers: keep one read per hour.
            frames_for_ledger.append(frame.filter(pl.col("ts").dt.minute() == 59))
            log(f"day {day + 1}/{days}: {rows:,} readings, {rows / insert_s:,.0f} rows/s")
            t_gen = time.perf_counter()
        out.update(readings=rows, sink_rows_per_s=round(rows / insert_s), insert_s=round(insert_s, 1),
                   sink_rows_per_cpu_s=round(rows / insert_cpu), generate_s=round(gen_s, 1),
                   load_average_after_insert=[round(x, 2) for x in os.getloadavg()],
                   interval_facts=facts_rows, facts_rows_per_s=round(facts_rows / max(facts_s, 1e-9)))  # fmt: skip
        t0 = time.perf_counter()
        ledger = ledger_rows(syn, frames_for_ledger)
        for start in range(0, ledger.num_rows, 500_000):
            client.insert_arrow("mallwatt.ledger", ledger.slice(start, 500_000))
        out.update(ledger_rows=ledger.num_rows, ledger_insert_s=round(time.perf_counter() - t0, 1))
        end_ms = syn.start_ms + days * 86_400_000 - 1000
        write_watermark(client, {"mallwatt.readings": end_ms, "mallwatt.ledger": end_ms,
                                 "mallwatt.intervals": end_ms})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt bench warehouse", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON figures")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 50 malls (default 1)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--step-min", type=int, default=15, help="minutes between reads")
    parser.add_argument("--repeat", type=int, default=3, help="runs per query (best counts)")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="chDB folder (recreated)")
    parser.add_argument("--keep", action="store_true", help="keep the folder afterwards")
    parser.add_argument("--no-load", action="store_true",
                        help="time the queries on a folder kept by an earlier run (same --scale/--days)")
    args = parser.parse_args(argv)  # fmt: skip
    if not 0 < args.scale <= 4 or args.days < 2 or not 1 <= args.step_min <= 60:
        parser.error("need 0 < --scale <= 4, --days >= 2, 1 <= --step-min <= 60")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    out = run_bench(args.path, args.scale, args.days, args.step_min, args.repeat,
                    args.keep or args.no_load, log, load=not args.no_load)
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
