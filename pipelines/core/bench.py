"""Throughput of interval + tariff + wallet on one core, over a realistic batch.

    python -m pipelines.core.bench [--json] [--circuits 1000] [--readings 100] [--batches 4]
                                   [--step-min 15] [--compare] [--low-share 0.02]
                                   [--live-accounts 35000] [--live-calls 8] [--live-cadence-s 900]
    python -m pipelines.core.bench --small [--steps 100]   # per-message cost in the stream

Batch shape: ``circuits`` circuits (one account each, one mall in Asia/Shanghai) x ``readings``
register readings per circuit at ``step-min`` steps (one batch = readings * step minutes of
data, so 100 x 15 min crosses a local midnight), Guangdong commercial TOU tariff with July
critical peak and a daily standing charge, alert levels 5000/1000. A ``low-share`` of the
accounts start with little credit, so they cross alert levels and run the per-event wallet; the
rest take the vectorised fast path. Times are best-of the batches after the first.

``--compare`` also runs the frozen pre-optimisation core (`pipelines.core.legacy`) on the same
batches in the same process, checks that both give identical outputs and state, and reports
the speed-up as a ratio (the machine is shared: compare within one run, not across runs).

Two shapes in one JSON: the top-level figures are this batch shape (many readings per account
per call: per-account work is amortised); ``live`` is the shape production input has, each of
``live-accounts`` circuits exactly once per call with the state carried between calls (see
`bench_live`), where the cost is per account touched (``us_per_account``). ``--live-accounts 0``
skips it.

``--small`` measures the other regime, the stream's per-message cost: see `bench_small`.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import polars as pl

from pipelines.core import engine
from pipelines.core.context import RatingContext
from pipelines.core.models import (
    AccountRating,
    CircuitConfig,
    CriticalPeak,
    Mall,
    Season,
    Tariff,
    TariffVersion,
    WalletPolicy,
)

CN = timezone(timedelta(hours=8))
T0 = int(datetime(2024, 7, 1, tzinfo=CN).timestamp() * 1000)  # Monday, critical-peak month
GD = Tariff(id="gd-commercial-2021", versions=[TariffVersion(
    effective_from=datetime(2021, 1, 1, tzinfo=CN),
    prices={"peak": "170", "flat": "100", "valley": "38"},  # 1.7 : 1 : 0.38 fen/kWh * 100
    weekday=[Season(hours="VVVVVVVV FF PP FF PPPPP FFFFF")],
    critical_peak=[CriticalPeak(months=[7, 8, 9], hours=[11, 15, 16], uplift_pct=25)],
    standing_charge_per_day=300)])


def portfolio(n: int) -> RatingContext:
    pol = WalletPolicy(alert_levels=[5000, 1000], cutoff=-2000)
    acc = {f"a{i}": AccountRating(account_id=f"a{i}", mall_id="m", tariff_id=GD.id, policy=pol) for i in range(n)}
    cir = {f"c{i}": CircuitConfig(circuit_id=f"c{i}", account_id=f"a{i}") for i in range(n)}
    return RatingContext(cir, acc, {GD.id: GD}, {"m": Mall(mall_id="m", tz="Asia/Shanghai")}, lateness_ms=60_000)


def topups(n: int, low_share: float) -> list[dict[str, Any]]:
    """Most accounts get plenty of credit; every 1/low_share-th starts just above the alert levels."""
    every = max(1, round(1 / low_share)) if low_share > 0 else n + 1
    return [{"payment_id": f"p{i}", "account_id": f"a{i}", "ts_ms": T0 - 3_600_000,
             "amount_minor": 6_000 if i % every == 0 else 100_000_000} for i in range(n)]


def batch(n: int, per: int, k: int, step_ms: int, rng: np.random.Generator, reg_wh: np.ndarray) -> pl.DataFrame:
    """``per`` readings for each of ``n`` circuits; ``reg_wh`` (registers in Wh) advances in place."""
    ts = T0 + (k * per + np.arange(per)) * step_ms
    wh = reg_wh[:, None] + np.cumsum(rng.integers(0, 14_000 * step_ms // 3_600_000, size=(n, per)), axis=1)
    reg_wh[:] = wh[:, -1]
    return pl.DataFrame({"circuit_id": np.repeat([f"c{i}" for i in range(n)], per),
                         "meter_id": np.repeat([f"m{i}" for i in range(n)], per),
                         "ts_ms": np.tile(ts, n), "import_kwh": (wh / 1000).ravel()})


def batches(a: argparse.Namespace) -> list[pl.DataFrame]:
    rng = np.random.default_rng(7)
    reg = np.full(a.circuits, 1_000_000, dtype=np.int64)
    step = a.step_min * 60_000
    return [batch(a.circuits, 1, -1, step, rng, reg)] + [
        batch(a.circuits, a.readings, k, step, rng, reg) for k in range(a.batches)]


def run(process: Any, state: Any, bs: list[pl.DataFrame], top: list[dict[str, Any]], ctx: RatingContext,
        stages: bool = False) -> tuple[list[float], list[dict[str, float]], list[Any], Any]:
    state, _ = process(state, bs[0], top, ctx)  # warm-up: baselines and credit
    times, splits, outs = [], [], []
    for b in bs[1:]:
        split: dict[str, float] = {}
        t, c = time.perf_counter(), time.process_time()
        state, out = process(state, b, None, ctx, **({"timings": split} if stages else {}))
        times.append(time.perf_counter() - t)
        split["cpu"] = time.process_time() - c
        splits.append(split)
        outs.append(out)
    return times, splits, outs, state


def same(a: Any, b: Any) -> bool:
    frames = ("intervals", "rated", "ledger", "alerts", "commands", "rejected_readings", "rejected_payments")
    return all(getattr(a, f).equals(getattr(b, f)) for f in frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt-core-bench")
    ap.add_argument("--json", action="store_true", help="JSON output (the only format; accepted for the CLI)")
    ap.add_argument("--circuits", type=int, default=1000)
    ap.add_argument("--readings", type=int, default=100)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--step-min", type=int, default=15)
    ap.add_argument("--low-share", type=float, default=0.02)
    ap.add_argument("--compare", action="store_true", help="also run the pre-optimisation core, same batches")
    ap.add_argument("--small", action="store_true", help="per-message cost of process_batch + process_load")
    ap.add_argument("--steps", type=int, default=100, help="--small: messages (time steps) timed")
    ap.add_argument("--live-accounts", type=int, default=35_000, help="live shape: accounts (0: skip)")
    ap.add_argument("--live-calls", type=int, default=8, help="live shape: calls (one reading per circuit each)")
    ap.add_argument("--live-cadence-s", type=int, default=900, help="live shape: seconds between readings")
    ap.add_argument("--live-pay-share", type=float, default=0.005, help="live shape: accounts topping up per call")
    a = ap.parse_args(argv)
    if a.small:
        from pipelines.core.bench_small import run_small
        print(json.dumps(run_small(steps=a.steps)))
        return 0
    bs, top = batches(a), topups(a.circuits, a.low_share)
    n = a.circuits * a.readings
    times, splits, outs, state = run(engine._process_batch, engine.CoreState(), bs, top, portfolio(a.circuits), True)
    best = min(range(len(times)), key=lambda i: times[i] if i or len(times) == 1 else float("inf"))
    fast = sum(1 for s in state.accounts.values() if s.fired_levels == [])
    res: dict[str, Any] = {
        "readings_per_s": round(n / times[best]),
        # CPU time of this process in the same batch: steadier than wall time on a shared machine
        "cpu_readings_per_s": round(n / splits[best]["cpu"]),
        "batch": {"circuits": a.circuits, "readings_per_circuit": a.readings, "readings": n,
                  "step_min": a.step_min, "tariff": GD.id + " (TOU, critical peak, standing charge)",
                  "alert_levels": [5000, 1000], "accounts_low_credit": a.circuits - fast},
        "polars_threads": pl.thread_pool_size(),  # POLARS_MAX_THREADS=1 for a strict one-core figure
        "batch_s": [round(x, 4) for x in times],
        "stage_s": {k: round(v, 4) for k, v in splits[best].items() if k != "cpu"},
        "ledger_entries_per_batch": [o.ledger.height for o in outs],
    }
    if a.compare:
        from pipelines.core.legacy import engine as legacy
        ltimes, _, louts, lstate = run(legacy.process_batch, legacy.CoreState(), bs, top, portfolio(a.circuits))
        lbest = min(ltimes[1:] or ltimes)
        res["legacy"] = {"readings_per_s": round(n / lbest), "batch_s": [round(x, 4) for x in ltimes]}
        res["speedup"] = round(lbest / times[best], 2)
        res["identical_outputs"] = all(same(x, y) for x, y in zip(outs, louts, strict=True)) \
            and state.to_dict() == lstate.to_dict()
    if a.live_accounts > 0:
        from pipelines.core.bench_live import live_report
        res["live"] = live_report(a.live_accounts, a.live_calls, a.live_cadence_s, a.low_share, a.live_pay_share)
        res["shapes"] = {"batch_readings_per_s": res["readings_per_s"],
                         "live_readings_per_s": res["live"]["readings_per_s"],
                         "live_us_per_account": res["live"]["us_per_account"]}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
