"""Facade used by the stream agents and by offline replay: one pure batch step.

    process_batch(state, readings, payments, ctx) -> (new_state, outputs)

Input ``readings`` (polars DataFrame; extra columns ignored):
    circuit_id: str, meter_id: str, ts_ms: int64 (epoch ms UTC), import_kwh: float64 (cumulative
    import register).
Input ``payments``: a DataFrame or a list of dicts with
    payment_id: str, account_id: str, ts_ms: int64, amount_minor: int64 (> 0),
    kind: "topup" | "reversal" | "refund" (case-insensitive), reverses_payment_id: str | None.

Events of an account are applied in (ts_ms, payments before charges, entry id) order. An
eligible account's charges (and standing charges) up to the first one after which a rule could
fire, and before its first payment of the batch, take the vectorised path (`fastpath`); its
remaining events, and all events of the other accounts, run through `wallet.Wallet` one event
at a time. An account new to the state is opened first (its opening entries). Both paths
implement the same rules and order (tests compare them).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from pipelines.core import cols
from pipelines.core.accounts import AccountView, advanced
from pipelines.core.cols import take
from pipelines.core.context import RatingContext
from pipelines.core.fastpath import NO_PAYMENT, Charges, charges, fast_path
from pipelines.core.interval import (
    INTERVAL_SCHEMA,
    REJECT_SCHEMA,
    CircuitState,
    interval_arrays,
)
from pipelines.core.localtime import EPOCH_ORDINAL, day_iso
from pipelines.core.lookup import Lookup, lookup
from pipelines.core.tariff import RATED_SCHEMA, TierArrays, local_day_start_ms, rate_arrays
from pipelines.core.wallet import (
    AccountState,
    Charge,
    Payment,
    Wallet,
    WalletOut,
    evaluate_deferred,
    open_account,
)

LEDGER_SCHEMA: dict[str, Any] = {
    "entry_id": pl.String, "account_id": pl.String, "mall_id": pl.String, "kind": pl.String,
    "amount_minor": pl.Int64, "balance_after_minor": pl.Int64, "ts_ms": pl.Int64, "source_id": pl.String,
    "meter_id": pl.String, "circuit_id": pl.String, "interval_start_ms": pl.Int64, "energy_wh": pl.Int64,
    "tou_period": pl.String, "tier": pl.Int32, "rate": pl.String, "estimated": pl.Boolean,
    "debt_change_minor": pl.Int64,  # change of the debt register (null: none), see wallet.py
}
ALERT_SCHEMA: dict[str, Any] = {
    "alert_id": pl.String, "kind": pl.String, "severity": pl.String, "mall_id": pl.String,
    "account_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64, "message": pl.String,
    "details": pl.String,
}
COMMAND_SCHEMA: dict[str, Any] = {
    "command_id": pl.String, "action": pl.String, "reason": pl.String, "mall_id": pl.String,
    "account_id": pl.String, "cause_ts_ms": pl.Int64, "cause_id": pl.String,
}
PAYMENT_REJECT_SCHEMA: dict[str, Any] = {
    "payment_id": pl.String, "account_id": pl.String, "ts_ms": pl.Int64, "amount_minor": pl.Int64,
    "kind": pl.String, "reason": pl.String,
}


@dataclass
class CoreState:
    """All engine state: per circuit (interval step) and per account (tiers + wallet)."""

    circuits: dict[str, CircuitState] = field(default_factory=dict)
    accounts: dict[str, AccountState] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"circuits": {k: v.to_dict() for k, v in sorted(self.circuits.items())},
                "accounts": {k: v.to_dict() for k, v in sorted(self.accounts.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoreState:
        return cls({k: CircuitState.from_dict(v) for k, v in d.get("circuits", {}).items()},
                   {k: AccountState.from_dict(v) for k, v in d.get("accounts", {}).items()})

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> CoreState:
        return cls.from_dict(json.loads(b))

    def account_slice(self, account_id: str, ctx: RatingContext) -> dict[str, Any]:
        """The state of one account and its circuits, e.g. for a faust table keyed by account."""
        return {"account": self.accounts[account_id].to_dict() if account_id in self.accounts else None,
                "circuits": {c: s.to_dict() for c, s in self.circuits.items()
                             if c in ctx.circuits and ctx.circuits[c].account_id == account_id}}


@dataclass
class BatchOutputs:
    intervals: pl.DataFrame  # INTERVAL_SCHEMA + account_id
    rated: pl.DataFrame  # RATED_SCHEMA: one row per (piece, tier)
    ledger: pl.DataFrame  # LEDGER_SCHEMA (matches schemas/ledger_entry.avsc)
    alerts: pl.DataFrame  # ALERT_SCHEMA (details as JSON text)
    commands: pl.DataFrame  # COMMAND_SCHEMA; the relay owner maps account -> meters/gateway
    rejected_readings: pl.DataFrame  # REJECT_SCHEMA
    rejected_payments: pl.DataFrame  # PAYMENT_REJECT_SCHEMA


PAYMENT_SCHEMA: dict[str, Any] = {
    "payment_id": pl.String, "account_id": pl.String, "ts_ms": pl.Int64, "amount_minor": pl.Int64,
    "kind": pl.String, "reverses_payment_id": pl.String}


def payments_frame(payments: pl.DataFrame | list[dict[str, Any]] | None) -> pl.DataFrame:
    schema = PAYMENT_SCHEMA
    if payments is None or len(payments) == 0:
        return cols.empty(schema)
    df = payments if isinstance(payments, pl.DataFrame) else pl.DataFrame(payments, infer_schema_length=None)
    if "reverses_payment_id" not in df.columns:
        df = df.with_columns(reverses_payment_id=pl.lit(None, pl.String))
    if "kind" not in df.columns:
        df = df.with_columns(kind=pl.lit("topup"))
    return df.select(list(schema)).cast(schema).with_columns(pl.col("kind").str.to_lowercase())


def process_batch(
    state: CoreState,
    readings: pl.DataFrame,
    payments: pl.DataFrame | list[dict[str, Any]] | None,
    ctx: RatingContext,
    *,
    flush: bool = False,
    circuit_codes: np.ndarray | None = None,
) -> tuple[CoreState, BatchOutputs]:
    """Readings + payments -> new state + outputs. Pure: ``state`` is not mutated.
    ``circuit_codes``: each reading's circuit rank in the context's lookup (-1: unknown), when
    the caller has them already (replay in arrival order), so the ids are not looked up again."""
    return _process_batch(state, readings, payments, ctx, flush=flush, circuit_codes=circuit_codes)


def _process_batch(
    state: CoreState,
    readings: pl.DataFrame,
    payments: pl.DataFrame | list[dict[str, Any]] | None,
    ctx: RatingContext,
    *,
    flush: bool = False,
    timings: dict[str, float] | None = None,
    circuit_codes: np.ndarray | None = None,
) -> tuple[CoreState, BatchOutputs]:
    """`process_batch`, optionally recording seconds per stage into ``timings`` (bench): interval,
    tariff, wallet (their sum is the call), and within them circuits (interval states), accounts
    (reading the touched account states), fast (vectorised wallet), states (new account states),
    slow (per-event wallet) and outputs (ledger order, output frames)."""
    with gc_paused():
        return _steps(state, readings, payments, ctx, flush, timings if timings is not None else {}, circuit_codes)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector for the duration of a batch (and restore the caller's
    setting). A call allocates several objects per touched account; with the collector running,
    those allocations trigger full collections that walk every object of a large state again and
    again (a third of a live-shaped call at 35,000 accounts). Paused, the call's objects are
    scanned once, young, after it. Reference counting frees memory as usual meanwhile."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _steps(state: CoreState, readings: pl.DataFrame, payments: pl.DataFrame | list[dict[str, Any]] | None,
           ctx: RatingContext, flush: bool, timings: dict[str, float],
           circuit_codes: np.ndarray | None = None) -> tuple[CoreState, BatchOutputs]:
    t0 = time.perf_counter()
    lk = lookup(ctx)
    circuits, intervals, rej_r, cidx = interval_arrays(
        state.circuits, readings, lk.cindex, lateness_ms=ctx.lateness_ms, gap_ms=ctx.gap_ms, flush=flush,
        codes=circuit_codes)
    tc = time.perf_counter()
    aidx = lk.circ_acc[cidx]
    intervals = cols.hstack(intervals, [take(lk.account_series, aidx, lk.account_ids)])
    pay = payments_frame(payments)
    pay_rows = pay.rows(named=True) if pay.height else []
    pay_accts = {p["account_id"] for p in pay_rows}
    pay_rank = np.array(sorted(lk.account_rank[a] for a in pay_accts if a in lk.account_rank), dtype=np.int64)
    energy = intervals.get_column("energy_wh").to_numpy()
    view = AccountView(state.accounts, cols.distinct(np.concatenate([aidx[energy > 0], pay_rank]),
                                                    len(lk.account_ids)), lk)
    t1 = time.perf_counter()
    r = rate_arrays(intervals, aidx, cidx, ctx, TierArrays.dense(lk, view.rank, view.tier_month, view.tier_wh))
    rated = r.frame
    ch = charges(r, lk) if not rated.is_empty() else None
    t2 = time.perf_counter()

    # Every touched account gets a new state; its tier counters first (rated accounts: updated).
    tier_month, tier_wh = view.tier_month.copy(), view.tier_wh.copy()
    assert r.tiers.acc is not None
    tr = view.row[r.tiers.acc]
    tier_month[tr], tier_wh[tr] = r.tiers.month, r.tiers.wh
    touched = np.zeros(view.rank.size, dtype=bool)
    touched[view.row[pay_rank]] = True
    touched[view.row[cols.distinct(r.aidx, len(lk.account_ids))]] = True
    pay_first = np.full(view.rank.size, NO_PAYMENT, dtype=np.int64)  # first payment time per account
    if pay_rows:
        first_pay: dict[str, int] = {}
        for p in pay_rows:
            first_pay[p["account_id"]] = min(first_pay.get(p["account_id"], NO_PAYMENT), p["ts_ms"])
        known = [(lk.account_rank[a], t) for a, t in first_pay.items() if a in lk.account_rank]
        pay_first[view.row[[r for r, _ in known]]] = [t for _, t in known]
    accounts = dict(state.accounts)
    out = WalletOut()
    # An account new to the state opens first: its opening balance and debt entries
    # (wallet.open_account), dated at the start of its first event's local day, so before all of
    # its events. Then it is billed like any account whose standing day is the day before: the
    # vectorised wallet when no rule can fire (its first day's standing charge comes first, as
    # the per-event wallet posts it), else the per-event one. Its opening entries are per-event
    # rows, which `_ordered_ledger` puts before its other entries.
    new_rows = [i for i in np.flatnonzero(touched).tolist()
                if view.states[i] is None and view.ids[i] in ctx.accounts]
    opened: dict[str, AccountState] = {}
    if new_rows:
        first_ts = _first_event_ts([view.ids[i] for i in new_rows], ch, pay_rows, lk)
        fallback = int(readings["ts_ms"].min()) if readings.height else 0
        for i in new_rows:
            a = view.ids[i]
            t = first_ts.get(a, fallback)
            opened[a] = s = _open(a, t, ctx, out)
            view.show(i, s, _local_day(t, ctx.malls[ctx.accounts[a].mall_id].tz) - 1)
    n_open = len(out.ledger)  # the opening entries: first in their accounts' ledger
    fast_ledger, fast_rank = None, np.zeros(0, dtype=np.int64)
    is_fast = np.zeros(view.rank.size, dtype=bool)
    posted: np.ndarray | None = None  # charges the vectorised wallet posted
    part: dict[int, tuple[int, int, int]] = {}  # view row -> (balance, residue, new day) it reached
    if ch is not None:
        f = fast_path(ch, view, pay_first, ctx, lk, LEDGER_SCHEMA)
        fast_ledger, fast_rank, posted = f.ledger, f.rank, f.pre
        is_fast[f.rows] = True
        part = dict(zip(f.part_rows.tolist(), zip(f.part_balance.tolist(), f.part_acc_n.tolist(),
                                                      f.part_new_day.tolist(), strict=True), strict=True))
        timings["fast"] = time.perf_counter() - t2
        rows = f.rows.tolist()
        iso = {d: day_iso(d) for d in np.unique(f.new_day[f.new_day >= 0]).tolist()}
        sd = view.standing_iso
        accounts.update(zip([view.ids[i] for i in rows], map(
            advanced, [view.states[i] for i in rows], f.balance.tolist(), f.acc_n.tolist(),
            [iso[d] if d >= 0 else sd[i] for i, d in zip(rows, f.new_day.tolist(), strict=True)],
            tier_month[f.rows].tolist(), tier_wh[f.rows].tolist()), strict=True))
    slow_rows = np.flatnonzero(touched & ~is_fast).tolist()
    slow_ids = sorted([view.ids[i] for i in slow_rows] + [a for a in pay_accts if a not in lk.account_rank])
    ch_by = _charges_by_account(ch, slow_ids, lk, posted) if ch is not None and slow_ids else {}
    pay_by: dict[str, list[dict[str, Any]]] = {}
    for p in pay_rows:
        pay_by.setdefault(p["account_id"], []).append(p)
    for i in slow_rows:
        old = view.states[i]
        if view.ids[i] in opened:
            s = opened[view.ids[i]]
        else:
            s = old.copy() if old is not None else AccountState(view.ids[i])
        if i in part:  # the vectorised wallet posted its first charges: the state after them
            s.balance, s.acc_n, day = part[i]
            if day >= 0:
                s.standing_day = day_iso(day)
        s.tier_month, s.tier_wh = int(tier_month[i]), int(tier_wh[i])
        accounts[s.account_id] = s
    t3 = time.perf_counter()
    for a in slow_ids:
        if a not in ctx.accounts:
            for p in pay_by[a]:
                out.rejected.append({**{k: p[k] for k in PAYMENT_REJECT_SCHEMA if k in p}, "reason": "unknown_account"})
            continue
        _slow_path(accounts[a], ch_by.get(a, []), pay_by.get(a, []), ctx, out)

    t4 = time.perf_counter()
    ledger = _ordered_ledger(fast_ledger, fast_rank, out.ledger[:n_open], out.ledger[n_open:], lk)
    outputs = BatchOutputs(
        intervals=intervals, rated=rated, ledger=ledger, alerts=_alerts(out.alerts),
        commands=cols.frame_from_rows(COMMAND_SCHEMA, out.commands),
        rejected_readings=rej_r,  # REJECT_SCHEMA already (interval._concat_rejects)
        rejected_payments=cols.frame_from_rows(PAYMENT_REJECT_SCHEMA, out.rejected))
    t5 = time.perf_counter()
    timings.update(interval=t1 - t0, tariff=t2 - t1, wallet=t5 - t2, circuits=tc - t0, accounts=t1 - tc,
                   states=t3 - t2 - timings.get("fast", 0.0), slow=t4 - t3, outputs=t5 - t4)
    return CoreState(circuits, accounts), outputs


def _open(account_id: str, first_ts_ms: int, ctx: RatingContext, out: WalletOut) -> AccountState:
    """A new account's state with its opening entries (`wallet.open_account`)."""
    rating = ctx.accounts[account_id]
    mall = ctx.malls[rating.mall_id]
    return open_account(rating, ctx.tariffs[rating.tariff_id], mall.tz, frozenset(mall.holidays), first_ts_ms, out)


