"""Synthetic input for the effects-once proof: a portfolio, readings messages and payments.

Shaped like live input: every circuit reads once per cadence, a collector publishes one
message per shard and cadence, and a window's payments (some re-sent by the provider) arrive
after the window's readings, so a payment is often older than readings billed before it
(arrival order differs from time order). A few late readings (older than the lateness
window) and one re-sent readings message are mixed in: the stream refuses them as late or
duplicate, and replay in arrival order must do the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas.keys import account_shard

T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00
CADENCE_MS = 900_000
LATENESS_MS = CADENCE_MS  # the portfolio's billing.lateness_ms: one cadence of stragglers


@dataclass
class Window:
    """What a collector and the payment provider publish in one window, in that order."""

    readings: list[tuple[int, pl.DataFrame]] = field(default_factory=list)  # (shard, frame) per message
    payments: list[dict[str, Any]] = field(default_factory=list)  # in publishing order, re-sends included


@dataclass
class ProofInput:
    portfolio: dict[str, Any]
    windows: list[Window]

    @property
    def readings_count(self) -> int:
        return sum(f.height for w in self.windows for _, f in w.readings)

    @property
    def payment_ids(self) -> set[str]:
        return {p["payment_id"] for w in self.windows for p in w.payments}


def make_input(malls: int, stalls: int, cadences: int, *, per_window: int = 2, partitions: int = 8, seed: int = 17,
               prefix: str = "M", late: int = 6) -> ProofInput:
    data = generate(malls, stalls, seed=seed, mall_prefix=prefix)
    data["billing"] = {"lateness_ms": LATENESS_MS}
    rng = random.Random(seed)
    for mall in data["malls"]:  # many run out of credit: trips, reconnects, emergency credit
        for merchant in mall["merchants"]:
            if rng.random() < 0.4:
                merchant["opening_balance_minor"] = rng.randint(300, 1500)
    portfolio = parse_portfolio(data)
    meters = [(mall.id, meter, meter.account or f"{mall.id}-LANDLORD") for mall, meter in portfolio.meters()]
    register = {m.id: rng.uniform(100, 5000) for _, m, _ in meters}
    shard_of = {a: account_shard(a, partitions) for _, _, a in meters}
    merchants = [m for mall in portfolio.malls for m in mall.merchants]
    windows: list[Window] = []
    sent: list[tuple[int, pl.DataFrame]] = []
    for start in range(0, cadences, per_window):
        window = Window()
        for step in range(start, min(start + per_window, cadences)):
            ts = T0 + step * CADENCE_MS
            rows: dict[int, list[tuple[Any, ...]]] = {}
            for mall_id, meter, account in meters:
                del mall_id
                register[meter.id] += rng.uniform(0.0, 2.5) * min(meter.max_kw, 60.0) / 15
                rows.setdefault(shard_of[account], []).append(
                    (meter.circuits[0].id, meter.id, account, ts, round(register[meter.id], 2)))
            for shard in sorted(rows):
                window.readings.append((shard, _frame(rows[shard])))
        if start >= 4 * per_window and late:  # stragglers older than the lateness window
            old_ts = T0 + (start - 3 * per_window) * CADENCE_MS
            for _, meter, account in rng.sample(meters, late):
                window.readings.append((shard_of[account], _frame(
                    [(meter.circuits[0].id, meter.id, account, old_ts, round(register[meter.id] - 5.0, 2))])))
            window.readings.append(rng.choice(sent))  # a collector re-sends a spooled batch
        sent += window.readings
        end = T0 + min(start + per_window, cadences) * CADENCE_MS - CADENCE_MS
        for merchant in rng.sample(merchants, max(1, len(merchants) // 8)):
            payment = {"payment_id": f"{merchant.id}-w{start}", "account_id": merchant.id, "kind": "TOPUP",
                       "amount_minor": rng.randint(500, 6000), "ts_ms": rng.randint(T0 + start * CADENCE_MS, end),
                       "provider": "sim", "reverses_payment_id": None}  # as the portal's webhook sends it
            window.payments.append(payment)
            if rng.random() < 0.3:  # the provider's webhook retried
                window.payments.append(dict(payment))
        windows.append(window)
    return ProofInput(data, windows)


def _frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    return pl.DataFrame(rows, orient="row", schema={"circuit_id": pl.String, "meter_id": pl.String,
                                                   "account_id": pl.String, "ts_ms": pl.Int64,
                                                   "import_kwh": pl.Float64})
