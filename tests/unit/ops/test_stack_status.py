"""`mallwatt stack status` exits non-zero (3) when a component is down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import broker, stack
from pipelines import metrics as M

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def idle_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLWATT_CLICKHOUSE", raising=False)
    monkeypatch.setenv("MALLWATT_CHDB_PATH", str(tmp_path / "chdb"))


def fake_broker(monkeypatch: pytest.MonkeyPatch, running: bool, topics: int | None) -> None:
    monkeypatch.setattr(broker, "status", lambda config=None: broker.BrokerStatus(
        running, 4242 if running else None, "127.0.0.1:1", topics, False, None))


def test_status_is_zero_when_kafka_answers(monkeypatch: pytest.MonkeyPatch, idle_warehouse: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake_broker(monkeypatch, True, 12)
    assert stack.main(["status"]) == 0
    assert "down: []" in capsys.readouterr().out


@pytest.mark.parametrize(("running", "topics"), [(False, None), (True, None)])
def test_status_fails_when_kafka_is_down_or_not_answering(
        monkeypatch: pytest.MonkeyPatch, idle_warehouse: None, running: bool,
        topics: int | None, capsys: pytest.CaptureFixture[str]) -> None:
    fake_broker(monkeypatch, running, topics)
    assert stack.main(["status", "--json"]) == 3
    assert "down: kafka" in capsys.readouterr().err


def test_status_fails_when_the_warehouse_server_is_unreachable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_broker(monkeypatch, True, 12)
    monkeypatch.setenv("MALLWATT_CLICKHOUSE", "http://127.0.0.1:1")
    result = stack.status()
    assert result["down"] == ["warehouse"]
    assert str(result["warehouse"]).startswith("unavailable")


def test_required_services_are_probed(monkeypatch: pytest.MonkeyPatch, idle_warehouse: None) -> None:
    fake_broker(monkeypatch, True, 12)
    ready = {"ok": False}
    server = M.serve(0, host="127.0.0.1", ready=lambda: (ready["ok"], "waiting for partitions"))
    assert server is not None
    try:
        monkeypatch.setenv("MALLWATT_SINK_METRICS_PORT", str(server.port))
        monkeypatch.setenv("MALLWATT_NOTIFY_METRICS_PORT", "1")  # nothing listens there
        assert stack.main(["status", "--require", "sink"]) == 3
        assert stack.status(("sink",))["sink"] == "not ready: waiting for partitions"
        ready["ok"] = True
        assert stack.main(["status", "--require", "sink"]) == 0
        out = stack.status(("sink", "notify"))
        assert out["notify"] == "not running" and out["down"] == ["notify"]
    finally:
        server.close()


def test_cli_exit_code_with_no_broker(tmp_path: Path) -> None:
    """The real command against a private, never-started broker and an idle warehouse."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLWATT_KAFKA_PORT": "19987",
           "MALLWATT_KAFKA_CONTROLLER_PORT": "19988", "MALLWATT_KAFKA_DATA_DIR": str(tmp_path / "k"),
           "MALLWATT_CHDB_PATH": str(tmp_path / "chdb")}
    env.pop("MALLWATT_KAFKA", None)
    env.pop("MALLWATT_CLICKHOUSE", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "stack", "status"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "down: kafka" in proc.stderr
