"""Tariff engine: intervals -> priced pieces (TOU period x tier), exact integers throughout.

Rules (see docs/billing.md):
- Intervals are cut on the 15-minute UTC grid (``GRID_MS``). Every real time-zone offset is a
  multiple of 15 minutes and versions are validated to start on the grid, so each piece lies in
  one local hour, one local day and one tariff version. DST needs no special case: pieces are
  UTC spans, and each is labelled with the local wall-clock hour it falls in.
- A piece's energy is its share of the interval's Wh in proportion to time, apportioned by
  cumulative floor (``E * t_cum // T`` differences), so the pieces add up to the interval exactly.
- Tiers use the account's cumulative Wh in the local calendar month; a piece that crosses a
  block boundary is split at the boundary.
- Price of a piece = period price (critical peak: peak * (1 + uplift)), then tier
  ``* multiplier + adder``, then the merchant ``price_multiplier``; each multiplication is rounded
  half up to an integer micro-minor unit per kWh. Amount = Wh * price in nano-minor units (exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from pipelines.core.context import RatingContext
from pipelines.core.models import (
    GRID_MS,
    PERIOD_CODES,
    PRICE_SCALE,
    Period,
    Tariff,
    TariffVersion,
    price_units,
)

TIER_INF = 1 << 62
RATED_SCHEMA: dict[str, Any] = {
    "account_id": pl.String, "circuit_id": pl.String, "meter_id": pl.String, "start_ms": pl.Int64,
    "end_ms": pl.Int64, "piece_ms": pl.Int64, "period": pl.String, "tier": pl.Int32,
    "price_u": pl.Int64, "energy_wh": pl.Int64, "amount_n": pl.Int64, "estimated": pl.Boolean,
    "month": pl.Int32,
}


@dataclass(slots=True)
class TierCounter:
    """Cumulative Wh of an account in its current billing month (``yyyymm``, local)."""

    month: int = 0
    wh: int = 0


def _units(d: Decimal) -> int:
    return int((d * PRICE_SCALE).to_integral_value(ROUND_HALF_UP))


def _ratio(d: Decimal) -> tuple[int, int]:
    return d.as_integer_ratio()


def version_rows(tariff: Tariff) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(versions, schedule, tiers) rows for one tariff's lookup frames."""
    versions, sched, tiers = [], [], []
    for vi, v in enumerate(tariff.versions):
        mask = sum(1 << d for d in v.weekend_days)
        versions.append((tariff.id, vi, v.effective_from_ms, mask))
        prices = {p: price_units(x) for p, x in v.prices.items()}
        for daytype, seasons in ((0, v.weekday), (1, v.weekend if v.weekend is not None else v.weekday)):
            for month in range(1, 13):
                codes = next((s.hours for s in seasons if month in s.months), None)
                for hour in range(24):
                    period = PERIOD_CODES[codes[hour]] if codes else next(iter(v.prices))
                    price = prices[period]
                    for cp in v.critical_peak:
                        if month in cp.months and hour in cp.hours and (daytype == 0 or cp.weekends):
                            period = Period.SHARP
                            price = _units(v.prices[Period.PEAK] * (100 + cp.uplift_pct) / 100)
                    sched.append((tariff.id, vi, daytype, month, hour, period.value, price))
        blocks = v.tiers or []
        lo = 0
        if not blocks:
            tiers.append((tariff.id, vi, 0, 0, TIER_INF, 1, 1, 0))
        for ti, b in enumerate(blocks):
            hi = TIER_INF if b.upto_kwh is None else int(b.upto_kwh * 1000)
            num, den = _ratio(b.multiplier)
            tiers.append((tariff.id, vi, ti, lo, hi, num, den, _units(b.adder)))
            lo = hi
    return versions, sched, tiers


