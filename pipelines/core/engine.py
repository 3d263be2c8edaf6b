"""Facade used by the stream agents and by offline replay: one pure batch step.

    process_batch(state, readings, payments, ctx) -> (new_state, outputs)

Input ``readings`` (polars DataFrame; extra columns ignored):
    circuit_id: str, meter_id: str, ts_ms: int64 (epoch ms UTC), import_kwh: float64 (cumulative
    import register).
Input ``payments``: a DataFrame or a list of dicts with
    payment_id: str, account_id: str, ts_ms: int64, amount_minor: int64 (> 0),
    kind: "topup" | "reversal" | "refund" (case-insensitive), reverses_payment_id: str | None.

Events of an account are applied in (ts_ms, payments before charges, entry id) order. Accounts
whose batch holds only charges that cross no threshold, change no local day and have no
payment take a vectorised path; all others run through `wallet.Wallet` one event at a time.
Both paths implement the same rules (property tests compare them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipelines.core.context import RatingContext
from pipelines.core.fastpath import charges, fast_path
from pipelines.core.interval import (
    INTERVAL_SCHEMA,
    REJECT_SCHEMA,
    CircuitState,
    interval_arrays,
)
from pipelines.core.lookup import Lookup, lookup
from pipelines.core.tariff import RATED_SCHEMA, TierCounter, rate_arrays
from pipelines.core.wallet import (
    AccountState,
    Charge,
    Payment,
    Wallet,
    WalletOut,
    evaluate_deferred,
)

LEDGER_SCHEMA: dict[str, Any] = {
    "entry_id": pl.String, "account_id": pl.String, "mall_id": pl.String, "kind": pl.String,
    "amount_minor": pl.Int64, "balance_after_minor": pl.Int64, "ts_ms": pl.Int64, "source_id": pl.String,
    "meter_id": pl.String, "circuit_id": pl.String, "interval_start_ms": pl.Int64, "energy_wh": pl.Int64,
    "tou_period": pl.String, "tier": pl.Int32, "rate": pl.String, "estimated": pl.Boolean,
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


def payments_frame(payments: pl.DataFrame | list[dict[str, Any]] | None) -> pl.DataFrame:
    schema = {"payment_id": pl.String, "account_id": pl.String, "ts_ms": pl.Int64, "amount_minor": pl.Int64,
              "kind": pl.String, "reverses_payment_id": pl.String}
    if payments is None or len(payments) == 0:
        return pl.DataFrame(schema=schema)
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
) -> tuple[CoreState, BatchOutputs]:
    """Readings + payments -> new state + outputs. Pure: ``state`` is not mutated."""
    return _process_batch(state, readings, payments, ctx, flush=flush)


def _process_batch(
    state: CoreState,
    readings: pl.DataFrame,
    payments: pl.DataFrame | list[dict[str, Any]] | None,
    ctx: RatingContext,
    *,
    flush: bool = False,
    timings: dict[str, float] | None = None,
) -> tuple[CoreState, BatchOutputs]:
    """`process_batch`, optionally recording seconds per stage into ``timings`` (bench)."""
    t0 = time.perf_counter()
    lk = lookup(ctx)
    circuits, intervals, rej_r, cidx = interval_arrays(
        state.circuits, readings, lk.cindex, lateness_ms=ctx.lateness_ms, gap_ms=ctx.gap_ms, flush=flush)
    aidx = lk.circ_acc[cidx]
    intervals = intervals.with_columns(account_id=lk.account_series.gather(aidx))
    t1 = time.perf_counter()
    accounts = dict(state.accounts)
    counters = {a: s.tiers for a, s in accounts.items()}
    r = rate_arrays(intervals, aidx, cidx, ctx, counters)
    rated, counters = r.frame, r.counters
    t2 = time.perf_counter()
    pay = payments_frame(payments)
    ch = charges(r) if not rated.is_empty() else None

    pay_accts = set(pay["account_id"].to_list())
    touched = pay_accts | ({lk.account_ids[x] for x in np.unique(ch.aidx).tolist()} if ch is not None else set())
    for a in touched:
        if a not in ctx.accounts:
            continue
        s = accounts[a].copy() if a in accounts else AccountState(a)
        c = counters.get(a, TierCounter())
        s.tier_month, s.tier_wh = c.month, c.wh
        accounts[a] = s

    out = WalletOut()
    fast_ids: set[str] = set()
    fast_ledger, fast_rank = None, np.zeros(0, dtype=np.int64)
    if ch is not None:
        fast_ids, fast_ledger, fast_rank = fast_path(ch, accounts, pay_accts, ctx, lk, LEDGER_SCHEMA)
    slow_ids = sorted(touched - fast_ids)
    ch_by = ch.frame.filter(pl.col("account_id").is_in(slow_ids)).partition_by("account_id", as_dict=True) \
        if ch is not None and slow_ids else {}
    pay_by = pay.partition_by("account_id", as_dict=True)
    for a in slow_ids:
        if a not in ctx.accounts:
            for p in pay_by[(a,)].iter_rows(named=True):
                out.rejected.append({**{k: p[k] for k in PAYMENT_REJECT_SCHEMA if k in p}, "reason": "unknown_account"})
            continue
        _slow_path(accounts[a], ch_by.get((a,)), pay_by.get((a,)), ctx, out)

    ledger = _ordered_ledger(fast_ledger, fast_rank, pl.DataFrame(out.ledger, schema=LEDGER_SCHEMA), lk)
    outputs = BatchOutputs(
        intervals=intervals, rated=rated, ledger=ledger, alerts=_alerts(out.alerts),
        commands=pl.DataFrame(out.commands, schema=COMMAND_SCHEMA),
        rejected_readings=rej_r.cast(REJECT_SCHEMA),
        rejected_payments=pl.DataFrame(out.rejected, schema=PAYMENT_REJECT_SCHEMA))
    if timings is not None:
        timings.update(interval=t1 - t0, tariff=t2 - t1, wallet=time.perf_counter() - t2)
    return CoreState(circuits, accounts), outputs


def _ordered_ledger(fast: pl.DataFrame | None, fast_rank: np.ndarray, slow: pl.DataFrame, lk: Lookup
                   ) -> pl.DataFrame:
    """Ledger ordered by (account_id, ts_ms), stable. ``fast`` is already in that order and shares
    no account with ``slow``, so slow accounts' blocks are spliced in whole (no row gather)."""
    slow = slow.sort(["account_id", "ts_ms"], maintain_order=True)
    if fast is None or fast.is_empty():
        return slow
    if slow.is_empty():
        return fast
    ids, counts = np.unique(slow["account_id"].to_numpy(), return_counts=True)  # sorted, like the frame
    pieces, f0, s0 = [], 0, 0
    for aid, k in zip(ids.tolist(), counts.tolist(), strict=True):
        r = lk.account_rank.get(aid)
        cut = int(np.searchsorted(fast_rank, r)) if r is not None else \
            int(np.searchsorted(fast["account_id"].to_numpy(), aid))
        pieces += [fast[f0:cut], slow[s0:s0 + k]]
        f0, s0 = cut, s0 + k
    pieces.append(fast[f0:])
    return pl.concat([p for p in pieces if p.height])


