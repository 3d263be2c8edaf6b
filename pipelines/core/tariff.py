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
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from pipelines.core import cols
from pipelines.core.cols import take
from pipelines.core.context import RatingContext
from pipelines.core.interval import lex_sorted
from pipelines.core.lookup import CELLS, PERIOD_NAMES, VERSION_SHIFT, Lookup, lookup
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
#: Pieces per interval at most: 35 days of 15-minute slots. Longer intervals (always flagged
#: estimated) are cut into this many pieces of several slots each (`_long_pieces`).
MAX_PIECES = 35 * 96
_PHI_DEN = 1 << 20
_PHI_NUM = 648_056  # round((sqrt(5) - 1) / 2 * 2**20): frac(j * golden ratio), in integers
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


@dataclass
class TierArrays:
    """Tier counters as columns: ``month`` (yyyymm, 0 = none) and ``wh`` of the accounts ``acc``
    (ranks). As an input to `rate_arrays`, ``acc`` is None and the columns are indexed by rank."""

    month: np.ndarray
    wh: np.ndarray
    acc: np.ndarray | None = None

    @classmethod
    def dense(cls, lk: Lookup, acc: np.ndarray, month: np.ndarray, wh: np.ndarray) -> TierArrays:
        """Input counters: the given accounts' values, zero elsewhere."""
        n = len(lk.account_ids)
        m, w = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        m[acc], w[acc] = month, wh
        return cls(m, w)


@dataclass
class Rated:
    """`rate` output plus per-row arrays the engine reuses (aligned with ``frame`` rows)."""

    frame: pl.DataFrame  # RATED_SCHEMA
    tiers: TierArrays  # new counters of the accounts with rated rows (``acc`` sorted)
    aidx: np.ndarray  # account rank (Lookup.account_ids)
    end_day: np.ndarray  # local date of end_ms, days since 1970-01-01
    end_ms: np.ndarray
    amount_n: np.ndarray
    src: np.ndarray  # interval row (of the non-zero intervals) each rated row comes from
    cidx: np.ndarray  # circuit rank
    period: np.ndarray  # index into lookup.PERIOD_NAMES
    tier: np.ndarray
    price_u: np.ndarray


