"""bench scale's worker group: each worker its own name, RocksDB directory and metrics port;
trip latency counts first commands only."""

from __future__ import annotations

from pathlib import Path

from bench.scale import first_attempt, parse_args
from bench.scale_kafka import Processes


def test_each_worker_of_a_group_has_its_own_name_directory_and_port(tmp_path: Path) -> None:
    env = {"MALLWATT_WORKER_NAME": "bench-worker", "MALLWATT_FAUST_DIR": str(tmp_path / "faust")}
    group = Processes(tmp_path, env, tmp_path / "portfolio", workers=3)
    envs = [group._worker_env(i) for i in range(3)]
    assert [e["MALLWATT_WORKER_NAME"] for e in envs] == ["bench-worker-0", "bench-worker-1", "bench-worker-2"]
    assert len({e["MALLWATT_FAUST_DIR"] for e in envs}) == 3
    assert "MALLWATT_WORKER_METRICS_PORT" not in envs[0]
    assert envs[1]["MALLWATT_WORKER_METRICS_PORT"] == envs[2]["MALLWATT_WORKER_METRICS_PORT"] == "-1"
    # one worker runs exactly as configured (the kill phase's restart keeps its directory)
    assert Processes(tmp_path, env, tmp_path / "portfolio")._worker_env(0) == {}


def test_trip_latency_counts_the_first_command_of_a_chain_only() -> None:
    assert first_attempt("B1-S0001-E1:trip:1784081157585")
    assert not first_attempt("B1-S0001-E1:trip:1784081157585:r2")
    assert not first_attempt("x:r12")


def test_workers_must_be_positive() -> None:
    import pytest

    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])
    assert parse_args(["--workers", "2"]).workers == 2
