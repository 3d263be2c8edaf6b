"""`mallwatt bench NAME --json`: benchmarks that print their figures as JSON."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "core": ("pipelines.core.bench", "billing core: readings/s for interval + tariff + wallet on one core"),
    "collect": ("collectors.bench", "collector: Modbus polls/s per core against simulated gateways"),
    "warehouse": ("bench.warehouse", "warehouse: sink rows/s and catalog query latencies on chDB"),
    "replay": ("bench.replay", "offline replay in arrival order: readings/s and peak RSS (--merchants, --days)"),
    "pipeline": ("bench.pipeline", "stream: worker readings/s vs a bare consumer, trip latency p50/p99"),
    "roster": ("pipelines.roster_bench", "portfolio: table load + context build s, event-loop stall on a change"),
    "scale": ("bench.scale", "stream at portfolio scale: live-shaped input, lag, trips, recovery, catch-up"),
    "portal": ("bench.portal", "merchant portal at scale: balance p99 under load, webhook top-up to balance, memory"),
    "fwdcost": ("bench.forwarder_cost", "forwarder: CPU per reading of decode + encode at portfolio shape, old vs new"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print("usage: mallwatt bench NAME [--json] [options]\n\nbenchmarks:")
        for name, (_, text) in BENCHES.items():
            print(f"  {name:<8} {text}")
        return 0
    if args[0] not in BENCHES:
        print(f"mallwatt bench: unknown benchmark {args[0]!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHES[args[0]][0])
    return int(module.main(args[1:]) or 0)
