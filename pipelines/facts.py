"""Interval energies of one billing step as warehouse facts (pure, no Kafka).

The core's intervals (the energy it billed, with its flags) and marker rows for the readings
it refused as late or spike become one frame with schemas.intervals.INTERVAL_COLUMNS, ordered
by account, so that the billing step can pack each account's rows into the outbox of that
account's own state record (effects once, like the ledger). Every conversion runs once per
step over the whole frame, never per account.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipelines.context import BillingContext
from pipelines.core.interval import CircuitState
from schemas.intervals import INTERVAL_COLUMNS, MARKER_REASONS


def interval_facts(intervals: pl.DataFrame, rejected: pl.DataFrame, circuits: dict[str, CircuitState],
                   ctx: BillingContext) -> pl.DataFrame:
    """Facts of one step: `intervals` (INTERVAL_SCHEMA + account_id, the core's output),
    `rejected` (REJECT_SCHEMA), `circuits` the circuit states AFTER the step (their
    billed_wh is the billed total after the circuit's last interval of the step)."""
    parts = []
    if intervals.height:
        parts.append(_billed(intervals, circuits, ctx))
    if rejected.height:
        markers = _markers(rejected, ctx)
        if markers.height:
            parts.append(markers)
    if not parts:
        return pl.DataFrame(schema=INTERVAL_COLUMNS)
    frame = parts[0] if len(parts) == 1 else pl.concat(parts)
    return frame.sort(["account_id", "circuit_id", "end_ms", "start_ms"], maintain_order=True)


def _billed(intervals: pl.DataFrame, circuits: dict[str, CircuitState], ctx: BillingContext) -> pl.DataFrame:
    iv = intervals.sort(["circuit_id", "end_ms"], maintain_order=True)
    energy = iv["energy_wh"].to_numpy().astype(np.int64)
    runs = iv["circuit_id"].rle().struct.unnest()
    lengths = runs["len"].to_numpy().astype(np.int64)
    final = np.array([circuits[c].billed_wh for c in runs["value"].to_list()], dtype=np.int64)
    # billed total after row i of a circuit's run [a, b): final - (energy of rows i+1 .. b-1)
    csum = np.cumsum(energy)
    last = np.repeat(np.cumsum(lengths) - 1, lengths)
    total = np.repeat(final, lengths) - (csum[last] - csum)
    accounts = iv["account_id"]
    malls = _malls(accounts, ctx)
    return pl.DataFrame({
        "circuit_id": iv["circuit_id"], "meter_id": iv["meter_id"], "account_id": accounts, "mall_id": malls,
        "start_ms": iv["start_ms"], "end_ms": iv["end_ms"], "energy_wh": energy, "billed_total_wh": total,
        "estimated": iv["estimated"].fill_null(False), "flag": iv["flag"].fill_null(""),
    }, schema=INTERVAL_COLUMNS)


def _malls(accounts: pl.Series, ctx: BillingContext) -> list[str]:
    runs = accounts.rle().struct.unnest()
    out: list[str] = []
    for account, n in zip(runs["value"].to_list(), runs["len"].to_list(), strict=True):
        out += [ctx.account_mall.get(account, "")] * n
    return out


def _markers(rejected: pl.DataFrame, ctx: BillingContext) -> pl.DataFrame:
    """Marker rows (energy 0, start = end = the reading's time) for late and spike readings of
    known circuits: where billing refused a reading, so analysts see it next to the energy."""
    rows: list[tuple[Any, ...]] = []
    for circuit, meter, ts, reason in zip(rejected["circuit_id"].to_list(), rejected["meter_id"].to_list(),
                                          rejected["ts_ms"].to_list(), rejected["reason"].to_list(), strict=True):
        kind = str(reason).split(":", 1)[0]
        route = ctx.circuit_meter.get(circuit) if kind in MARKER_REASONS else None
        if route is None:
            continue
        rows.append((circuit, meter, route.account_id, route.mall_id, ts, ts, 0, 0, False, kind))
    return pl.DataFrame(rows, schema=INTERVAL_COLUMNS, orient="row")