def _local_day(ts_ms: int, tz: str) -> int:
    """The local date of ``ts_ms`` in ``tz`` (days since 1970-01-01), as `open_account` dates it."""
    return datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(tz)).date().toordinal() - EPOCH_ORDINAL


def _first_event_ts(new: list[str], ch: Charges | None, pay_rows: list[dict[str, Any]], lk: Lookup
                    ) -> dict[str, int]:
    """Earliest charge or payment time of each account new to the state (one pass over the
    charges: the first call of a replay opens every account of the portfolio at once)."""
    first: dict[str, int] = {}
    wanted = set(new)
    for p in pay_rows:
        a = p["account_id"]
        if a in wanted:
            first[a] = min(first.get(a, p["ts_ms"]), p["ts_ms"])
    if ch is not None and ch.aidx.size:
        ranks = np.array(sorted(lk.account_rank[a] for a in new if a in lk.account_rank), dtype=np.int64)
        sel = np.isin(ch.aidx, ranks)
        acc, end = ch.aidx[sel], ch.end_ms[sel]
        if acc.size:
            order = np.lexsort((end, acc))  # by account, then time: each account's first row is its minimum
            acc, end = acc[order], end[order]
            head = np.flatnonzero(np.r_[True, acc[1:] != acc[:-1]])
            for rank, t in zip(acc[head].tolist(), end[head].tolist(), strict=True):
                a = lk.account_ids[rank]
                first[a] = min(first.get(a, t), t)
    return first


