"""Per-call cost of the stream's billing step on small messages (`bench core --small`).

The stream worker calls `process_batch` once per Kafka message and then
`loadcontrol.process_load`, with the state round-tripping through `CoreState.to_dict` /
`from_dict` between calls. Collectors flush about every second, one message per account shard,
so messages are small: here the readings of one shard of a generated 200-stall mall (8 shards,
~25 accounts) at one timestamp, over ``steps`` consecutive 15-minute steps (100 steps cross a
local midnight: standing charges). Opening top-ups are the generator's opening balances, so
about a fifth of the accounts run low and take the per-event wallet, and the mall's landlord
account (protected, no credit) always does.

Reported: median ms per message of process_batch + process_load (``ms_per_call``), each part,
and readings/s at that rate. Machine load varies: compare figures from one run.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import polars as pl

T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00, as bench/pipeline.py
STEP_MS = 900_000
PARTITIONS = 8
FRAME_SCHEMA: dict[str, Any] = {
    "circuit_id": pl.String, "meter_id": pl.String, "account_id": pl.String, "ts_ms": pl.Int64,
    "import_kwh": pl.Float64, "power_w": pl.Float64, "power_factor": pl.Float64, "relay": pl.UInt8,
}


def small_input(stalls: int, steps: int, shard: int) -> tuple[Any, list[pl.DataFrame], list[dict[str, Any]]]:
    """(BillingContext, one reading frame per step for one shard, opening top-ups)."""
    from pipelines.context import build_context
    from pipelines.generate import generate
    from pipelines.portfolio import parse_portfolio
    from schemas.keys import account_shard

    data = generate(1, stalls, seed=5, mall_prefix="B")
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
    portfolio = parse_portfolio(data)
    ctx = build_context(portfolio, PARTITIONS)
    rng = random.Random(1)
    circuits = [(m.circuits[0].id, m.id, m.account or f"{mall.id}-LANDLORD") for mall, m in portfolio.meters()]
    mine = [c for c in circuits if account_shard(c[2], PARTITIONS) == shard]
    registers = [rng.uniform(100, 9000) for _ in mine]
    frames = []
    for step in range(steps):
        registers = [r + rng.uniform(0.05, 0.6) for r in registers]
        frames.append(pl.DataFrame({
            "circuit_id": [c[0] for c in mine], "meter_id": [c[1] for c in mine], "account_id": [c[2] for c in mine],
            "ts_ms": [T0 + step * STEP_MS] * len(mine), "import_kwh": [round(r, 2) for r in registers],
            "power_w": [rng.uniform(100, 8000) for _ in mine], "power_factor": [rng.uniform(0.8, 1.0) for _ in mine],
            "relay": [0] * len(mine)}, schema=FRAME_SCHEMA))
    opening = {m["id"]: m["opening_balance_minor"] for m in data["malls"][0]["merchants"]}
    payments = [{"payment_id": f"open-{a}", "account_id": a, "kind": "topup", "amount_minor": opening[a],
                 "ts_ms": T0 - 1} for a in sorted({c[2] for c in mine}) if opening.get(a)]
    return ctx, frames, payments


def run_small(stalls: int = 200, steps: int = 100, shard: int = 0, warmup: int = 5) -> dict[str, Any]:
    from pipelines.core.engine import CoreState, process_batch
    from pipelines.loadcontrol import process_load

    ctx, frames, payments = small_input(stalls, steps + warmup, shard)
    state: dict[str, Any] = {}
    load: dict[str, Any] = {}
    core_s, load_s, cpu_s = [], [], []
    for i, f in enumerate(frames):
        s = CoreState.from_dict(state)
        c0, t0 = time.process_time(), time.perf_counter()
        new, _ = process_batch(s, f, payments if i == 0 else None, ctx.rating)
        t1 = time.perf_counter()
        load, _ = process_load(f, load, ctx.load_limits)
        t2, c2 = time.perf_counter(), time.process_time()
        state = new.to_dict()
        if i >= warmup:
            core_s.append(t1 - t0)
            load_s.append(t2 - t1)
            cpu_s.append(c2 - c0)
    per = [a + b for a, b in zip(core_s, load_s, strict=True)]
    ms = statistics.median(per) * 1000
    n = frames[0].height
    return {"ms_per_call": round(ms, 3), "readings_per_s": round(n / (ms / 1000)),
            "process_batch_ms": round(statistics.median(core_s) * 1000, 3),
            "process_load_ms": round(statistics.median(load_s) * 1000, 3),
            # CPU time of this process: steadier than wall time on a shared machine
            "cpu_ms_per_call": round(statistics.mean(cpu_s) * 1000, 3),
            "readings_per_message": n, "accounts": frames[0]["account_id"].n_unique(), "messages": len(per),
            "polars_threads": pl.thread_pool_size()}
