"""`mallwatt bench collect`: Modbus polls per second per core against simulated gateways.

The simulator runs in a child process and its CPU is read from /proc, so
`polls_per_s_per_core` is the poller's own cost: completed polls per CPU-second (user +
system, so the kernel's share of loopback TCP counts) of the polling process. The
target is 10x what a 2,000-meter mall polled every 15 s needs, on one core.

    mallwatt bench collect --json [--gateways 16 --meters-per-gateway 30 --seconds 6]
                           [--client lean|pymodbus] [--loop auto|asyncio|uvloop] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from collectors.poller import Poller, PollerConfig
from collectors.spec import DeviceSpec

MALL_METERS, MALL_INTERVAL_S, HEADROOM = 2000, 15.0, 10
TARGET = HEADROOM * MALL_METERS / MALL_INTERVAL_S  # polls/s per core


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def pick_loop(name: str = "auto") -> str:
    """"uvloop" if asked for or (auto) installed, else "asyncio"."""
    if name == "asyncio":
        return name
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if name == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run_loop(coro: Any, loop: str = "auto") -> Any:
    if pick_loop(loop) == "uvloop":
        import uvloop
        return uvloop.run(coro)
    return asyncio.run(coro)


def bench_polls(n_gateways: int, devices_per_gateway: int, seconds: float,
                interval_s: float = 0.0, *, client: str = "lean",
                loop: str = "auto") -> dict[str, Any]:
    """Poll n_gateways x devices_per_gateway simulated meters for `seconds`.

    interval_s=0 polls every device back to back (each gateway's bus saturated), which
    measures the collector's ceiling rather than a realistic 15 s cadence.
    """
    loop = pick_loop(loop)
    with tempfile.TemporaryDirectory() as tmp:
        specs_path = os.path.join(tmp, "devices.json")
        sim = subprocess.Popen(
            [sys.executable, "-m", "collectors.simulator", "--gateways", str(n_gateways),
             "--meters-per-gateway", str(devices_per_gateway), "--speed", "60",
             "--duration", str(seconds + 60), "--specs-out", specs_path],
            stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            json.loads(sim.stdout.readline())  # the simulator is listening once it prints
            with open(specs_path) as fh:
                devices = [DeviceSpec(d["meter_id"], d["profile"], d["host"], d["port"],
                                      d["unit_id"], interval_s, gateway_id=d["gateway_id"])
                           for d in json.load(fh)]
            poller = Poller(devices, config=PollerConfig(timeout_s=2.0, client=client))
            sim_cpu0 = _proc_cpu_s(sim.pid)
            (u0, s0), t0 = _cpu(), time.monotonic()
            run_loop(poller.run(seconds), loop)
            wall = time.monotonic() - t0
            u1, s1 = _cpu()
            sim_cpu = _proc_cpu_s(sim.pid) - sim_cpu0
        finally:
            sim.terminate()
            sim.wait(10)
    stats = poller.stats()
    polls = stats["polls_ok"]
    cpu = (u1 - u0) + (s1 - s0)
    per_core = polls / cpu if cpu > 0 else 0.0
    return {
        "polls_per_s_per_core": round(per_core, 1),
        "target_polls_per_s_per_core": round(TARGET, 1),
        "headroom_vs_target": round(per_core / TARGET, 2),
        "polls": polls, "failed": stats["polls_failed"], "requests": stats["requests"],
        "requests_per_poll": round(stats["requests"] / polls, 2) if polls else None,
        "polls_per_s_wall": round(polls / wall, 1),
        "poller_cpu_s": round(cpu, 3), "poller_user_s": round(u1 - u0, 3),
        "poller_sys_s": round(s1 - s0, 3),
        "poller_cpu_us_per_poll": round(cpu / polls * 1e6, 1) if polls else None,
        "simulator_cpu_s": round(sim_cpu, 3),
        "simulator_cpu_us_per_poll": round(sim_cpu / polls * 1e6, 1) if polls else None,
        "config": {"gateways": n_gateways, "meters_per_gateway": devices_per_gateway,
                   "devices": len(devices), "seconds": round(wall, 3),
                   "interval_s": interval_s, "client": client, "loop": loop,
                   "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mallwatt bench collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--gateways", type=int, default=16)
    p.add_argument("--meters-per-gateway", type=int, default=30,
                   help="devices per gateway (an RS-485 bus carries about 30)")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--interval", type=float, default=0.0,
                   help="poll interval per device (0: back to back, the ceiling)")
    p.add_argument("--client", choices=("lean", "pymodbus"), default="lean")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    p.add_argument("--compare", action="store_true",
                   help="also run the pymodbus client and the plain asyncio loop")
    args = p.parse_args(argv)
    out = bench_polls(args.gateways, args.meters_per_gateway, args.seconds, args.interval,
                      client=args.client, loop=args.loop)
    if args.compare:
        out["compare"] = {
            f"{c}/{lp}": {k: r[k] for k in ("polls_per_s_per_core", "poller_cpu_us_per_poll",
                                            "polls_per_s_wall")}
            for c, lp in (("lean", "asyncio"), ("pymodbus", "asyncio"))
            for r in [bench_polls(args.gateways, args.meters_per_gateway, args.seconds,
                                  args.interval, client=c, loop=lp)]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['polls_per_s_per_core']:.0f} polls/s per core "
              f"({out['headroom_vs_target']}x the target of {TARGET:.0f}); poller "
              f"{out['poller_cpu_us_per_poll']} us/poll, simulator "
              f"{out['simulator_cpu_us_per_poll']} us/poll; {out['config']}")
        for name, r in out.get("compare", {}).items():
            print(f"  {name}: {r['polls_per_s_per_core']:.0f} polls/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