def _ordered_ledger(fast: pl.DataFrame | None, fast_rank: np.ndarray, opening: list[dict[str, Any]],
                    later: list[dict[str, Any]], lk: Lookup) -> pl.DataFrame:
    """Ledger ordered by (account_id, ts_ms), stable: per account, its opening entries (dated at
    the start of its first event's day), then what the vectorised wallet posted (``fast``, in that
    order already), then what the per-event wallet posted (``later``: from the account's first
    event the vectorised wallet left to it). With rows on both paths, one gather in that order."""
    key = lambda r: (r["account_id"], r["ts_ms"])  # noqa: E731
    if fast is None or fast.is_empty():
        return cols.frame_from_rows(LEDGER_SCHEMA, sorted(opening + later, key=key))  # stable, like polars
    if not opening and not later:
        return fast
    head, tail = sorted(opening, key=key), sorted(later, key=key)
    slow = cols.frame_from_rows(LEDGER_SCHEMA, head + tail)
    ranks = [lk.account_rank.get(r["account_id"], -1) for r in head + tail]
    if min(ranks) < 0:  # not a context account (not expected): order by the ids themselves
        both = cols.vconcat([slow.with_columns(g=pl.Series([0] * len(head) + [2] * len(tail), dtype=pl.Int8)),
                             fast.with_columns(g=pl.lit(1, pl.Int8))])
        return both.sort("account_id", "g", maintain_order=True).drop("g")
    group = np.concatenate([np.zeros(len(head), dtype=np.int64), np.full(len(tail), 2, dtype=np.int64)])
    order_key = np.concatenate([np.array(ranks, dtype=np.int64) * 4 + group, fast_rank * 4 + 1])
    return cols.vconcat([slow, fast])[np.argsort(order_key, kind="stable")]


