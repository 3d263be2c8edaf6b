"""Charges, and the vectorised wallet for accounts whose batch can fire no rule.

An account is eligible when it has no payment in the batch, a known standing day, no debt
recovery, nothing deferred or tripped, and its balance after all of the batch's charges and
standing charges stays above every armed level (balances only fall here, so the last balance
is the lowest). Then the per-event wallet would only post entries, and this module posts the
same entries with cumulative sums: ``posted = (acc_n + cumsum(amount_n)) // 10**9`` per account,
standing charges inserted before the first charge of each new local day.

Tie order: the per-event wallet orders an account's charges by (end_ms, entry id), this path by
(end_ms, circuit, piece, tier). They agree unless two charges of an account share an end_ms, so
an account with such ties and a new local day (which the per-event wallet used to handle)
stays on the per-event path, keeping results identical to earlier releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import polars as pl

from pipelines.core import cols
from pipelines.core.cols import take
from pipelines.core.context import RatingContext
from pipelines.core.localtime import EPOCH_ORDINAL, day_iso, iso_day
from pipelines.core.lookup import Lookup
from pipelines.core.models import AMOUNT_SCALE, PRICE_SCALE
from pipelines.core.tariff import Rated, local_day_start_ms, version_at
from pipelines.core.wallet import AccountState

CHARGE_KEYS = ["account_id", "circuit_id", "end_ms", "period", "tier", "price_u"]


@dataclass
class Charges:
    """One charge per (interval, period, tier, price), ordered by (account, end_ms, circuit, piece, tier)."""

    frame: pl.DataFrame  # CHARGE_KEYS + meter_id, start_ms, piece_ms, energy_wh, amount_n, estimated, entry_id
    aidx: np.ndarray  # account rank
    end_day: np.ndarray  # local date of end_ms (days since 1970-01-01)
    end_ms: np.ndarray
    amount_n: np.ndarray


def charges(r: Rated, lk: Lookup) -> Charges:
    rated = r.frame
    if r.src.size > 1 and (r.src[1:] == r.src[:-1]).any():
        # Some interval has several rated rows: merge those with the same (period, tier, price).
        g = rated.with_columns(aidx=pl.Series(r.aidx), end_day=pl.Series(r.end_day)).group_by(CHARGE_KEYS).agg(
            pl.col("meter_id").first(), pl.col("start_ms").first(), pl.col("piece_ms").min(),
            pl.col("energy_wh").sum(), pl.col("amount_n").sum(), pl.col("estimated").any(),
            pl.col("aidx").first(), pl.col("end_day").first(),
        ).sort(["account_id", "end_ms", "circuit_id", "piece_ms", "tier"])
        aidx, end_day = g["aidx"].to_numpy(), g["end_day"].to_numpy()
        frame = g.drop("aidx", "end_day")
        end_ms, amount = frame["end_ms"].to_numpy(), frame["amount_n"].to_numpy()
    else:  # one row per interval (the common case): the rated rows are the charges, in order
        frame = pl.DataFrame([c for c in rated.get_columns() if c.name != "month"])
        aidx, end_day, end_ms, amount = r.aidx, r.end_day, r.end_ms, r.amount_n
    return Charges(cols.hstack(frame, [entry_ids(frame)]), aidx, end_day, end_ms, amount)


def entry_ids(frame: pl.DataFrame) -> pl.Series:
    """``A:chg:<circuit>:<end_ms>:<period>:<tier>:<price>`` per charge row. (period, tier, price)
    is unique within an interval; price only differs on a version change."""
    keys = ("account_id", "circuit_id", "end_ms", "period", "tier", "price_u")
    if frame.height <= cols.SMALL:
        v = [frame.get_column(k).to_list() for k in keys]
        return pl.Series("entry_id", [f"{a}:chg:{c}:{e}:{p}:{t}:{u}" for a, c, e, p, t, u in zip(*v, strict=True)],
                         dtype=pl.String)
    return frame.select(entry_id=pl.format("{}:chg:{}:{}:{}:{}:{}", *keys)).to_series()


def threshold(s: AccountState, ctx: RatingContext) -> int | None:
    """Lowest balance a fast-path account may reach without any rule firing (None: not eligible)."""
    p = ctx.accounts[s.account_id].policy
    if s.standing_day is None or s.deferred or s.warn_pending or s.relay == "tripped":
        return None
    if p.debt_recovery is not None:
        return None
    levels = [lv for lv in p.alert_levels if lv not in s.fired_levels] + [p.cutoff]
    if p.warning_trip_level is not None and not s.warning_fired:
        levels.append(p.warning_trip_level)
    return max(levels)


def fast_path(ch: Charges, accounts: dict[str, AccountState], pay_accts: set[str], ctx: RatingContext,
              lk: Lookup, schema: dict[str, Any]) -> tuple[set[str], pl.DataFrame | None, np.ndarray]:
    """Post the charges of every eligible account; returns (fast account ids, their ledger in
    (account_id, ts_ms) order, the account rank of each ledger row)."""
    a, end = ch.aidx, ch.end_ms
    n = a.size
    starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    ends = np.append(starts[1:], n)
    seg = np.repeat(np.arange(starts.size), ends - starts)
    tie = np.zeros(starts.size, dtype=bool)
    tie[seg[1:][(a[1:] == a[:-1]) & (end[1:] == end[:-1])]] = True
    d0, d1 = ch.end_day[starts].tolist(), ch.end_day[ends - 1].tolist()

    acc0 = np.zeros(starts.size, dtype=np.int64)
    bal0 = np.zeros(starts.size, dtype=np.int64)
    limit = np.full(starts.size, np.iinfo(np.int64).max)  # balance must stay above this
    fee_add = np.zeros(n, dtype=np.int64)
    standing: list[tuple[int, int, int, int, str]] = []  # (segment, position, fee, day start, iso)
    new_day: dict[int, int] = {}
    fees: dict[tuple[str, str, int], tuple[int, int]] = {}
    for i, (x, first, last) in enumerate(zip(a[starts].tolist(), d0, d1, strict=True)):
        aid = lk.account_ids[x]
        s = accounts.get(aid)
        if s is None or aid in pay_accts or aid not in ctx.accounts:
            continue
        t = threshold(s, ctx)
        if t is None:
            continue
        sd = iso_day(s.standing_day)  # type: ignore[arg-type]  # threshold() checked it
        if not first == last == sd:  # a new local day: standing charges, and ties must not matter
            if tie[i]:
                continue
            rating = ctx.accounts[aid]
            tz = ctx.malls[rating.mall_id].tz
            for d in range(sd + 1, last + 1):
                key = (rating.tariff_id, tz, d)
                if key not in fees:
                    day_start = local_day_start_ms(date.fromordinal(EPOCH_ORDINAL + d), tz)
                    v = version_at(ctx.tariffs[rating.tariff_id], day_start)
                    fees[key] = (v.standing_charge_per_day if v else 0, day_start)
                fee, day_start = fees[key]
                if fee:
                    standing.append((i, 0, fee, day_start, day_iso(d)))
            if last > sd:
                new_day[i] = last
        acc0[i], bal0[i], limit[i] = s.acc_n, s.balance, t

    if standing:  # each goes before the account's first charge ending at or after its day start
        seg_key = (seg << 43) + end  # sorted: rows are in (account, end_ms) order
        sk = np.array([(i << 43) + day_start for i, _, _, day_start, _ in standing], dtype=np.int64)
        pos = np.searchsorted(seg_key, sk)
        np.add.at(fee_add, pos, np.array([x[2] for x in standing], dtype=np.int64))
        standing = [(i, p, fee, ds, iso) for (i, _, fee, ds, iso), p in zip(standing, pos.tolist(), strict=True)]
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
    fast_seg = balance[ends - 1] > limit

    fast: set[str] = set()
    for i in np.flatnonzero(fast_seg).tolist():
        s = accounts[lk.account_ids[a[starts[i]]]]
        s.balance, s.acc_n = int(balance[ends[i] - 1]), int(accn[ends[i] - 1])
        if i in new_day:
            s.standing_day = day_iso(new_day[i])
        fast.add(s.account_id)
    if not fast:
        return fast, None, np.zeros(0, dtype=np.int64)
    mask = fast_seg[seg] & (amount_minor != 0)
    keep = np.flatnonzero(mask)
    f = ch.frame

    def col(name: str) -> pl.Series:
        return f.get_column(name) if keep.size == n else take(f.get_column(name), keep)

    entry = col("entry_id")
    led = cols.frame(schema, {
        "entry_id": entry, "account_id": col("account_id"), "mall_id": take(lk.mall_series, a[keep], lk.acc_mall_id),
        "kind": cols.repeat("kind", "charge", keep.size, pl.String), "amount_minor": amount_minor[keep],
        "balance_after_minor": balance[keep], "ts_ms": end[keep], "source_id": entry, "meter_id": col("meter_id"),
        "circuit_id": col("circuit_id"), "interval_start_ms": col("start_ms"), "energy_wh": col("energy_wh"),
        "tou_period": col("period"), "tier": col("tier"), "rate": _rates(f.get_column("price_u").to_numpy()[keep], lk),
        "estimated": col("estimated")})
    rank = a[keep]
    st = _standing_rows(standing, fast_seg, starts, a, bal0, prev, lk, schema)
    if st.is_empty():
        return fast, led, rank
    # Standing charges go before the charges of their account at the same or a later time.
    st_rank = np.array([lk.account_rank[x] for x in st["account_id"].to_list()], dtype=np.int64)
    all_rank = np.concatenate((st_rank, rank))
    ts = np.concatenate((st["ts_ms"].to_numpy(), end[keep]))
    order = np.lexsort((ts, all_rank))  # stable: standing rows (first) win ties
    return fast, pl.concat([st, led])[order], all_rank[order]


def _rates(price: np.ndarray, lk: Lookup) -> pl.Series:
    """Ledger ``rate`` text of each price (exact decimal, no trailing zeros), cached per price."""
    uniq, inv = np.unique(price, return_inverse=True)
    known = lk.rate_strs
    miss = [p for p in uniq.tolist() if p not in known]
    if miss:
        txt = pl.DataFrame({"p": miss}, schema={"p": pl.Int64}).select(
            (pl.col("p").cast(pl.Decimal(38, 6)) / PRICE_SCALE).cast(pl.String).str.replace(r"\.?0+$", ""))["p"]
        known.update(zip(miss, txt.to_list(), strict=True))
    names = pl.Series("rate", [known[p] for p in uniq.tolist()], dtype=pl.String)
    return take(names, inv.ravel(), [known[p] for p in uniq.tolist()])


def _standing_rows(standing: list[tuple[int, int, int, int, str]], fast_seg: np.ndarray, starts: np.ndarray,
                   a: np.ndarray, bal0: np.ndarray, prev: np.ndarray, lk: Lookup, schema: dict[str, Any]
                   ) -> pl.DataFrame:
    rows = []
    run: dict[int, int] = {}  # fees already inserted per segment
    for i, p, fee, day_start, iso in standing:
        run[i] = run.get(i, 0) + fee
        if not fast_seg[i]:
            continue
        aid = lk.account_ids[a[starts[i]]]
        rows.append({"entry_id": f"{aid}:standing:{iso}", "account_id": aid, "mall_id": lk.acc_mall_id[a[starts[i]]],
                     "kind": "standing_charge", "amount_minor": -fee,
                     "balance_after_minor": int(bal0[i] - prev[p] - run[i]), "ts_ms": day_start, "source_id": iso,
                     "estimated": False})
    return cols.frame_from_rows(schema, rows)