class PriceTables:
    """Lookup frames for all tariffs of a context (built once, cached on the context)."""

    def __init__(self, tariffs: dict[str, Tariff]) -> None:
        v, s, t = [], [], []
        for tariff in tariffs.values():
            a, b, c = version_rows(tariff)
            v += a
            s += b
            t += c
        self.versions = pl.DataFrame(v, orient="row", schema={
            "tariff_id": pl.String, "version": pl.Int32, "eff_ms": pl.Int64, "wk_mask": pl.Int64}).sort("eff_ms")
        self.schedule = pl.DataFrame(s, orient="row", schema={
            "tariff_id": pl.String, "version": pl.Int32, "daytype": pl.Int8, "month": pl.Int8,
            "hour": pl.Int8, "period": pl.String, "price_u": pl.Int64})
        self.tiers = pl.DataFrame(t, orient="row", schema={
            "tariff_id": pl.String, "version": pl.Int32, "tier": pl.Int32, "lo": pl.Int64, "hi": pl.Int64,
            "t_num": pl.Int64, "t_den": pl.Int64, "adder_u": pl.Int64})


def tables(ctx: RatingContext) -> PriceTables:
    if "legacy_price_tables" not in ctx.extra:
        ctx.extra["legacy_price_tables"] = PriceTables(ctx.tariffs)
    return ctx.extra["legacy_price_tables"]


def _holidays(ctx: RatingContext) -> pl.DataFrame:
    rows = [(m.mall_id, date.fromisoformat(d)) for m in ctx.malls.values() for d in m.holidays]
    return pl.DataFrame(rows, orient="row", schema={"mall_id": pl.String, "ldate": pl.Date}) \
        .with_columns(hol=pl.lit(True))


def _mul_round(x: pl.Expr, num: pl.Expr, den: pl.Expr) -> pl.Expr:
    """round_half_up(x * num / den) for non-negative x; den > 0."""
    return (x * num * 2 + den) // (den * 2)