def _alerts(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return cols.frame_from_rows(ALERT_SCHEMA, [{**r, "details": json.dumps(r["details"], sort_keys=True)}
                                               for r in rows])


def _charges_by_account(ch: Charges, slow_ids: list[str], lk: Lookup, posted: np.ndarray | None = None
                        ) -> dict[str, list[Charge]]:
    """The charges of the per-event accounts, in posting order, as Charge objects (without those
    the vectorised wallet ``posted``)."""
    ranks = np.array([lk.account_rank[a] for a in slow_ids if a in lk.account_rank], dtype=np.int64)
    sel = np.isin(ch.aidx, ranks)
    rows = np.flatnonzero(sel if posted is None else sel & ~posted)
    if rows.size == 0:
        return {}
    values = [ch.end_ms[rows].tolist(), ch.amount_n[rows].tolist(), ch.entry_ids(rows, lk).to_list(),
              *(ch.column(c, rows).to_list() for c in ("circuit_id", "meter_id", "start_ms", "energy_wh", "period")),
              ch.tier[rows].tolist(), ch.price_u[rows].tolist(), ch.column("estimated", rows).to_list()]
    out: dict[str, list[Charge]] = {}
    for x, r in zip(ch.aidx[rows].tolist(), zip(*values, strict=True), strict=True):
        out.setdefault(lk.account_ids[x], []).append(Charge(*r))
    return out


def _slow_path(s: AccountState, chs: list[Charge], pay: list[dict[str, Any]], ctx: RatingContext,
               out: WalletOut) -> None:
    rating = ctx.accounts[s.account_id]
    mall = ctx.malls[rating.mall_id]
    w = Wallet(s, rating, ctx.tariffs[rating.tariff_id], mall.tz, frozenset(mall.holidays), out)
    events: list[tuple[int, int, str, Any]] = [(c.ts_ms, 1, c.entry_id, c) for c in chs]
    for r in pay:
        events.append((r["ts_ms"], 0, r["payment_id"], Payment(
            r["payment_id"], r["ts_ms"], r["amount_minor"], r["kind"], r["reverses_payment_id"])))
    for _, kind, _, ev in sorted(events, key=lambda e: (e[0], e[1], e[2])):
        if kind:
            w.charge(ev)
        else:
            w.payment(ev)


def tick(state: CoreState, now_ms: int, ctx: RatingContext, accounts: Iterable[str] | None = None
         ) -> tuple[CoreState, BatchOutputs]:
    """Timer step at `now_ms` (explicit; the stream clock or replay's message time), per account
    in order:

    1. time-driven postings (`Wallet.timer`): standing charges and fixed debt recovery of every
       local day that began by the account's own newest time (its newest billed reading, capped
       at `now_ms`), each followed by the alert and trip rules, so emergency credit runs out, and
       the meter trips, with 0 Wh readings. Entry ids are per day / period (`A:standing:<date>`,
       `A:debtfix:<period>`): re-running the timer or re-delivering its input posts nothing twice,
       and an account's next charge would have posted exactly the same entries;
    2. trips deferred by a friendly-credit period whose period (the one around the account's
       newest reading) has ended, stamped with its end (wallet.evaluate_deferred).

    Because both steps depend on the account's own time, not on when the timer runs, the result
    is the same for any `now_ms` after the account's newest reading (and, for a deferred trip,
    after the period's end). `accounts` limits the step to those accounts (replay: the ones its
    last call touched, plus the deferred ones); default every account of the state."""
    new_accounts = dict(state.accounts)
    out = WalletOut()
    candidates = _timer_candidates(state, state.accounts.keys() if accounts is None else accounts, now_ms, ctx)
    anchors = _anchors(state, candidates, ctx)
    for a in sorted(candidates):
        s = state.accounts[a]
        r = ctx.accounts[a]
        m = ctx.malls[r.mall_id]
        tariff, hol = ctx.tariffs[r.tariff_id], frozenset(m.holidays)
        billed, seen = anchors.get(a, (-1, None))
        upto = min(billed, now_ms)
        if s.standing_day is not None and next_day_start_ms(s.standing_day, m.tz) <= upto:
            s = s.copy()
            Wallet(s, r, tariff, m.tz, hol, out).timer(upto)
        if s.deferred or s.warn_pending:
            s, o = evaluate_deferred(s, now_ms, r, tariff, m.tz, hol, seen)
            out.ledger += o.ledger
            out.alerts += o.alerts
            out.commands += o.commands
        new_accounts[a] = s
    return CoreState(dict(state.circuits), new_accounts), BatchOutputs(
        pl.DataFrame(schema={**INTERVAL_SCHEMA, "account_id": pl.String}), pl.DataFrame(schema=RATED_SCHEMA),
        pl.DataFrame(out.ledger, schema=LEDGER_SCHEMA), _alerts(out.alerts),
        pl.DataFrame(out.commands, schema=COMMAND_SCHEMA), pl.DataFrame(schema=REJECT_SCHEMA),
        pl.DataFrame(schema=PAYMENT_REJECT_SCHEMA))


@lru_cache(maxsize=65_536)
def next_day_start_ms(standing_day: str, tz: str) -> int:
    """When the local day after `standing_day` (ISO date) begins: the account's next
    time-driven posting (its standing charge, a new debt-recovery period)."""
    return local_day_start_ms(date.fromisoformat(standing_day) + timedelta(days=1), tz)


def timer_due_ms(s: AccountState, ctx: RatingContext) -> int | None:
    """When the account's next day begins (None: no day known yet, or not in the context)."""
    r = ctx.accounts.get(s.account_id)
    if r is None or s.standing_day is None:
        return None
    return next_day_start_ms(s.standing_day, ctx.malls[r.mall_id].tz)


def _timer_candidates(state: CoreState, names: Iterable[str], now_ms: int, ctx: RatingContext) -> set[str]:
    """The accounts of ``names`` in the state with timer work at ``now_ms``: a deferred trip or a
    pending warning, or a next day (`timer_due_ms`) begun by then. Replay ticks every account of
    a call (35,000 per call at portfolio size), and most share one or two standing days: a day
    whose next day begins after ``now_ms`` in every zone of the context rules its accounts out
    at once, and only accounts of a day due somewhere are checked in their own zone."""
    tz_of, zones = _account_tz(ctx)
    names = list(names)
    sts = list(map(state.accounts.get, names))  # None: not in the state
    out = {a for a, s in zip(names, sts, strict=True) if s is not None and (s.deferred or s.warn_pending)}
    days = set(map(_standing_day, filter(None, sts)))
    days.discard(None)
    due = {d for d in days if min(next_day_start_ms(d, z) for z in zones) <= now_ms}
    if due:
        for a, s in zip(names, sts, strict=True):
            if s is not None and (d := s.standing_day) in due and (tz := tz_of.get(s.account_id)) is not None \
                    and next_day_start_ms(d, tz) <= now_ms:
                out.add(a)
    return {a for a in out if a in tz_of}


_standing_day = attrgetter("standing_day")


def _account_tz(ctx: RatingContext) -> tuple[dict[str, str], frozenset[str]]:
    """(account -> its mall's zone, every such zone), built once per context (kept on its Lookup)."""
    lk = lookup(ctx)
    found: tuple[dict[str, str], frozenset[str]] | None = getattr(lk, "account_tz", None)
    if found is None:
        zone = {m: x.tz for m, x in ctx.malls.items()}
        tz_of = {a: zone[r.mall_id] for a, r in ctx.accounts.items()}
        found = lk.account_tz = (tz_of, frozenset(tz_of.values()))  # type: ignore[attr-defined]
    return found


def _anchors(state: CoreState, accounts: set[str], ctx: RatingContext) -> dict[str, tuple[int, int]]:
    """Each account's own times: (newest billed reading, newest reading seen) over its circuits.
    Day postings wait for the billed one (a reading still inside the lateness window may yet
    post a charge before the day's standing charge); deferred trips use the seen one."""
    anchors: dict[str, tuple[int, int]] = {}
    if not accounts:
        return anchors
    by_account = _account_circuits(ctx)
    for a in accounts:
        billed = seen = None
        for c in by_account.get(a, ()):
            cs = state.circuits.get(c)
            if cs is None:
                continue
            if cs.last_ts_ms is not None:
                billed = cs.last_ts_ms if billed is None else max(billed, cs.last_ts_ms)
            for t in (cs.last_ts_ms, cs.max_seen_ts_ms):
                if t is not None:
                    seen = t if seen is None else max(seen, t)
        if seen is not None:
            anchors[a] = (billed if billed is not None else -1, seen)
    return anchors


def _account_circuits(ctx: RatingContext) -> dict[str, list[str]]:
    """account -> its circuits, built once per context (kept on its Lookup)."""
    lk = lookup(ctx)
    found: dict[str, list[str]] | None = getattr(lk, "account_circuits", None)
    if found is None:
        found = {}
        for c, cfg in ctx.circuits.items():
            found.setdefault(cfg.account_id, []).append(c)
        lk.account_circuits = found  # type: ignore[attr-defined]
    return found
