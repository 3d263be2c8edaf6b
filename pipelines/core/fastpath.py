"""Charges, and the vectorised wallet for the charges that can fire no rule.

An account is eligible when it has a known standing day, no debt recovery and nothing
deferred. Its charges are posted here up to the first one after which its balance would not
stay above every level that could still fire (armed alert levels, an unfired warning level,
the cutoff unless the account is protected or already tripped for credit; balances only fall
here) and before its first payment of the batch: for those the per-event wallet would only post
entries, and this module posts the same entries with cumulative sums: ``posted = (acc_n +
cumsum(amount_n)) // 10**9`` per account, standing charges inserted before the first charge of
each new local day. The per-event wallet takes the rest of the account's events from there.

Posting order (both paths): an account's charges in (end_ms, entry id) order. Charges sharing
an end_ms (pieces of one interval in several periods or tiers, or several circuits of one
account read at the same instant) only differ in which of them posts a carried sub-unit
residue; the order fixes that, and the account's totals do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from pipelines.core import cols
from pipelines.core.cols import take
from pipelines.core.context import RatingContext
from pipelines.core.localtime import EPOCH_ORDINAL, day_iso
from pipelines.core.lookup import NO_LIMIT, PERIOD_NAMES, Lookup
from pipelines.core.models import AMOUNT_SCALE, PRICE_SCALE
from pipelines.core.tariff import Rated, local_day_start_ms, version_at
from pipelines.core.wallet import AccountState

if TYPE_CHECKING:
    from pipelines.core.accounts import AccountView

CHARGE_KEYS = ["account_id", "circuit_id", "end_ms", "period", "tier", "price_u"]


@dataclass
class Charges:
    """One charge per (interval, period, tier, price). Arrays are in posting order, (account,
    end_ms, entry id); ``frame`` rows are not (``row`` maps a charge to its frame row)."""

    frame: pl.DataFrame  # CHARGE_KEYS + meter_id, start_ms, piece_ms, energy_wh, amount_n, estimated (+ month)
    row: np.ndarray
    aidx: np.ndarray  # account rank
    end_day: np.ndarray  # local date of end_ms (days since 1970-01-01)
    end_ms: np.ndarray
    amount_n: np.ndarray
    cidx: np.ndarray  # circuit rank
    period: np.ndarray  # index into PERIOD_NAMES
    tier: np.ndarray
    price_u: np.ndarray

    def column(self, name: str, sel: np.ndarray | None = None) -> pl.Series:
        """Frame column ``name`` for charges ``sel`` (all if None), in posting order."""
        s = self.frame.get_column(name)
        rows = self.row if sel is None else self.row[sel]
        if rows.size == s.len() and (rows.size == 0 or (rows[0] == 0 and (np.diff(rows) == 1).all())):
            return s
        return take(s, rows)

    def entry_ids(self, sel: np.ndarray, lk: Lookup) -> pl.Series:
        return entry_ids(lk, self.cidx[sel], self.end_ms[sel], self.period[sel], self.tier[sel], self.price_u[sel])


def charges(r: Rated, lk: Lookup) -> Charges:
    rated = r.frame
    if r.src.size > 1 and _mergeable(r):
        # Some interval has several rated rows with the same (period, tier, price): merge them.
        g = cols.hstack(rated, [pl.Series("aidx", r.aidx), pl.Series("end_day", r.end_day),
                                pl.Series("cidx", r.cidx), pl.Series("pcode", r.period)]).group_by(CHARGE_KEYS).agg(
            pl.col("meter_id").first(), pl.col("start_ms").first(), pl.col("piece_ms").min(),
            pl.col("energy_wh").sum(), pl.col("amount_n").sum(), pl.col("estimated").any(),
            pl.col("aidx").first(), pl.col("end_day").first(), pl.col("cidx").first(), pl.col("pcode").first(),
        ).sort(["account_id", "end_ms", "circuit_id", "piece_ms", "tier"])
        arrays = [g[c].to_numpy().astype(np.int64) for c in ("aidx", "end_day", "end_ms", "amount_n", "cidx",
                                                               "pcode", "tier", "price_u")]
        frame = g.drop("aidx", "end_day", "cidx", "pcode")
    else:  # one row per interval (the common case): the rated rows are the charges, in order
        frame = rated  # its extra "month" column is never read
        arrays = [r.aidx, r.end_day, r.end_ms, r.amount_n, r.cidx, r.period, r.tier, r.price_u]
    row = np.arange(frame.height)
    a, end = arrays[0], arrays[2]
    same = (a[1:] == a[:-1]) & (end[1:] == end[:-1])
    if same.any():  # ties on (account, end_ms): entry id order within each tie
        tied = np.zeros(a.size, dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        idx = np.flatnonzero(tied)
        ids = entry_ids(lk, arrays[4][idx], end[idx], arrays[5][idx], arrays[6][idx], arrays[7][idx])
        if idx.size <= cols.SMALL:
            v, ai, ei = ids.to_list(), a[idx].tolist(), end[idx].tolist()
            order = np.array(sorted(range(idx.size), key=lambda j: (ai[j], ei[j], v[j])), dtype=np.int64)
        else:
            order = pl.DataFrame([pl.Series("a", a[idx]), pl.Series("e", end[idx]), ids.alias("id")]) \
                .with_row_index("j").sort(["a", "e", "id"])["j"].to_numpy().astype(np.int64)
        row[idx] = idx[order]
        arrays = [x[row] for x in arrays]
    return Charges(frame, row, *arrays)


def _mergeable(r: Rated) -> bool:
    """Whether two rated rows of one interval share (period, tier, price). Rows of an interval
    are adjacent; when none merge (one piece per interval, tier splits only), the rated rows
    already are the charges in posting order."""
    multi = r.src[1:] == r.src[:-1]
    if not multi.any():
        return False
    i = np.flatnonzero(np.concatenate(([False], multi)) | np.concatenate((multi, [False])))
    key = np.stack([r.src[i], r.period[i], r.tier[i], r.price_u[i]], axis=1)
    return bool(np.unique(key, axis=0).shape[0] < i.size)


def entry_ids(lk: Lookup, cidx: np.ndarray, end_ms: np.ndarray, period: np.ndarray, tier: np.ndarray,
              price: np.ndarray, combos: Combos | None = None) -> pl.Series:
    """``A:chg:<circuit>:<end_ms>:<period>:<tier>:<price>`` per charge. (period, tier, price) is
    unique within an interval; price only differs on a version change."""
    pre = lk.charge_prefix
    if cidx.size <= cols.SMALL:
        return cols.series("entry_id", [
            f"{pre[c]}{e}:{PERIOD_NAMES[p]}:{t}:{u}"
            for c, e, p, t, u in zip(cidx.tolist(), end_ms.tolist(), period.tolist(), tier.tolist(), price.tolist(),
                                     strict=True)], pl.String)
    # few distinct (period, tier, price) and reading times: format each once, concatenate columns
    cb = combos or Combos.of(period, tier, price)
    suffix = pl.Series("s", [f":{PERIOD_NAMES[p]}:{t}:{u}" for p, t, u in
                             zip(cb.period.tolist(), cb.tier.tolist(), cb.price.tolist(), strict=True)], dtype=pl.String)
    times, tinv = cols.codes(end_ms)
    stamp = take(pl.Series("e", [str(t) for t in times.tolist()], dtype=pl.String), tinv)
    parts = [take(lk.charge_prefix_series, cidx).alias("p"), stamp, take(suffix, cb.inv)]
    return pl.DataFrame(parts).select(entry_id=pl.concat_str("p", "e", "s")).to_series()


@dataclass
class Combos:
    """Distinct (period, tier, price) of some charges, and each charge's combination."""

    period: np.ndarray
    tier: np.ndarray
    price: np.ndarray
    inv: np.ndarray

    @classmethod
    def of(cls, period: np.ndarray, tier: np.ndarray, price: np.ndarray) -> Combos:
        nt, npd = (int(tier.max()) + 1 if tier.size else 1), len(PERIOD_NAMES)
        if price.size and int(price.min()) >= 0 and int(price.max()) < (1 << 62) // (nt * npd):
            uniq, inv = cols.codes((price * nt + tier) * npd + period)
            return cls(uniq % npd, uniq // npd % nt, uniq // npd // nt, inv)
        prices, pcode = cols.codes(price)
        uniq, inv = cols.codes((pcode * nt + tier) * npd + period)
        return cls(uniq % npd, uniq // npd % nt, prices[uniq // npd // nt], inv)


def threshold(s: AccountState, ctx: RatingContext) -> int | None:
    """Lowest balance a fast-path account may reach without any rule firing (None: not eligible).

    Charges only lower the balance, so what can fire is an armed alert level, an unfired
    warning level and the cutoff; the cutoff cannot fire for protected accounts or for an
    account already tripped for credit (`Wallet._check_trip` returns before any change)."""
    p = ctx.accounts[s.account_id].policy
    if s.standing_day is None or s.deferred or s.warn_pending or p.debt_recovery is not None:
        return None
    if s.relay == "tripped" and s.trip_reason not in ("credit", "warning"):
        return None
    levels = [lv for lv in p.alert_levels if lv not in s.fired_levels]
    if p.warning_trip_level is not None and not s.warning_fired:
        levels.append(p.warning_trip_level)
    if not p.protected and not (s.relay == "tripped" and s.trip_reason == "credit"):
        levels.append(p.cutoff)
    return max(levels) if levels else NO_LIMIT


@dataclass
class Fast:
    """What the vectorised wallet posted: per account (row of the `AccountView`) the new balance,
    residue and standing day (days since 1970-01-01, -1: unchanged); the ledger in (account_id,
    ts_ms) order and the account rank of each ledger row. ``part_*``: the accounts whose charges
    it posted only up to a point (a rule fires, or a payment arrives, after it), with their
    balance, residue and standing day at that point; ``pre`` marks the charges it posted (the
    others are the per-event wallet's)."""

    rows: np.ndarray
    balance: np.ndarray
    acc_n: np.ndarray
    new_day: np.ndarray
    ledger: pl.DataFrame | None
    rank: np.ndarray
    part_rows: np.ndarray
    part_balance: np.ndarray
    part_acc_n: np.ndarray
    part_new_day: np.ndarray
    pre: np.ndarray


NO_PAYMENT = np.iinfo(np.int64).max


def fast_path(ch: Charges, view: AccountView, pay_first: np.ndarray, ctx: RatingContext, lk: Lookup,
              schema: dict[str, Any]) -> Fast:
    """Post the charges of every eligible account up to the first one after which a rule could
    fire or before which a payment of the batch arrives (``pay_first``: per view row, the time
    of its first payment, `NO_PAYMENT` if none). Events are applied in (ts, payments first)
    order and charges only lower the balance, so the charges before both points are exactly
    what the per-event wallet would post first, firing nothing; it takes over from there."""
    a, end = ch.aidx, ch.end_ms
    n = a.size
    starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    ends = np.append(starts[1:], n)
    seg = np.repeat(np.arange(starts.size), ends - starts)
    seg_rank = a[starts]
    vr = view.row[seg_rank]
    eligible, limit_v = view.limits(ctx, lk)
    ok = eligible[vr]
    acc0 = np.where(ok, view.acc_n[vr], 0)
    bal0 = np.where(ok, view.balance[vr], 0)
    limit = np.where(ok, limit_v[vr], np.iinfo(np.int64).max)  # balance must stay above this
    sd, last = view.standing_day[vr], ch.end_day[ends - 1]
    new_day = np.where(ok & (last > sd), last, -1)
    st = _standing_rows(np.flatnonzero(new_day >= 0), seg_rank, sd, last, ctx, lk)

    fee_add = np.zeros(n, dtype=np.int64)
    st_pos = np.zeros(0, dtype=np.int64)
    if st.seg.size:  # each goes before the account's first charge ending at or after its day start
        seg_key = (seg << 43) + end  # sorted: rows are in (account, end_ms) order
        st_pos = np.searchsorted(seg_key, (st.seg << 43) + st.ts)
        np.add.at(fee_add, st_pos, st.fee)
    cs = np.cumsum(ch.amount_n)  # may wrap on huge batches; per-account differences stay exact
    within = cs - (cs[starts] - ch.amount_n[starts])[seg]
    posted = (acc0[seg] + within) // AMOUNT_SCALE
    accn = (acc0[seg] + within) % AMOUNT_SCALE
    prev = np.concatenate(([0], posted[:-1]))
    prev[starts] = 0
    amount_minor = prev - posted
    fcs = np.cumsum(fee_add)
    fee_cum = fcs - (fcs[starts] - fee_add[starts])[seg]
    balance = bal0[seg] - posted - fee_cum
    # a prefix of each segment: balances only fall and times only rise along it
    first_pay = pay_first[vr]
    pre = (balance > limit[seg]) & (end < first_pay[seg])
    fast_seg = pre[ends - 1] & (first_pay == NO_PAYMENT)  # all posted, and no payment left to apply
    upto = starts + np.add.reduceat(pre.astype(np.int64), starts) if n else starts  # first row not posted
    part = np.flatnonzero(~fast_seg & (upto > starts))
    z = np.zeros(0, dtype=np.int64)
    fi = np.flatnonzero(fast_seg)
    lp = upto[part] - 1  # last posted row of the partial segments
    res = Fast(vr[fi], balance[ends[fi] - 1], accn[ends[fi] - 1], new_day[fi], None, z,
               vr[part], balance[lp], accn[lp], np.where(ch.end_day[lp] > sd[part], ch.end_day[lp], -1), pre)
    if fi.size == 0 and part.size == 0:
        return res
    keep = np.flatnonzero(pre & (amount_minor != 0))
    st.pos = st_pos
    res.ledger, res.rank = _ledger(ch, keep, amount_minor[keep], balance[keep], st.of(pre, bal0, prev),
                                   seg_rank, lk, schema)
    return res


@dataclass
class _Standing:
    """Standing charges of fast accounts, in (account, day) order."""

    seg: np.ndarray  # charge segment (account) of each
    pos: np.ndarray  # charge row each one goes before
    fee: np.ndarray
    ts: np.ndarray  # local day start
    balance: np.ndarray
    iso: list[str]

    def of(self, pre: np.ndarray, bal0: np.ndarray, prev: np.ndarray) -> _Standing:
        """The rows posted with the charges (``pre``: the charges posted; a standing charge is
        posted when the charge it goes before is), with the balance after each."""
        if self.seg.size == 0:
            return self
        cs = np.cumsum(self.fee)  # fees already inserted per segment, this one included
        head = np.flatnonzero(np.concatenate(([True], self.seg[1:] != self.seg[:-1])))
        run_of = np.repeat(head, np.diff(np.append(head, self.seg.size)))
        run = cs - cs[run_of] + self.fee[run_of]
        k = np.flatnonzero(pre[self.pos])
        balance = bal0[self.seg[k]] - prev[self.pos[k]] - run[k]
        return _Standing(self.seg[k], self.pos[k], self.fee[k], self.ts[k], balance, [self.iso[i] for i in k.tolist()])


def _standing_rows(need: np.ndarray, seg_rank: np.ndarray, sd: np.ndarray, last: np.ndarray,
                   ctx: RatingContext, lk: Lookup) -> _Standing:
    """Standing charges for the local days after each segment's standing day up to its last
    charge's day (``need``: segments with such days). Accounts share (tariff, mall, days):
    each combination is worked out once, then repeated."""
    z = np.zeros(0, dtype=np.int64)
    if need.size == 0:
        return _Standing(z, z, z, z, z, [])
    r = seg_rank[need]
    key = np.stack([lk.acc_tariff[r], lk.acc_mall[r], sd[need], last[need]], axis=1)
    combos, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    fee_l, ts_l, iso_l, count = [], [], [], []
    for t, m, d0, d1 in combos.tolist():
        k = 0
        for d in range(d0 + 1, d1 + 1):
            fee, start = _day_fee(t, m, d, ctx, lk)
            if fee:
                fee_l.append(fee)
                ts_l.append(start)
                iso_l.append(day_iso(d))
                k += 1
        count.append(k)
    cnt = np.array(count, dtype=np.int64)
    first = np.cumsum(cnt) - cnt
    per = cnt[inv]
    rep = np.repeat(np.arange(need.size), per)
    idx = first[inv][rep] + np.arange(rep.size) - np.repeat(np.cumsum(per) - per, per)
    fee_a, ts_a = np.array(fee_l, dtype=np.int64), np.array(ts_l, dtype=np.int64)
    return _Standing(need[rep], z, fee_a[idx] if idx.size else z, ts_a[idx] if idx.size else z, z,
                     [iso_l[i] for i in idx.tolist()])


def _day_fee(t: int, m: int, d: int, ctx: RatingContext, lk: Lookup) -> tuple[int, int]:
    """(standing charge, local day start ms) of tariff ``t`` on day ``d`` in mall ``m``'s zone."""
    hit = lk.day_fees.get((t, m, d))
    if hit is None:
        tz = lk.mall_tz[m]
        day_start = local_day_start_ms(date.fromordinal(EPOCH_ORDINAL + d), tz)
        v = version_at(ctx.tariffs[lk.tariff_ids[t]], day_start)
        hit = lk.day_fees[(t, m, d)] = (v.standing_charge_per_day if v else 0, day_start)
    return hit


def _ledger(ch: Charges, keep: np.ndarray, amount: np.ndarray, balance: np.ndarray, st: _Standing,
            seg_rank: np.ndarray, lk: Lookup, schema: dict[str, Any]) -> tuple[pl.DataFrame, np.ndarray]:
    """Ledger rows of the kept charges and the standing charges, built once in final order."""
    k, m = keep.size, st.seg.size
    at = np.searchsorted(keep, st.pos)  # kept charge each standing charge goes before
    st_final = at + np.arange(m)
    ch_final = np.arange(k) + np.searchsorted(at, np.arange(k), side="right")
    rank = np.empty(k + m, dtype=np.int64)
    rank[ch_final], rank[st_final] = ch.aidx[keep], seg_rank[st.seg]

    def ints(charge: np.ndarray, standing: np.ndarray) -> np.ndarray:
        out = np.empty(k + m, dtype=np.int64)
        out[ch_final], out[st_final] = charge, standing
        return out

    src = np.zeros(k + m, dtype=np.int64)
    src[ch_final] = np.arange(k)

    def merged(charge: pl.Series, standing: list[Any] | None) -> pl.Series:
        """Charge values (in kept order) and standing values (None: null) in final order."""
        if m == 0:
            return charge
        extra = cols.series(charge.name, standing if standing is not None else [None] * m, charge.dtype)
        if k == 0:
            return extra
        out = take(charge, src)  # standing rows get row 0 here, then their own values
        out.scatter(st_final, extra)
        return out

    def coded(dictionary: pl.Series, code: np.ndarray) -> pl.Series:
        """``dictionary[code]`` for the charges, null for the standing charges, in final order."""
        if m == 0:
            return take(dictionary, code)
        return merged(take(dictionary, code), None)

    cb = Combos.of(ch.period[keep], ch.tier[keep], ch.price_u[keep]) if k > cols.SMALL else None
    entry = entry_ids(lk, ch.cidx[keep], ch.end_ms[keep], ch.period[keep], ch.tier[keep], ch.price_u[keep], cb)
    aid = [lk.account_ids[x] for x in seg_rank[st.seg].tolist()]
    est = np.zeros(k + m, dtype=bool)
    est[ch_final] = ch.column("estimated", keep).to_numpy()
    if cb is not None:
        rates = coded(_rates(cb.price, lk).alias("rate"), cb.inv)
    else:
        rates = merged(_rates(ch.price_u[keep], lk), None)
    led = cols.frame(schema, {
        "entry_id": merged(entry, [f"{x}:standing:{d}" for x, d in zip(aid, st.iso, strict=True)]),
        "account_id": take(lk.account_series, rank), "mall_id": take(lk.mall_series, rank),
        "kind": take(_KINDS, ints(np.zeros(k, dtype=np.int64), np.ones(m, dtype=np.int64))),
        "amount_minor": ints(amount, -st.fee), "balance_after_minor": ints(balance, st.balance),
        "ts_ms": ints(ch.end_ms[keep], st.ts), "source_id": merged(entry.alias("source_id"), st.iso),
        "meter_id": merged(ch.column("meter_id", keep), None),
        "circuit_id": coded(lk.cindex.id_series, ch.cidx[keep]),
        "interval_start_ms": merged(ch.column("start_ms", keep), None),
        "energy_wh": merged(ch.column("energy_wh", keep), None),
        "tou_period": coded(lk.period_names, ch.period[keep]),
        "tier": merged(ch.column("tier", keep), None), "rate": rates, "estimated": est,
        "debt_change_minor": pl.repeat(None, k + m, dtype=pl.Int64, eager=True)})  # fast accounts have no debt recovery
    return led, rank


_KINDS = pl.Series("kind", ["charge", "standing_charge"], dtype=pl.String)


def _rates(price: np.ndarray, lk: Lookup) -> pl.Series:
    """Ledger ``rate`` text of each price (exact decimal, no trailing zeros), cached per price."""
    known = lk.rate_strs
    if price.size <= cols.SMALL:
        plist = price.tolist()
        if all(p in known for p in plist):
            return cols.series("rate", [known[p] for p in plist], pl.String)
    uniq, inv = cols.codes(price)
    miss = [p for p in uniq.tolist() if p not in known]
    if miss:
        txt = pl.DataFrame({"p": miss}, schema={"p": pl.Int64}).select(
            (pl.col("p").cast(pl.Decimal(38, 6)) / PRICE_SCALE).cast(pl.String).str.replace(r"\.?0+$", ""))["p"]
        known.update(zip(miss, txt.to_list(), strict=True))
    names = pl.Series("rate", [known[p] for p in uniq.tolist()], dtype=pl.String)
    return take(names, inv, [known[p] for p in uniq.tolist()])
