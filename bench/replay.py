"""`mallwatt bench replay --merchants N --days D --json`: offline replay speed and memory.

Writes a synthetic portfolio of N merchants and D days of 15-minute readings (one per
circuit, in arrival order: one message per shard and cadence, with partition, offset and
msg_ts_ms as `mallwatt export-input` writes them) plus one top-up for a tenth of the
merchants each day, then times `mallwatt replay --arrival-order [--jobs N]` in a child process.
Input generation is not timed (`--keep DIR` keeps it, `--input DIR` replays a kept one). The JSON
gives `jobs`, `readings_per_s`, `cpu_s` (the replay and its jobs, all threads), `peak_rss_mb`
(the largest process's peak) and `peak_rss_sum_mb` (the sum of every process's peak), each
process's figures and `merge_s` (from the last job's end to the merged outputs). Targets
(35,000 merchants): peak RSS for 7 days within 1.2x of 1 day, and >= 300,000 readings/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipelines.generate import generate
from pipelines.portfolio import dump_portfolio, parse_portfolio
from pipelines.roster import write_tables
from schemas.keys import account_shard

T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00
CADENCE_MS = 900_000
PER_DAY = 96


def write_input(merchants: int, days: int, out: Path, partitions: int = 8, seed: int = 7,
                low_balance_share: float = 0.2) -> dict[str, int]:
    stalls = min(merchants, 700)
    malls = math.ceil(merchants / stalls)
    data = generate(malls, stalls, seed=seed, low_balance_share=low_balance_share)
    dump_portfolio(data, out / "portfolio.yaml")
    # the same portfolio as rules plus roster tables, the form a large portfolio is kept in
    # (docs/roster.md): replay loads it in about a second instead of parsing 13 MB of YAML
    write_tables(data, out / "portfolio", "parquet")
    portfolio = parse_portfolio(data)
    meters = [(m.circuits[0].id, m.id, m.account or f"{mall.id}-LANDLORD") for mall, m in portfolio.meters()]
    circuits = pl.DataFrame({"circuit_id": [c for c, _, _ in meters], "meter_id": [m for _, m, _ in meters],
                             "partition": [account_shard(a, partitions) for _, _, a in meters]}
                            ).sort("partition", "circuit_id")
    n = circuits.height
    rng = np.random.default_rng(seed)
    register = rng.uniform(100, 5000, n)
    writer: pq.ParquetWriter | None = None
    for day in range(days):
        steps = []
        for k in range(PER_DAY):
            step = day * PER_DAY + k
            register = register + rng.uniform(0, 2.5, n)
            ts = T0 + step * CADENCE_MS
            steps.append(circuits.with_columns(ts_ms=pl.lit(ts, pl.Int64), import_kwh=pl.Series(np.round(register, 2)),
                                               offset=pl.lit(step, pl.Int64),
                                               msg_ts_ms=pl.lit(ts + 2_000, pl.Int64)))
        frame = pl.concat(steps).select("circuit_id", "meter_id", "ts_ms", "import_kwh", "partition", "offset",
                                        "msg_ts_ms")
        table = frame.to_arrow()
        writer = writer or pq.ParquetWriter(out / "readings.parquet", table.schema)
        writer.write_table(table, row_group_size=200_000)
    assert writer is not None
    writer.close()
    accounts = [m.id for mall in portfolio.malls for m in mall.merchants]
    pays = []
    for day in range(days):
        for i, account in enumerate(rng.choice(accounts, max(1, len(accounts) // 10), replace=False).tolist()):
            ts = T0 + day * 86_400_000 + int(rng.integers(0, 86_400_000))
            pays.append({"payment_id": f"bench-{day}-{i}", "account_id": account, "kind": "topup",
                         "amount_minor": int(rng.integers(5_000, 50_000)), "ts_ms": ts,
                         "reverses_payment_id": None, "partition": i % partitions, "offset": day * 100_000 + i,
                         "msg_ts_ms": ts + 1_000})
    pl.DataFrame(pays).write_parquet(out / "payments.parquet")
    return {"readings": n * PER_DAY * days, "payments": len(pays), "circuits": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt bench replay", description=__doc__.splitlines()[0])
    ap.add_argument("--merchants", type=int, default=35_000)
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--batch-size", type=int, help="rows per core call (default: mallwatt replay's)")
    ap.add_argument("--low-balance-share", type=float, default=0.2,
                    help="share of merchants opening with 5..20 yuan (generate's default 0.2): they run out of "
                         "credit within hours and every charge of theirs then takes the wallet's per-event path")
    ap.add_argument("--jobs", type=int, help="mallwatt replay --jobs (default: its default, 1; 0: the usable cores)")
    ap.add_argument("--input", help="a directory an earlier --keep wrote: replay its input instead of writing one")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", help="directory for the input and outputs (default: a temporary one)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mallwatt-bench-replay-") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if a.input:  # a kept input (its sizes file): alternate runs on the very same rows
            src = Path(a.input)
            sizes = json.loads((src / "sizes.json").read_text())
        else:
            src = work
            sizes = write_input(a.merchants, a.days, work, low_balance_share=a.low_balance_share)
            (work / "sizes.json").write_text(json.dumps(
                {**sizes, "merchants": a.merchants, "days": a.days, "low_balance_share": a.low_balance_share}))
        cmd = [sys.executable, "-m", "pipelines.cli", "replay", "--arrival-order", "--quiet", "--config",
               str(src / "portfolio"), "--readings", str(src / "readings.parquet"), "--payments",
               str(src / "payments.parquet"), "--out", str(work / "out")]
        cmd += ["--batch-size", str(a.batch_size)] if a.batch_size else []
        cmd += ["--jobs", str(a.jobs)] if a.jobs else []
        usage_file = work / "usage.json"
        env = {**os.environ, "MALLWATT_REPLAY_USAGE": str(usage_file)}
        usage_file.unlink(missing_ok=True)
        began = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # CPU: the replay and the jobs it waited for
        seconds = time.perf_counter() - began
        out = child.stdout.read().decode() if child.stdout else ""
        if status != 0:
            print(f"mallwatt bench replay: replay failed ({status}): {out}", file=sys.stderr)
            return 1
        # one process (--jobs 1) or the parent (job 0) and its children: each process's peak RSS
        procs = json.loads(usage_file.read_text())["processes"] if usage_file.exists() else [
            {"job": 0, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}]
        merge_s = json.loads(usage_file.read_text())["merge_s"] if usage_file.exists() else 0.0
    from pipelines.core.replay import BATCH_ROWS

    result = {"merchants": a.merchants, "days": a.days, "batch_rows": a.batch_size or BATCH_ROWS,
              # a kept input's own figures win
              "low_balance_share": a.low_balance_share, **sizes, "seconds": round(seconds, 2),
              "jobs": len(procs), "readings_per_s": round(sizes["readings"] / seconds),
              # peak RSS: the largest process's peak (what one process needs) and the sum of every
              # process's peak (an upper bound on the machine's memory for the run: the peaks need
              # not coincide); equal with one job
              "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
              "peak_rss_sum_mb": round(sum(p["peak_rss_mb"] for p in procs), 1), "processes": procs,
              "merge_s": merge_s,
              # the child's CPU time (all its threads): steadier than wall time on a shared machine
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
              "readings_per_cpu_s": round(sizes["readings"] / max(usage.ru_utime + usage.ru_stime, 1e-9)),
              "outputs": json.loads(out.strip().splitlines()[-1]), "load_average": os.getloadavg()[0]}
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0
