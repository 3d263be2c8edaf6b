"""Poll-rate benchmark: simulator in a child process, poller in this one.

The simulator's CPU is measured separately (from /proc) so `polls_per_s_per_core` is the
poller's own cost: completed polls per CPU-second of the polling process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from collectors.poller import Poller, PollerConfig
from collectors.spec import DeviceSpec


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def bench_polls(n_gateways: int, devices_per_gateway: int, seconds: float,
                interval_s: float = 0.0) -> dict:
    """Poll n_gateways x devices_per_gateway simulated meters for `seconds`.

    interval_s=0 polls every device back to back (each gateway's bus saturated), which
    measures the collector's ceiling rather than a realistic 15 s cadence.
    """
    with tempfile.TemporaryDirectory() as tmp:
        specs_path = os.path.join(tmp, "devices.json")
        sim = subprocess.Popen(
            [sys.executable, "-m", "collectors.simulator", "--gateways", str(n_gateways),
             "--meters-per-gateway", str(devices_per_gateway), "--speed", "60",
             "--duration", str(seconds + 30), "--specs-out", specs_path],
            stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            json.loads(sim.stdout.readline())  # the simulator is listening once it prints
            with open(specs_path) as fh:
                devices = [DeviceSpec(d["meter_id"], d["profile"], d["host"], d["port"],
                                      d["unit_id"], interval_s, gateway_id=d["gateway_id"])
                           for d in json.load(fh)]
            sim_cpu0 = _proc_cpu_s(sim.pid)
            cpu0, t0 = time.process_time(), time.monotonic()
            poller = Poller(devices, config=PollerConfig(timeout_s=2.0))
            asyncio.run(poller.run(seconds))
            wall = time.monotonic() - t0
            cpu = time.process_time() - cpu0
            sim_cpu = _proc_cpu_s(sim.pid) - sim_cpu0
        finally:
            sim.terminate()
            sim.wait(10)
    stats = poller.stats()
    polls = stats["polls_ok"]
    return {
        "gateways": n_gateways, "devices": len(devices), "seconds": round(wall, 3),
        "polls": polls, "failed": stats["polls_failed"], "requests": stats["requests"],
        "polls_per_s": round(polls / wall, 1),
        "poller_cpu_s": round(cpu, 3), "simulator_cpu_s": round(sim_cpu, 3),
        "polls_per_s_per_core": round(polls / cpu, 1) if cpu > 0 else None,
    }


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]] + [float(a) for a in sys.argv[3:4]]
    print(json.dumps(bench_polls(*(args or [4, 50, 10.0])), indent=2))
