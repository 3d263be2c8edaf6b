"""`mallwatt bench scale` end to end, small: 2,000 merchants every 2 s on its own broker.

Runs the bench as `mallwatt` does (a subprocess with its own private broker on a port of
its own) and checks that every figure is there and sane, and that it leaves no process
behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import KEYS

ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("MALLWATT_BENCH_SCALE_TEST_PORT", 29310))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_scale_small_run(tmp_path: Path) -> None:
    if _port_open(PORT):
        pytest.skip(f"port {PORT} is in use (set MALLWATT_BENCH_SCALE_TEST_PORT)")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "bench", "scale", "--merchants", "2000", "--cadence-s", "2",
         "--cadences", "5", "--backlog-minutes", "0.5", "--port", str(PORT), "--dir", str(tmp_path / "bench"),
         # a 30 s backlog of 2 s cycles is 15 cycles deep: catch-up steps from 10 s behind (the
         # default 120 s is two cycles at a 60 s cadence)
         "--worker-env", "MALLWATT_CATCHUP_AFTER_S=10", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=280,
        env={**os.environ, "MALLWATT_KAFKA": ""})
    assert proc.stdout.strip(), proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    assert figures["failure"] is None, (figures["failure"], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert set(KEYS) <= set(figures)
    assert figures["phases"] == ["steady", "kill", "catchup", "year"]
    assert figures["merchants"] == 2000 and figures["circuits"] >= 2000
    assert figures["offered_readings_per_s"] == pytest.approx(figures["circuits"] / 2, rel=0.01)
    assert figures["sustained"] is True
    assert 0 <= figures["max_lag_messages"] < figures["lag_limit_messages"]
    assert figures["trip_samples"] > 0
    assert 0 < figures["trip_latency_ms_p50"] <= figures["trip_latency_ms_p99"] < 10_000
    assert figures["changelog_bytes_per_reading"] > 0
    assert figures["max_value_bytes"] > 0 and figures["max_value_topic"]
    assert figures["state_bytes_per_account"] > 0
    assert 0 < figures["recovery_s"] < 120
    # the backlog drains faster than it was offered, or the worker could never catch up
    assert figures["catchup_readings_per_s"] > figures["offered_readings_per_s"]
    assert figures["catchup_backlog_readings"] >= 15 * figures["circuits"]  # half a minute of 2 s cadences
    # merchants topping up during the catch-up are credited, each (none left out: no note)
    assert figures["catchup_topups"] >= 1
    assert 0 < figures["catchup_topup_ms_p50"] <= figures["catchup_topup_ms_max"], figures["notes"]
    assert not [n for n in figures["notes"] if "top-ups sent during the catch-up" in n]
    assert figures["worker_cpu_s_per_1k_readings"] > 0
    # everything the bench started is stopped: its broker no longer answers
    assert not _port_open(PORT) and not _port_open(PORT + 1)
