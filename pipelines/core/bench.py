"""Throughput of interval + tariff + wallet on one core.

    python -m pipelines.core.bench [--circuits 1000] [--readings 100] [--batches 3]

Prints JSON with readings_per_s (best of the steady-state batches).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import polars as pl

from pipelines.core.context import RatingContext
from pipelines.core.engine import CoreState, process_batch
from pipelines.core.models import (
    AccountRating,
    CircuitConfig,
    Mall,
    Season,
    Tariff,
    TariffVersion,
    WalletPolicy,
)

T0 = 1_717_200_000_000  # 2024-06-01T00:00Z


def portfolio(n: int) -> RatingContext:
    t = Tariff(id="tou", versions=[TariffVersion(prices={"peak": "170", "flat": "100", "valley": "38"},
                                                 weekday=[Season(hours="VVVVVVVVFFPPFFPPPPPFFFFF")])])
    acc = {f"a{i}": AccountRating(account_id=f"a{i}", mall_id="m", tariff_id="tou",
                                  policy=WalletPolicy(alert_levels=[5000, 1000])) for i in range(n)}
    cir = {f"c{i}": CircuitConfig(circuit_id=f"c{i}", account_id=f"a{i}") for i in range(n)}
    return RatingContext(cir, acc, {"tou": t}, {"m": Mall(mall_id="m")}, lateness_ms=60_000)


def batch(n: int, per: int, k: int, rng: np.random.Generator, reg_wh: np.ndarray) -> pl.DataFrame:
    """``per`` readings for each of ``n`` circuits; ``reg_wh`` (registers in Wh) advances in place."""
    ts = T0 + (k * per + np.arange(per)) * 15_000  # one reading per 15 s per circuit
    wh = reg_wh[:, None] + np.cumsum(rng.integers(0, 60, size=(n, per)), axis=1)  # up to 14 kW
    reg_wh[:] = wh[:, -1]
    regs = wh / 1000
    return pl.DataFrame({"circuit_id": np.repeat([f"c{i}" for i in range(n)], per),
                         "meter_id": np.repeat([f"m{i}" for i in range(n)], per),
                         "ts_ms": np.tile(ts, n), "import_kwh": regs.ravel()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt-core-bench")
    ap.add_argument("--circuits", type=int, default=1000)
    ap.add_argument("--readings", type=int, default=100)
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args(argv)
    ctx, rng = portfolio(a.circuits), np.random.default_rng(7)
    reg = np.full(a.circuits, 1_000_000, dtype=np.int64)
    top = [{"payment_id": f"p{i}", "account_id": f"a{i}", "ts_ms": T0, "amount_minor": 10_000_000}
           for i in range(a.circuits)]
    state, _ = process_batch(CoreState(), batch(a.circuits, 1, -1, rng, reg), top, ctx)  # warm-up: baselines
    times, entries = [], 0
    for k in range(a.batches):
        b = batch(a.circuits, a.readings, k, rng, reg)
        t = time.perf_counter()
        state, out = process_batch(state, b, None, ctx)
        times.append(time.perf_counter() - t)
        entries += out.ledger.height
    n = a.circuits * a.readings
    print(json.dumps({"readings_per_s": round(n / min(times[1:] or times)), "batch_readings": n,
                      "batch_s": [round(x, 4) for x in times], "ledger_entries": entries}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
