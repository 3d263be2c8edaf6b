"""Ledger postings decided outside the wallet (common-area shares, adjustments, debt movements).

A posting goes through the account's wallet like any debit or credit, so alert levels, trips
and reconnects apply; its entry id is final, so a posting delivered twice moves money once.
"""

from __future__ import annotations

from typing import Any

from pipelines.core import cols
from pipelines.core.context import RatingContext
from pipelines.core.engine import (
    COMMAND_SCHEMA,
    LEDGER_SCHEMA,
    PAYMENT_REJECT_SCHEMA,
    BatchOutputs,
    CoreState,
    _alerts,
    tick,
)
from pipelines.core.wallet import Posting, Wallet, WalletOut, open_account


def apply_postings(state: CoreState, postings: list[dict[str, Any]], ctx: RatingContext
                   ) -> tuple[CoreState, BatchOutputs]:
    """Postings in (ts_ms, entry_id) order -> new state and outputs (ledger, alerts, commands, rejects)."""
    accounts = dict(state.accounts)
    out = WalletOut()
    for p in sorted(postings, key=lambda r: (r["ts_ms"], r["entry_id"])):
        account = p["account_id"]
        if account not in ctx.accounts:
            out.rejected.append({"payment_id": p["entry_id"], "account_id": account, "ts_ms": p["ts_ms"],
                                 "amount_minor": p["amount_minor"], "kind": p["kind"], "reason": "unknown_account"})
            continue
        rating = ctx.accounts[account]
        mall = ctx.malls[rating.mall_id]
        tariff, holidays = ctx.tariffs[rating.tariff_id], frozenset(mall.holidays)
        s = accounts[account].copy() if account in accounts else open_account(
            rating, tariff, mall.tz, holidays, int(p["ts_ms"]), out)
        accounts[account] = s
        Wallet(s, rating, ctx.tariffs[rating.tariff_id], mall.tz, frozenset(mall.holidays), out).posting(
            Posting(p["entry_id"], p["kind"], int(p["amount_minor"]), int(p["ts_ms"]), p["source_id"], p.get("rate")))
    _, empty = tick(CoreState(), 0, ctx)  # the output frames' shapes, with no rows

    outputs = BatchOutputs(
        intervals=empty.intervals, rated=empty.rated,
        ledger=cols.frame_from_rows(LEDGER_SCHEMA, out.ledger), alerts=_alerts(out.alerts),
        commands=cols.frame_from_rows(COMMAND_SCHEMA, out.commands), rejected_readings=empty.rejected_readings,
        rejected_payments=cols.frame_from_rows(PAYMENT_REJECT_SCHEMA, out.rejected))
    return CoreState(dict(state.circuits), accounts), outputs