def _alerts(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame([{**r, "details": json.dumps(r["details"], sort_keys=True)} for r in rows],
                        schema=ALERT_SCHEMA)


def _slow_path(s: AccountState, ch: pl.DataFrame | None, pay: pl.DataFrame | None, ctx: RatingContext,
               out: WalletOut) -> None:
    rating = ctx.accounts[s.account_id]
    mall = ctx.malls[rating.mall_id]
    w = Wallet(s, rating, ctx.tariffs[rating.tariff_id], mall.tz, frozenset(mall.holidays), out)
    events: list[tuple[int, int, str, Any]] = []
    if ch is not None:
        cols = ch.select("end_ms", "amount_n", "entry_id", "circuit_id", "meter_id", "start_ms", "energy_wh",
                         "period", "tier", "price_u", "estimated").get_columns()
        for r in zip(*(c.to_list() for c in cols), strict=True):
            events.append((r[0], 1, r[2], Charge(*r)))
    for r in (pay.iter_rows(named=True) if pay is not None else ()):
        events.append((r["ts_ms"], 0, r["payment_id"], Payment(
            r["payment_id"], r["ts_ms"], r["amount_minor"], r["kind"], r["reverses_payment_id"])))
    for _, kind, _, ev in sorted(events, key=lambda e: (e[0], e[1], e[2])):
        if kind:
            w.charge(ev)
        else:
            w.payment(ev)


def tick(state: CoreState, now_ms: int, ctx: RatingContext) -> tuple[CoreState, BatchOutputs]:
    """Timer step: re-check trips deferred by friendly-credit periods (see wallet.evaluate_deferred)."""
    accounts = dict(state.accounts)
    out = WalletOut()
    for a, s in state.accounts.items():
        if (s.deferred or s.warn_pending) and a in ctx.accounts:
            r = ctx.accounts[a]
            m = ctx.malls[r.mall_id]
            accounts[a], o = evaluate_deferred(s, now_ms, r, ctx.tariffs[r.tariff_id], m.tz, frozenset(m.holidays))
            out.ledger += o.ledger
            out.alerts += o.alerts
            out.commands += o.commands
    return CoreState(dict(state.circuits), accounts), BatchOutputs(
        pl.DataFrame(schema={**INTERVAL_SCHEMA, "account_id": pl.String}), pl.DataFrame(schema=RATED_SCHEMA),
        pl.DataFrame(out.ledger, schema=LEDGER_SCHEMA), _alerts(out.alerts),
        pl.DataFrame(out.commands, schema=COMMAND_SCHEMA), pl.DataFrame(schema=REJECT_SCHEMA),
        pl.DataFrame(schema=PAYMENT_REJECT_SCHEMA))