def split_pieces(intervals: pl.DataFrame) -> pl.DataFrame:
    """Cut intervals on the UTC 15-minute grid with time-proportional integer energy shares."""
    q = GRID_MS
    df = intervals.filter(pl.col("energy_wh") > 0).with_row_index("iid").with_columns(
        k=pl.int_ranges(pl.col("start_ms") // q, (pl.col("end_ms") - 1) // q + 1)).explode("k")
    df = df.with_columns(
        piece_ms=pl.max_horizontal(pl.col("start_ms"), pl.col("k") * q),
        piece_end=pl.min_horizontal(pl.col("end_ms"), (pl.col("k") + 1) * q),
    ).with_columns(cum=(pl.col("piece_end") - pl.col("start_ms")))
    e_cum = (pl.col("energy_wh").cast(pl.Int128) * pl.col("cum")) // (pl.col("end_ms") - pl.col("start_ms"))
    # Rows of one interval are contiguous after explode, so a masked shift replaces a window.
    same = pl.col("iid") == pl.col("iid").shift(1)
    return df.with_columns(e_cum=e_cum).with_columns(
        piece_wh=(pl.col("e_cum") - pl.when(same).then(pl.col("e_cum").shift(1)).otherwise(0)).cast(pl.Int64)
    ).drop("k", "cum", "e_cum", "piece_end")


def rate(
    intervals: pl.DataFrame, ctx: RatingContext, counters: dict[str, TierCounter],
) -> tuple[pl.DataFrame, dict[str, TierCounter]]:
    """Price intervals (INTERVAL_SCHEMA plus ``account_id``) into RATED_SCHEMA rows.

    ``counters`` (per account tier state) is not mutated; the updated copy is returned. Raises
    ValueError for a piece before its tariff's first version (a configuration error).
    """
    tb = tables(ctx)
    out = dict(counters)
    if intervals.is_empty():
        return pl.DataFrame(schema=RATED_SCHEMA), out
    df = split_pieces(intervals).join(ctx.account_frame, on="account_id", how="left")
    if df.is_empty():
        return pl.DataFrame(schema=RATED_SCHEMA), out
    parts = []
    for (tz,), part in df.group_by(["tz"], maintain_order=True):
        local = pl.from_epoch(pl.col("piece_ms"), time_unit="ms").dt.replace_time_zone("UTC") \
            .dt.convert_time_zone(str(tz))
        parts.append(part.with_columns(
            month=local.dt.month().cast(pl.Int8), hour=local.dt.hour().cast(pl.Int8),
            wday=(local.dt.weekday() - 1).cast(pl.Int64), ldate=local.dt.date(),
            yyyymm=(local.dt.year() * 100 + local.dt.month()).cast(pl.Int32)))
    df = pl.concat(parts).sort("piece_ms")
    df = df.join_asof(tb.versions, left_on="piece_ms", right_on="eff_ms", by="tariff_id",
                      strategy="backward", check_sortedness=False)
    if df["version"].null_count():
        bad = df.filter(pl.col("version").is_null()).row(0, named=True)
        raise ValueError(f"account {bad['account_id']}: no version of tariff {bad['tariff_id']} "
                         f"in force at {bad['piece_ms']} ms")
    df = df.join(_holidays(ctx), on=["mall_id", "ldate"], how="left").with_columns(
        daytype=(pl.col("hol").fill_null(False) | ((pl.col("wk_mask") // pl.lit(2, pl.Int64).pow(pl.col("wday")) % 2) == 1))
        .cast(pl.Int8))
    df = df.join(tb.schedule, on=["tariff_id", "version", "daytype", "month", "hour"], how="left")

    # Tiers: cumulative Wh per account and local month, continuing from the counters.
    df = df.sort(["account_id", "piece_ms", "circuit_id"])
    accts = df["account_id"].unique().to_list()
    base = pl.DataFrame({
        "account_id": accts,
        "c_month": [counters.get(a, TierCounter()).month for a in accts],
        "c_wh": [counters.get(a, TierCounter()).wh for a in accts],
    }, schema={"account_id": pl.String, "c_month": pl.Int32, "c_wh": pl.Int64})
    df = df.join(base, on="account_id", how="left").with_columns(
        after=pl.col("piece_wh").cum_sum().over(["account_id", "yyyymm"])
        + pl.when(pl.col("yyyymm") == pl.col("c_month")).then(pl.col("c_wh")).otherwise(0))
    df = df.with_columns(before=pl.col("after") - pl.col("piece_wh"))
    last = df.group_by("account_id").agg(pl.col("yyyymm").last(), pl.col("after").last())
    for a, m, wh in last.iter_rows():
        out[a] = TierCounter(m, wh)

    df = df.join(tb.tiers, on=["tariff_id", "version"], how="left").with_columns(
        energy_wh=pl.col("after").clip(pl.col("lo"), pl.col("hi")) - pl.col("before").clip(pl.col("lo"), pl.col("hi")),
    ).filter(pl.col("energy_wh") > 0)
    price = _mul_round(_mul_round(pl.col("price_u"), pl.col("t_num"), pl.col("t_den")) + pl.col("adder_u"),
                       pl.col("m_num"), pl.col("m_den"))
    df = df.with_columns(price_u=price).with_columns(amount_n=pl.col("energy_wh") * pl.col("price_u"),
                                                     month=pl.col("yyyymm"))
    return df.select(list(RATED_SCHEMA)).cast(RATED_SCHEMA).sort(
        ["account_id", "end_ms", "circuit_id", "piece_ms", "tier"]), out


def version_at(tariff: Tariff, ts_ms: int) -> TariffVersion | None:
    cur = None
    for v in tariff.versions:
        if v.effective_from_ms <= ts_ms:
            cur = v
    return cur


def local_day_start_ms(day: date, tz: str) -> int:
    """Start of a local calendar day in epoch ms (DST-safe)."""
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def max_demand_kw(rated: pl.DataFrame) -> pl.DataFrame:
    """Highest 15-minute average kW per account and local month from rated pieces.

    Each piece lies in one 15-minute slot; average kW = slot Wh * 4 / 1000. Returns
    (account_id, month, slot_ms, max_kw as exact Decimal string). Callers that see a month in
    several batches keep the per-slot Wh sums and call this on the union.
    """
    slots = rated.group_by(["account_id", "month", (pl.col("piece_ms") // GRID_MS * GRID_MS).alias("slot_ms")]) \
        .agg(pl.col("energy_wh").sum())
    best = slots.sort(["energy_wh", "slot_ms"], descending=[True, False]).group_by(
        ["account_id", "month"], maintain_order=True).first()
    return best.with_columns(
        max_kw=pl.col("energy_wh").map_elements(lambda wh: str(Decimal(wh) * 4 / 1000), return_dtype=pl.String)
    ).select("account_id", "month", "slot_ms", "max_kw").sort(["account_id", "month"])
