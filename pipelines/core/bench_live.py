"""Live-shaped input for `process_batch` (`bench core`, the ``live`` block of its JSON).

Production input arrives every poll cadence: each call carries exactly one reading per circuit
(the next 15-minute or 60-second register value), and the state is carried from call to call.
So a call touches every account once, and the core's cost is per account touched, not per
reading (the ``batch`` shape of `bench` amortises per-account work over 100 readings).

Portfolio: ``accounts`` accounts with one circuit each, one mall in Asia/Shanghai, Guangdong TOU
with July critical peak, a daily standing charge and two tier blocks (the monthly counter
crosses 8 kWh after a few hours), alert levels 5000/1000 and cutoff 0. A ``low_share`` of the
accounts start with little credit, so during the run they cross alert levels and trip; every
call also carries top-ups for a rotating ``pay_share`` of the accounts (and every sixth call, half
the low-credit ones top up). The middle call crosses local midnight at the end of June
(standing charges, tier counters restart, critical-peak month), whatever the cadence. Times:
every call after the first two (baselines, then the first intervals); reported as the median,
readings/s and microseconds per account touched.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import polars as pl

from pipelines.core.context import RatingContext
from pipelines.core.models import (
    AccountRating,
    CircuitConfig,
    CriticalPeak,
    Mall,
    Season,
    Tariff,
    TariffVersion,
    TierBlock,
    WalletPolicy,
)

CN = timezone(timedelta(hours=8))
MIDNIGHT = int(datetime(2024, 7, 1, tzinfo=CN).timestamp() * 1000)  # local month end
GD_TIERED = Tariff(id="gd-commercial-tiered", versions=[TariffVersion(
    effective_from=datetime(2021, 1, 1, tzinfo=CN),
    prices={"peak": "170", "flat": "100", "valley": "38"},
    weekday=[Season(hours="VVVVVVVV FF PP FF PPPPP FFFFF")],
    critical_peak=[CriticalPeak(months=[7, 8, 9], hours=[11, 15, 16], uplift_pct=25)],
    tiers=[TierBlock(upto_kwh=8), TierBlock(adder="12.5")],
    standing_charge_per_day=300)])


def live_portfolio(n: int) -> RatingContext:
    pol = WalletPolicy(alert_levels=[5000, 1000], cutoff=0)
    acc = {f"a{i}": AccountRating(account_id=f"a{i}", mall_id="m", tariff_id=GD_TIERED.id, policy=pol)
           for i in range(n)}
    cir = {f"c{i}": CircuitConfig(circuit_id=f"c{i}", account_id=f"a{i}") for i in range(n)}
    return RatingContext(cir, acc, {GD_TIERED.id: GD_TIERED}, {"m": Mall(mall_id="m", tz="Asia/Shanghai")},
                         lateness_ms=60_000)


class LiveInput:
    """Reading frames (one reading per circuit per call) and each call's payments."""

    def __init__(self, n: int, calls: int, cadence_ms: int, low_share: float, pay_share: float,
                 seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.cadence_ms = n, cadence_ms
        self.circuits = pl.Series("circuit_id", [f"c{i}" for i in range(n)], dtype=pl.String)
        self.meters = pl.Series("meter_id", [f"m{i}" for i in range(n)], dtype=pl.String)
        every = max(1, round(1 / low_share)) if low_share > 0 else n + 1
        self.low = np.arange(0, n, every)
        reg = np.full(n, 1_000_000, dtype=np.int64)  # Wh
        max_wh = 14_000 * cadence_ms // 3_600_000  # up to 14 kW
        self.frames: list[pl.DataFrame] = []
        self.payments: list[list[dict[str, Any]]] = []
        pay_every = max(1, round(1 / pay_share)) if pay_share > 0 else n + 1
        for k in range(calls + 1):  # call 0: baselines and opening credit
            ts = MIDNIGHT + (k - 1 - calls // 2) * cadence_ms  # the middle call crosses midnight
            if k:
                reg = reg + rng.integers(0, max_wh + 1, size=n)
            self.frames.append(pl.DataFrame([self.circuits, self.meters, pl.Series("ts_ms", np.full(n, ts)),
                                             pl.Series("import_kwh", reg / 1000)]))
            pay: list[dict[str, Any]] = []
            if k == 0:
                low = {int(x): j for j, x in enumerate(self.low.tolist())}  # 5,600 down to 0 credit
                pay = [{"payment_id": f"open{i}", "account_id": f"a{i}", "ts_ms": ts - 1,
                        "amount_minor": 5_600 - low[i] % 8 * 800 if i in low else 100_000_000}
                       for i in range(n) if i not in low or low[i] % 8 < 7]
            else:
                for i in range(k % pay_every, n, pay_every):
                    pay.append({"payment_id": f"p{k}-{i}", "account_id": f"a{i}", "ts_ms": ts - 30_000,
                                "amount_minor": 2_000})
                if k % 6 == 0:  # half the low-credit accounts, tripped by now, top up
                    pay += [{"payment_id": f"rescue{k}-{i}", "account_id": f"a{i}", "ts_ms": ts - 20_000,
                             "amount_minor": 10_000} for i in self.low[::2].tolist()]
            self.payments.append(pay)


def run_live(process: Any, state: Any, inp: LiveInput, ctx: RatingContext, warm: int = 1,
             keep: bool = False) -> tuple[list[float], list[float], Any, list[Any], dict[str, int]]:
    """Feed every call through ``process``; (wall s, CPU s) of the calls after ``warm``, final
    state, (if ``keep``) the outputs of every call, and counts of what the calls produced."""
    times, cpu, outs = [], [], []
    made: dict[str, int] = {}
    for k, (frame, pay) in enumerate(zip(inp.frames, inp.payments, strict=True)):
        t, c = time.perf_counter(), time.process_time()
        state, out = process(state, frame, pay or None, ctx)
        if k > warm:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        if keep:
            outs.append(out)
        if k:
            for kind, x in out.ledger["kind"].value_counts().iter_rows():
                made[kind] = made.get(kind, 0) + x
            for key, f in (("alerts", out.alerts), ("commands", out.commands)):
                made[key] = made.get(key, 0) + f.height
    return times, cpu, state, outs, made


def live_report(n: int, calls: int, cadence_s: int, low_share: float, pay_share: float,
                compare: Any = None) -> dict[str, Any]:
    """The ``live`` block of `bench core`: ``compare`` (another process_batch, e.g. a frozen
    earlier core) is run on the same input right after, and the ratio reported."""
    from pipelines.core import engine

    inp = LiveInput(n, calls, cadence_s * 1000, low_share, pay_share)
    ctx = live_portfolio(n)
    times, cpu, state, _, made = run_live(engine.process_batch, engine.CoreState(), inp, ctx)
    med, med_cpu = statistics.median(times), statistics.median(cpu)
    res: dict[str, Any] = {
        "accounts": n, "readings_per_call": n, "calls_timed": len(times), "cadence_s": cadence_s,
        "tariff": GD_TIERED.id + " (TOU, critical peak, 2 tiers, standing charge)",
        "payments_per_call": round(statistics.mean(len(p) for p in inp.payments[2:])) if calls > 1 else 0,
        "readings_per_s": round(n / med), "cpu_readings_per_s": round(n / med_cpu),
        "us_per_account": round(med / n * 1e6, 2), "call_s": [round(x, 4) for x in times],
        "produced": dict(sorted(made.items())),  # over all calls after the first
        "accounts_tripped_at_end": sum(1 for s in state.accounts.values() if s.relay == "tripped"),
    }
    if compare is not None:
        ct, ccpu, _, _, _ = run_live(compare[0], compare[1](), inp, live_portfolio(n))
        cm = statistics.median(ct)
        res["compare"] = {"readings_per_s": round(n / cm), "cpu_readings_per_s": round(n / statistics.median(ccpu)),
                          "us_per_account": round(cm / n * 1e6, 2), "call_s": [round(x, 4) for x in ct]}
        res["speedup"] = round(cm / med, 2)
    return res
