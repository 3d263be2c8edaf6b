"""Offline replay: re-run the billing core over recorded readings and payments.

    python -m pipelines.core.replay --config portfolio.yaml --readings r.parquet \
        --payments p.jsonl --out DIR [--tariff what_if.yaml] [--batch-size 100000]

Inputs are JSON Lines (``.jsonl``/``.json``) or Parquet with the columns documented in
`pipelines.core.engine`. Readings are replayed in time order in batches; payments join the batch
whose last reading is at or after them. Writes ledger, balances, alerts, commands and rejected
rows as Parquet (``--format jsonl`` for JSON Lines) plus the final state as JSON.
"""

from __future__ import annotations

import argparse
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from pipelines.core.context import RatingContext
from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import AccountRating, CircuitConfig, Mall, Tariff
from pipelines.core.wallet import AccountState


def context_from_values(tariffs: list[Any], malls: list[Any], accounts: list[Any], circuits: list[Any],
                        **kw: Any) -> RatingContext:
    """Adapter from already-loaded portfolio values (dicts or models) to a RatingContext."""
    def models(cls: Any, items: list[Any]) -> list[Any]:
        return [x if isinstance(x, cls) else cls.model_validate(x) for x in items]
    t, m = models(Tariff, tariffs), models(Mall, malls)
    a, c = models(AccountRating, accounts), models(CircuitConfig, circuits)
    return RatingContext({x.circuit_id: x for x in c}, {x.account_id: x for x in a}, {x.id: x for x in t},
                         {x.mall_id: x for x in m}, **kw)


def context_from_portfolio(p: Any, **kw: Any) -> tuple[RatingContext, CoreState]:
    """Adapter from `pipelines.portfolio.Portfolio`: the rating context plus an initial state
    holding each merchant's opening balance. Meters without an account (common areas) are not
    billed here."""
    malls, accounts, circuits = [], [], []
    state = CoreState()
    for mall in p.malls:
        malls.append(Mall(mall_id=mall.id, tz=mall.timezone, holidays=[d.isoformat() for d in mall.holidays]))
        for m in mall.merchants:
            level = p.level(m.level)
            upd: dict[str, Any] = {"protected": m.protected or level.policy.protected}
            if m.alert_levels is not None:
                upd["alert_levels"] = m.alert_levels
            accounts.append(AccountRating(account_id=m.id, mall_id=mall.id, tariff_id=m.tariff or mall.tariff,
                                          policy=level.policy.model_copy(update=upd),
                                          price_multiplier=Decimal(str(m.price_multiplier))))
            state.accounts[m.id] = AccountState(m.id, balance=m.opening_balance_minor)
        for meter in mall.meters:
            if meter.account is not None:
                circuits += [CircuitConfig(circuit_id=c.id, account_id=meter.account,
                                           max_kw=Decimal(str(meter.max_kw))) for c in meter.circuits]
    return context_from_values(list(p.tariffs), malls, accounts, circuits, **kw), state


def load_context(path: str) -> tuple[RatingContext, CoreState]:
    """A core-native YAML (top-level ``accounts`` and ``circuits``: see docs/billing.md), else the
    lead's portfolio format via `pipelines.portfolio.load_portfolio` (a YAML file or a directory
    with roster tables, docs/roster.md)."""
    doc = None if Path(path).is_dir() else yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and "accounts" in doc and "circuits" in doc:
        extra = {k: doc[k] for k in ("lateness_ms", "gap_ms") if k in doc}
        ctx = context_from_values(doc.get("tariffs", []), doc.get("malls", []), doc["accounts"],
                                  doc["circuits"], **extra)
        return ctx, CoreState()
    from pipelines.portfolio import load_portfolio

    return context_from_portfolio(load_portfolio(path))


def read_table(path: str | None) -> pl.DataFrame | None:
    if path is None:
        return None
    if path.endswith(".parquet"):
        return pl.read_parquet(path)
    return pl.read_ndjson(path)


def write_table(df: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        df.write_parquet(path.with_suffix(".parquet"))
    else:
        df.write_ndjson(path.with_suffix(".jsonl"))


def replay(ctx: RatingContext, readings: pl.DataFrame, payments: pl.DataFrame | None,
           batch_size: int = 100_000, state: CoreState | None = None) -> tuple[CoreState, dict[str, pl.DataFrame]]:
    readings = readings.sort("ts_ms", maintain_order=True)
    pays = payments.sort("ts_ms", maintain_order=True) if payments is not None else None
    state, acc = state or CoreState(), {k: [] for k in ("ledger", "alerts", "commands", "rejected_readings",
                                               "rejected_payments", "intervals")}
    n = readings.height
    starts = list(range(0, n, batch_size)) or [0]
    for i, s in enumerate(starts):
        batch = readings.slice(s, batch_size)
        last = i == len(starts) - 1
        p = None
        if pays is not None:
            upto = batch["ts_ms"].max() if not last and batch.height else None
            sel = pays if upto is None else pays.filter(pl.col("ts_ms") <= upto)
            p, pays = sel, (pays.filter(pl.col("ts_ms") > upto) if upto is not None else None)
        state, out = process_batch(state, batch, p, ctx, flush=last)
        for k in acc:
            acc[k].append(getattr(out, k))
    tables = {k: pl.concat(v, how="vertical_relaxed") for k, v in acc.items()}
    tables["balances"] = pl.DataFrame(
        [(a, s.balance, s.ec_owed, s.debt, s.relay) for a, s in sorted(state.accounts.items())], orient="row",
        schema={"account_id": pl.String, "balance_minor": pl.Int64, "ec_owed_minor": pl.Int64,
                "debt_minor": pl.Int64, "relay": pl.String})
    return state, tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt replay", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--readings", required=True)
    ap.add_argument("--payments")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tariff", help="YAML/JSON file with one tariff: re-rate every account under it")
    ap.add_argument("--batch-size", type=int, default=100_000)
    ap.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    a = ap.parse_args(argv)
    ctx, state0 = load_context(a.config)
    if a.tariff:
        ctx = ctx.with_tariff(Tariff.model_validate(yaml.safe_load(Path(a.tariff).read_text())))
    readings = read_table(a.readings)
    assert readings is not None
    state, tables = replay(ctx, readings, read_table(a.payments), a.batch_size, state0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        write_table(df, out / name, a.format)
    (out / "state.json").write_text(json.dumps(state.to_dict(), indent=1))
    print(json.dumps({k: v.height for k, v in tables.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
