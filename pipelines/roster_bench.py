"""`mallwatt bench roster --merchants N --json`: how long a large portfolio takes to load, and
how long the event loop pauses while one merchant's row changes and the worker reloads.

config_load_s: read and validate the directory (portfolio.yaml plus CSV tables) and build
the BillingContext, cold. config_warm_s: fill the lookups the first batch needs (the
core's Lookup, circuit routes). config_change_stall_ms: the longest gap between ticks of a
1 ms asyncio ticker while merchants.csv changes one row and ContextHolder.reload_in_background
rebuilds, swaps, and the stream touches the new context.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipelines.config_holder import ContextHolder, warm
from pipelines.context import build_context
from pipelines.generate import generate_tables
from pipelines.roster import load_config

TICK_S = 0.001
NEW_MULTIPLIER = "1.25"


def edit_merchant(table: Path, merchant_id: str, column: str, value: str) -> None:
    """Rewrite one cell of merchants.csv the way an export job does: a new file, then rename."""
    text = table.read_text(encoding="utf-8")
    header = next(csv.reader([text[:text.index("\n")]]))
    at = text.find(f",{merchant_id},")
    if at < 0:
        raise KeyError(f"{table}: no merchant {merchant_id!r}")
    start, end = text.rindex("\n", 0, at) + 1, text.index("\n", at)
    row = next(csv.reader([text[start:end]]))
    row[header.index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row)
    tmp = table.with_suffix(".tmp")
    tmp.write_text(text[:start] + out.getvalue() + text[end:], encoding="utf-8")
    os.replace(tmp, table)


async def _stalls(holder: ContextHolder, merchant_id: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.2)
    idle = max(gaps)
    gaps.clear()
    t0 = time.perf_counter()
    changed = await holder.reload_in_background()
    reload_s = time.perf_counter() - t0
    ctx = holder.current()  # what the worker's next batch does with the new context
    ctx.bucket_of(merchant_id)
    _ = ctx.circuit_routes.height, ctx.account_meters.get(merchant_id), ctx.load_limits.get(merchant_id)
    await asyncio.sleep(0.2)
    done.set()
    await task
    return {"changed": changed, "reload_s": reload_s, "stall_s": max(gaps), "idle_stall_s": idle,
            "ticks": len(gaps), "multiplier": str(ctx.accounts[merchant_id].price_multiplier)}


def measure(merchants: int, *, stalls: int = 700, partitions: int = 12) -> dict[str, Any]:
    """Build a portfolio of about `merchants` merchants (malls of `stalls`) in a temp dir and measure."""
    malls = max(1, math.ceil(merchants / max(1, stalls)))
    stalls = max(1, math.ceil(merchants / malls))
    with tempfile.TemporaryDirectory(prefix="mallwatt-roster-") as tmp:
        t0 = time.perf_counter()
        folder = generate_tables(Path(tmp) / "portfolio", malls, stalls)
        generate_s = time.perf_counter() - t0
        gc.collect()
        gc.disable()  # as ContextHolder builds (pipelines/config_holder.py)
        try:
            t0 = time.perf_counter()
            ctx = build_context(load_config(folder), partitions)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm(ctx)
            warm_s = time.perf_counter() - t0
        finally:
            gc.enable()
        del ctx
        holder = ContextHolder(folder, partitions)
        target = f"M{malls // 2 + 1:02d}-S{stalls // 2 + 1:04d}"
        before = str(holder.current().accounts[target].price_multiplier)
        edit_merchant(folder / "merchants.csv", target, "price_multiplier", NEW_MULTIPLIER)
        run = asyncio.run(_stalls(holder, target))
    return {"merchants": malls * stalls, "malls": malls, "stalls": stalls,
            "circuits": len(holder.current().rating.circuits), "generate_s": round(generate_s, 2),
            "config_load_s": round(load_s, 2), "config_warm_s": round(warm_s, 2),
            "config_change_stall_ms": round(run["stall_s"] * 1000, 1),
            "idle_stall_ms": round(run["idle_stall_s"] * 1000, 1), "reload_s": round(run["reload_s"], 2),
            "change_visible": run["changed"] and Decimal(run["multiplier"]) == Decimal(NEW_MULTIPLIER)
            and Decimal(before) != Decimal(NEW_MULTIPLIER),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mallwatt bench roster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--merchants", type=int, default=35_000, help="portfolio size (default %(default)s)")
    parser.add_argument("--stalls", type=int, default=700, help="merchants per mall (default %(default)s)")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    result = measure(args.merchants, stalls=args.stalls, partitions=args.partitions)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
