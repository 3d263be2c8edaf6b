"""Integer lookup arrays derived from a RatingContext (built once, reused across batches).

Ids become ranks in sorted order (so sorting by rank sorts by id), and per-tariff schedules
become one flat price table indexed by integer arithmetic instead of joins:
``(global version * 2 + daytype) * 288 + (month - 1) * 24 + hour``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import polars as pl

from pipelines.core.cols import as_list, chunked
from pipelines.core.context import RatingContext
from pipelines.core.interval import CircuitIndex
from pipelines.core.localtime import EPOCH_ORDINAL, SlotFields, slot_fields
from pipelines.core.models import GRID_MS, Period

PERIOD_NAMES = [p.value for p in Period]
VERSION_SHIFT = 43  # epoch ms < 2**43 until the year 2248
CELLS = 2 * 12 * 24  # (daytype, month, hour) cells of one version
DAY_MS = 86_400_000


@dataclass
class Tiers:
    """Blocks of one global version: (lo_wh, hi_wh, t_num, t_den, adder_u) rows."""

    rows: list[tuple[int, int, int, int, int]]


class Lookup:
    def __init__(self, ctx: RatingContext) -> None:
        from pipelines.core.tariff import version_rows  # tariff imports this module

        af = ctx.account_frame.sort("account_id")
        self.frames = (ctx.account_frame, ctx.circuit_frame)  # identity marks a stale Lookup
        self.account_ids: list[str] = as_list(af["account_id"])
        self.account_series = chunked("account_id", self.account_ids, pl.String)
        rank = self.account_rank = {a: i for i, a in enumerate(self.account_ids)}
        self.tariff_ids = sorted(ctx.tariffs)
        self.mall_ids = sorted(ctx.malls)
        t_of = {t: i for i, t in enumerate(self.tariff_ids)}
        m_of = {m: i for i, m in enumerate(self.mall_ids)}
        self.acc_tariff = np.array([t_of[t] for t in af["tariff_id"]], dtype=np.int64)
        self.acc_mall = np.array([m_of[m] for m in af["mall_id"]], dtype=np.int64)
        self.acc_m_num = af["m_num"].to_numpy().astype(np.int64)
        self.acc_m_den = af["m_den"].to_numpy().astype(np.int64)
        self.acc_mall_id = as_list(af["mall_id"])
        self.mall_series = chunked("mall_id", self.acc_mall_id, pl.String)
        self.mall_tz = [ctx.malls[m].tz for m in self.mall_ids]
        # malls by zone (local fields depend on the zone only; many malls share one)
        zones = sorted(set(self.mall_tz))
        self.mall_zone = np.array([zones.index(z) for z in self.mall_tz], dtype=np.int64)
        self.zone_mall = [self.mall_tz.index(z) for z in zones]  # a mall of each zone
        self.holidays = np.array(sorted(
            (i << 32) + date.fromisoformat(d).toordinal() - EPOCH_ORDINAL
            for i, m in enumerate(self.mall_ids) for d in ctx.malls[m].holidays), dtype=np.int64)

        self.cindex = CircuitIndex(ctx.circuits)
        self.circuit_ids = self.cindex.ids
        self.circ_acc = np.array([rank[ctx.circuits[c].account_id] for c in self.circuit_ids], dtype=np.int64)
        self.charge_prefix = [f"{ctx.circuits[c].account_id}:chg:{c}:" for c in self.circuit_ids]  # entry ids
        self.charge_prefix_series = chunked("p", self.charge_prefix, pl.String)

        # Global versions: all tariffs' versions in (tariff, effective_from) order.
        eff: list[int] = []
        self.first_version = np.zeros(len(self.tariff_ids) + 1, dtype=np.int64)
        wk: list[int] = []
        tiers: list[Tiers] = []
        periods, prices = [], []
        for ti, tid in enumerate(self.tariff_ids):
            versions, sched, tier_rows = version_rows(ctx.tariffs[tid])
            self.first_version[ti] = len(eff)
            per = np.zeros((len(versions), CELLS), dtype=np.int64)
            pri = np.zeros((len(versions), CELLS), dtype=np.int64)
            for _, vi, daytype, month, hour, period, price in sched:
                cell = daytype * 288 + (month - 1) * 24 + hour
                per[vi, cell], pri[vi, cell] = PERIOD_NAMES.index(period), price
            for _, vi, eff_ms, mask in versions:
                eff.append((ti << VERSION_SHIFT) + eff_ms)
                wk.append(mask)
                tiers.append(Tiers([r[3:] for r in tier_rows if r[1] == vi]))
            periods.append(per.ravel())
            prices.append(pri.ravel())
        self.first_version[-1] = len(eff)
        self.eff_key = np.array(eff, dtype=np.int64)
        self.wk_mask = np.array(wk, dtype=np.int64)
        self.tiers = tiers
        # the same blocks flat: version g has rows tier_first[g]:tier_first[g + 1]
        flat = [r for t in tiers for r in t.rows]
        self.tier_first = np.cumsum([0] + [len(t.rows) for t in tiers]).astype(np.int64)
        self.tier_lo, self.tier_hi, self.tier_num, self.tier_den, self.tier_add = (
            np.array([r[k] for r in flat], dtype=np.int64) for k in range(5))
        self.tiered = np.array([len(t.rows) > 1 or t.rows[0][2:] != (1, 1, 0) for t in tiers], dtype=bool)
        self.period = np.concatenate(periods) if periods else np.zeros(0, dtype=np.int64)
        self.price = np.concatenate(prices) if prices else np.zeros(0, dtype=np.int64)
        self.period_names = pl.Series("period", PERIOD_NAMES, dtype=pl.String)
        self._slots: dict[str, SlotFields] = {}
        self.rate_strs: dict[int, str] = {}  # price_u -> ledger "rate" text (see fastpath)
        self.day_fees: dict[tuple[int, int, int], tuple[int, int]] = {}  # (tariff, mall, day) -> (fee, start)
        self.quiet_limit, self.never_fast = _policy_arrays(ctx, self.account_ids)

    @property
    def circuit_enum(self) -> pl.Enum:
        return self.cindex.enum

    def slot_fields(self, mall: int, lo_ms: int, hi_ms: int) -> SlotFields | None:
        """`localtime.slot_fields` of a mall's zone, cached per zone: the stream asks for a few
        slots per call, so a miss converts a window of a day back and five weeks ahead. Fields
        are per slot, so a cached window gives exactly what a fresh conversion would."""
        tz = self.mall_tz[mall]
        hit = self._slots.get(tz)
        first, last = lo_ms // GRID_MS, hi_ms // GRID_MS
        if hit is not None and hit.first <= first and last < hit.first + hit.month.size:
            return hit
        f = slot_fields(tz, lo_ms - DAY_MS, hi_ms + 35 * DAY_MS) if hi_ms - lo_ms <= 2 * DAY_MS else None
        if f is None:
            f = slot_fields(tz, lo_ms, hi_ms)
        if f is not None:
            self._slots[tz] = f
        return f


NO_LIMIT = int(np.iinfo(np.int64).min)


def _policy_arrays(ctx: RatingContext, account_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per account rank: the lowest balance a *quiet* account (no level fired, relay connected,
    nothing deferred or pending) may reach on the vectorised wallet without a rule firing, and
    whether its policy keeps it off that path (debt recovery). See `fastpath.threshold`."""
    limit = np.empty(len(account_ids), dtype=np.int64)
    never = np.zeros(len(account_ids), dtype=bool)
    by_policy: dict[int, tuple[int, bool]] = {}  # policies are shared between accounts
    for i, a in enumerate(account_ids):
        p = ctx.accounts[a].policy
        hit = by_policy.get(id(p))
        if hit is None:
            levels = list(p.alert_levels)
            if p.warning_trip_level is not None:
                levels.append(p.warning_trip_level)
            if not p.protected:
                levels.append(p.cutoff)
            hit = by_policy[id(p)] = (max(levels) if levels else NO_LIMIT, p.debt_recovery is not None)
        limit[i], never[i] = hit
    return limit, never


def lookup(ctx: RatingContext) -> Lookup:
    """The context's Lookup, rebuilt if its account or circuit frame was invalidated."""
    cur: Any = ctx.extra.get("lookup")
    if cur is None or cur.frames[0] is not ctx.account_frame or cur.frames[1] is not ctx.circuit_frame:
        cur = ctx.extra["lookup"] = Lookup(ctx)
    return cur