def _mul_round(x: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """round_half_up(x * num / den) for non-negative x; den > 0."""
    return (x * num * 2 + den) // (den * 2)


def rate(
    intervals: pl.DataFrame, ctx: RatingContext, counters: dict[str, TierCounter],
) -> tuple[pl.DataFrame, dict[str, TierCounter]]:
    """Price intervals (INTERVAL_SCHEMA plus ``account_id``) into RATED_SCHEMA rows.

    ``counters`` (per account tier state) is not mutated; the updated copy is returned. Raises
    ValueError for a piece before its tariff's first version (a configuration error).
    """
    lk = lookup(ctx)
    out = dict(counters)
    if intervals.is_empty():
        return cols.empty(RATED_SCHEMA), out
    aidx = intervals["account_id"].cast(pl.Enum(lk.account_ids)).to_physical().to_numpy().astype(np.int64)
    cidx = intervals["circuit_id"].cast(lk.circuit_enum).to_physical().to_numpy().astype(np.int64)
    known = [(lk.account_rank[a], c) for a, c in counters.items() if a in lk.account_rank]
    prev = TierArrays.dense(lk, np.array([x for x, _ in known], dtype=np.int64),
                            np.array([c.month for _, c in known], dtype=np.int64),
                            np.array([c.wh for _, c in known], dtype=np.int64))
    r = rate_arrays(intervals, aidx, cidx, ctx, prev)
    assert r.tiers.acc is not None
    for x, m, wh in zip(r.tiers.acc.tolist(), r.tiers.month.tolist(), r.tiers.wh.tolist(), strict=True):
        out[lk.account_ids[x]] = TierCounter(m, wh)
    return r.frame, out


def rate_arrays(
    iv: pl.DataFrame, aidx: np.ndarray, cidx: np.ndarray, ctx: RatingContext, tiers_in: TierArrays,
) -> Rated:
    """`rate` on intervals whose account and circuit ranks (see `lookup`) are already known;
    ``tiers_in``: the tier counters by account rank (`TierArrays.dense`)."""
    lk = lookup(ctx)
    e_all = iv["energy_wh"].to_numpy()
    pos = np.flatnonzero(e_all > 0)
    if pos.size == 0:
        return _empty_rated()
    start, end = iv["start_ms"].to_numpy()[pos], iv["end_ms"].to_numpy()[pos]
    energy = e_all[pos]
    # Pieces on the UTC grid; each interval's pieces are contiguous, in time order.
    k0 = start // GRID_MS
    n_s = (end - 1) // GRID_MS - k0 + 1  # slots each interval touches
    n_p = np.minimum(n_s, MAX_PIECES)  # memory is O(intervals), never O(gap): see _long_pieces
    if (n_p == 1).all():
        rep = np.arange(pos.size)
        piece_ms, piece_wh = start, energy
    else:
        rep = np.repeat(np.arange(pos.size), n_p)
        offs = np.cumsum(n_p) - n_p
        k = k0[rep] + np.arange(rep.size) - offs[rep]
        k_end = k + 1  # a piece covers slots [k, k_end) of its interval
        if (n_s > MAX_PIECES).any():
            k, k_end = _long_pieces(k, k_end, k0[rep], n_s[rep], n_p[rep], np.arange(rep.size) - offs[rep])
        s_r, e_r = start[rep], end[rep]
        piece_ms = np.maximum(s_r, k * GRID_MS)
        cum, span = np.minimum(e_r, k_end * GRID_MS) - s_r, e_r - s_r
        if int(energy.max()) * int(span.max()) < 1 << 62:
            e_cum = energy[rep] * cum // span
        else:  # huge gap x huge energy: exact in 128 bits
            e_cum = (pl.Series(energy[rep]).cast(pl.Int128) * pl.Series(cum) // pl.Series(span)) \
                .cast(pl.Int64).to_numpy()
        prev = np.concatenate([[0], e_cum[:-1]])
        prev[offs] = 0
        piece_wh = e_cum - prev
    a, c, end_p = aidx[pos][rep], cidx[pos][rep], end[rep]
    src = pos[rep]  # interval row of each piece
    month, hour, wday, day, yyyymm, end_day = _local_fields(lk, a, piece_ms, end_p)

    t = lk.acc_tariff[a]
    gv = np.searchsorted(lk.eff_key, (t << VERSION_SHIFT) + piece_ms, side="right") - 1
    bad = gv < lk.first_version[t]
    if bad.any():
        i = np.flatnonzero(bad)[np.argmin(piece_ms[bad])]
        raise ValueError(f"account {lk.account_ids[a[i]]}: no version of tariff {lk.tariff_ids[t[i]]} "
                         f"in force at {piece_ms[i]} ms")
    mall = lk.acc_mall[a]
    daytype = (lk.wk_mask[gv] >> wday) & 1
    if lk.holidays.size:
        key = (mall << 32) + day
        at = np.minimum(np.searchsorted(lk.holidays, key), lk.holidays.size - 1)
        daytype |= (lk.holidays[at] == key).astype(np.int64)  # np.isin, without sorting the rows
    cell = gv * CELLS + daytype * 288 + (month - 1) * 24 + hour
    period, base = lk.period[cell], lk.price[cell]
    m_num, m_den = lk.acc_m_num[a], lk.acc_m_den[a]

    if not lk.tiered[gv].any():
        sel = np.flatnonzero(piece_wh > 0)
        tier = np.zeros(sel.size, dtype=np.int64)
        e_sel = piece_wh[sel]
        price = _mul_round(base[sel], m_num[sel], m_den[sel])
        tiers = _count_untiered(lk, tiers_in, a, yyyymm, piece_wh)
    else:
        sel, tier, e_sel, price, tiers = _tiered(lk, tiers_in, a, c, piece_ms, yyyymm, piece_wh, gv, base, m_num, m_den)
    amount = e_sel * price
    keys = (a[sel], end_p[sel], c[sel], piece_ms[sel], tier)
    order = None if lex_sorted(keys) else np.lexsort(keys[::-1])
    if order is not None:
        sel, tier, e_sel, price, amount = sel[order], tier[order], e_sel[order], price[order], amount[order]
    a_s = a[sel]
    rows = src[sel]
    frame = cols.frame(RATED_SCHEMA, {
        "account_id": take(lk.account_series, a_s, lk.account_ids), "circuit_id": take(iv["circuit_id"], rows),
        "meter_id": take(iv["meter_id"], rows), "start_ms": start[rep][sel], "end_ms": end_p[sel],
        "piece_ms": piece_ms[sel], "period": take(lk.period_names, period[sel], PERIOD_NAMES),
        "tier": tier.astype(np.int32), "price_u": price, "energy_wh": e_sel, "amount_n": amount,
        "estimated": iv["estimated"].to_numpy()[rows], "month": yyyymm[sel].astype(np.int32),
    })
    return Rated(frame, tiers, a_s, end_day[sel], end_p[sel], amount, src[sel], c[sel], period[sel], tier, price)


def _long_pieces(k: np.ndarray, k_end: np.ndarray, k0: np.ndarray, n_s: np.ndarray, n_p: np.ndarray,
                 j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of intervals spanning more than MAX_PIECES slots (a meter silent for weeks, a
    clock jump): piece ``j`` of ``n_p`` covers slots ``[j*n_s//n_p, (j+1)*n_s//n_p)`` of the
    interval (so the energy still adds up exactly, in proportion to time) and is labelled, for
    its period, day, month and tariff version, with one slot inside that span. The label slot
    sits at the fraction ``frac(j * golden ratio)`` of the span: a piece length that is a
    multiple of a day or a week would put a fixed offset on the same hour every time (an
    all-peak or all-valley bill); this sequence spreads the labels evenly over the hours of
    the day and the days of the week whatever the length. Shorter intervals keep one piece per
    slot (returned unchanged)."""
    long = n_s > MAX_PIECES
    lo, hi = j * n_s // n_p, (j + 1) * n_s // n_p
    at = lo + ((j * _PHI_NUM) % _PHI_DEN) * (hi - lo) // _PHI_DEN
    return np.where(long, k0 + at, k), np.where(long, k0 + hi, k_end)


def _empty_rated() -> Rated:
    z = np.zeros(0, dtype=np.int64)
    return Rated(cols.empty(RATED_SCHEMA), TierArrays(z, z, z), z, z, z, z, z, z, z, z, z)


def _local_fields(lk: Lookup, a: np.ndarray, piece_ms: np.ndarray, end_ms: np.ndarray
                  ) -> tuple[np.ndarray, ...]:
    """Local month, hour, weekday, day of each piece and local day of its interval end."""
    tz_of_row = lk.mall_zone[lk.acc_mall[a]]  # by zone, not by mall: the fields depend on the zone only
    zones = tz_of_row[:1] if (tz_of_row == tz_of_row[0]).all() else np.unique(tz_of_row)
    res = [np.empty(a.size, dtype=np.int64) for _ in range(6)]
    for zone in zones.tolist():
        m = slice(None) if zones.size == 1 else tz_of_row == zone
        p, e = piece_ms[m], end_ms[m]
        z = lk.zone_mall[zone]
        tz = lk.mall_tz[z]
        lo, hi = int(p.min()), int(e.max())
        # a span far wider than the rows (a long gap) is converted row by row, not slot by slot
        wide = (hi - lo) // GRID_MS > max(4 * p.size, MAX_PIECES)
        f = None if wide else lk.slot_fields(z, lo, hi)
        if f is not None:
            i, j = f.index(p), f.index(e)
            vals = (f.month[i], f.hour[i], f.wday[i], f.day[i], f.yyyymm[i], f.day[j])
        else:
            vals = _convert_rows(tz, p, e)
        for r, v in zip(res, vals, strict=True):
            r[m] = v
    return tuple(res)


def _convert_rows(tz: str, p: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, ...]:
    """Row-by-row conversion for zones whose offset is not constant per 15-minute slot."""
    def local(col: str) -> pl.Expr:
        return pl.from_epoch(col, time_unit="ms").dt.replace_time_zone("UTC").dt.convert_time_zone(tz)

    days = pl.col("d").dt.date().cast(pl.Int32).cast(pl.Int64)
    df = pl.DataFrame({"p": p, "e": e}).select(d=local("p"), de=local("e")).select(
        month=pl.col("d").dt.month(), hour=pl.col("d").dt.hour(), wday=pl.col("d").dt.weekday() - 1,
        day=days, yyyymm=pl.col("d").dt.year() * 100 + pl.col("d").dt.month(),
        end_day=pl.col("de").dt.date().cast(pl.Int32).cast(pl.Int64))
    return tuple(df[c].to_numpy().astype(np.int64) for c in df.columns)


def _count_untiered(lk: Lookup, prev: TierArrays, a: np.ndarray, yyyymm: np.ndarray, piece_wh: np.ndarray
                    ) -> TierArrays:
    """Tier counters without blocks: each account's Wh in the month of its latest piece."""
    na = len(lk.account_ids)
    ua = np.flatnonzero(np.bincount(a, minlength=na))  # accounts present, by rank (no sort)
    if (yyyymm == yyyymm[0]).all():  # one month in the batch (the common case)
        last = np.full(ua.size, yyyymm[0], dtype=np.int64)
        w = piece_wh
    else:
        full = np.zeros(na, dtype=np.int64)
        np.maximum.at(full, a, yyyymm)
        last, w = full[ua], np.where(yyyymm == full[a], piece_wh, 0)
    # exact: float64 sums of integer Wh below 2**53
    wh = np.bincount(a, weights=w, minlength=na)[ua].astype(np.int64)
    return TierArrays(last, wh + np.where(prev.month[ua] == last, prev.wh[ua], 0), ua)


def _tiered(lk: Lookup, prev: TierArrays, a: np.ndarray, c: np.ndarray, piece_ms: np.ndarray, yyyymm: np.ndarray,
            piece_wh: np.ndarray, gv: np.ndarray, base: np.ndarray, m_num: np.ndarray, m_den: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, TierArrays]:
    """Tiers: cumulative Wh per account and local month in (account, piece_ms, circuit) order,
    continuing from the counters; a piece crossing a block boundary is split there. Returns
    (piece row, tier, Wh, price) per (piece, block) with energy, and the new counters."""
    o = np.arange(a.size) if lex_sorted((a, piece_ms, c)) else np.lexsort((c, piece_ms, a))
    a_s, ym, wh = a[o], yyyymm[o], piece_wh[o]
    # an account's months only grow with piece_ms, so each (account, month) is one run of rows
    head = np.flatnonzero(np.concatenate(([True], (a_s[1:] != a_s[:-1]) | (ym[1:] != ym[:-1]))))
    run = np.repeat(np.arange(head.size), np.diff(np.append(head, a_s.size)))
    cs = np.cumsum(wh)
    after = cs - (cs[head] - wh[head])[run] + np.where(ym == prev.month[a_s], prev.wh[a_s], 0)
    before = after - wh
    last = np.flatnonzero(np.append(a_s[1:] != a_s[:-1], True))
    tiers = TierArrays(ym[last], after[last], a_s[last])
    g = gv[o]
    nb = lk.tier_first[g + 1] - lk.tier_first[g]  # blocks of each piece's version
    rep = np.repeat(np.arange(a_s.size), nb)
    ti = np.arange(rep.size) - np.repeat(np.cumsum(nb) - nb, nb)
    blk = lk.tier_first[g][rep] + ti
    lo, hi = lk.tier_lo[blk], lk.tier_hi[blk]
    energy = np.clip(after[rep], lo, hi) - np.clip(before[rep], lo, hi)
    keep = np.flatnonzero(energy > 0)
    sel, blk = o[rep[keep]], blk[keep]
    price = _mul_round(_mul_round(base[sel], lk.tier_num[blk], lk.tier_den[blk]) + lk.tier_add[blk],
                       m_num[sel], m_den[sel])
    return sel, ti[keep], energy[keep], price, tiers


def version_at(tariff: Tariff, ts_ms: int) -> TariffVersion | None:
    cur = None
    for v in tariff.versions:
        if v.effective_from_ms <= ts_ms:
            cur = v
    return cur


@lru_cache(maxsize=65_536)
def local_day_start_ms(day: date, tz: str) -> int:
    """Start of a local calendar day in epoch ms (DST-safe). Cached: the per-event wallet asks
    for the same few days once per charge (a zone conversion each, ~6 us)."""
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
