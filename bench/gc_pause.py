"""The worker's garbage-collection pauses with a portfolio's envelopes cached (a harness).

`python -m bench.gc_pause --accounts 350000` fills a cache shaped like the worker's `parsed`
(account key -> (generation, Envelope) as the billing step leaves it: one account, one circuit,
load-control state, two outbox items), then
- times one full pass as `pipelines.gc_policy.StepCollector` made it every MALLWATT_GC_FULL_S
  on main (unfreeze, collect, freeze): the event loop's pause;
- runs `--steps` live-shaped steps through the current StepCollector (each replaces
  `--touched` envelopes, as a 32-message step at 350,000 merchants does) and reports the
  longest step exit, how many full passes ran and the frozen objects per cached envelope.
Prints one JSON line (milliseconds of `perf_counter`; the machine's load average with it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from pipelines.core.interval import CircuitState
from pipelines.core.wallet import AccountState
from pipelines.envelope import Envelope, OutboxItem
from pipelines.gc_policy import StepCollector


def worker_shaped(i: int, ts: int) -> Envelope:
    """One account's envelope as a live step leaves it in the worker's cache."""
    acc, circ = f"B{i % 90:02d}-S{i:06d}", f"B{i % 90:02d}-S{i:06d}-E1.1"
    load = {"load": {acc: {"circuits": {circ: {"ts": ts, "p": 3262.4 + i, "pf": 0.95, "mw": 3262419, "mm": False}},
                           "last_ts": ts, "over_since": None, "over_alerted": False, "trips": {}}}}
    env = Envelope({acc: AccountState(acc, 9_999_986 - i, 824_000_000, standing_day="2026-07-15", tier_month=202607,
                                      tier_wh=109)},
                   {circ: CircuitState(circ, circ[:-2], ts, 1_407_871 + i, ts, 0, 109, [])},
                   {"mallwatt.payments:5": 4242, "mallwatt.readings:5": i},
                   [OutboxItem("mallwatt.ledger#rows", acc.encode(), b"x" * 140),
                    OutboxItem("mallwatt.intervals#rows", acc.encode(), b"y" * 60)], 4, {}, load, {})
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--accounts", type=int, default=350_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--touched", type=int, default=2_807)
    args = p.parse_args(argv)
    gc.collect()
    collector = StepCollector(entries=lambda: len(parsed), check_every_s=0)  # it looks after every step
    parsed: dict[str, tuple[int, Envelope]] = {}
    with collector.step():  # the warm-up: every account loaded once
        for i in range(args.accounts):
            env = Envelope.from_bytes(worker_shaped(i, 1_784_080_920_180).to_bytes(), outbox=False)
            parsed[f"B{i % 90:02d}-S{i:06d}"] = (1, worker_shaped(i, 1_784_080_920_180) if i % 2 else env)
    frozen = gc.get_freeze_count()

    t = time.perf_counter()  # main's full pass (pipelines/gc_policy.py before)
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    full_ms = (time.perf_counter() - t) * 1000

    keys = list(parsed)
    exits = []
    for s in range(args.steps):
        with collector.step():
            base = s * args.touched
            for j in range(base, base + args.touched):
                i = j % args.accounts
                parsed[keys[i]] = (1, worker_shaped(i, 1_784_080_980_180 + s))
            t = time.perf_counter()
        exits.append((time.perf_counter() - t) * 1000)
    print(json.dumps({
        "accounts": args.accounts, "frozen_objects": frozen, "frozen_per_envelope": round(frozen / args.accounts, 1),
        "full_pass_ms": round(full_ms), "full_pass_found": found, "steps": args.steps,
        "step_exit_ms_max": round(max(exits), 1), "step_exit_ms_median": round(sorted(exits)[len(exits) // 2], 2),
        "full_passes_in_steps": collector.full_collections,
        "frozen_per_envelope_after": round(gc.get_freeze_count() / len(parsed), 1),
        "load_average": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
