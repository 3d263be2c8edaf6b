"""Issue 17's done-when: `mallwatt stack up --monitoring` with a short pipeline (simulated
gateways over Modbus TCP, the real collector, the billing worker), asserted through
Prometheus's HTTP API (the worker's lag and throughput series exist) and Alertmanager's
(stopping a simulated gateway fires MallwattGatewayDown).

Alerts within seconds: MALLWATT_ALERT_FOR=2s rewrites every rule's `for:` in the rule file
the stack writes (infra.monitoring.rules_text; thresholds unchanged), and
MALLWATT_SCRAPE_INTERVAL=1s scrapes and evaluates every second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_collect_publish import FAST, free_port

from collectors.run import Collector
from collectors.sim_portfolio import mall_simulator
from infra import monitoring as mon
from pipelines import metrics as M
from pipelines.generate import generate
from pipelines.portfolio import dump_portfolio, parse_portfolio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def wait_for(what: str, probe: Callable[[], Any], seconds: float) -> Any:
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not seen in {seconds:.0f} s (last: {last!r})")


@pytest.fixture
def stack(kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Prometheus and Alertmanager on private ports, scraping a collector and a worker."""
    try:
        mon.ensure_installed()
    except mon.MonitoringError as exc:
        pytest.skip(str(exc))
    env = {"MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_MONITORING_DIR": str(tmp_path / "monitoring"),
           "MALLWATT_PROMETHEUS_PORT": str(free_port()), "MALLWATT_ALERTMANAGER_PORT": str(free_port()),
           "MALLWATT_SCRAPE_INTERVAL": "1s", "MALLWATT_ALERT_FOR": "2s", "MALLWATT_METRICS_HOST": "127.0.0.1",
           "MALLWATT_COLLECTOR_METRICS_PORT": str(free_port()), "MALLWATT_WORKER_METRICS_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # this process reads the same settings (infra.monitoring)
    full = {**os.environ, **env}
    cli("stack", "up", "--kafka-only", "--monitoring", "--scrape", "collector,worker", env=full)
    try:
        yield full
    finally:
        cli("stack", "down", env=full)
    assert mon.status() == {}  # both stopped


def test_prometheus_sees_the_worker_and_alertmanager_a_lost_gateway(stack: dict[str, str], tmp_path: Path) -> None:
    data = generate(1, 6, seed=3, mall_prefix=f"M{uuid.uuid4().hex[:8]}")
    for gw in data["malls"][0]["gateways"]:
        gw["port"] = free_port()
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    p = parse_portfolio(data)
    mall_id = p.malls[0].id
    env = {**stack, "MALLWATT_APP_ID": f"test-mon-{uuid.uuid4().hex[:6]}", "MALLWATT_METRICS_REFRESH_S": "1"}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "worker", "--config", str(config)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prom = mon.MonitoringConfig.from_env()

    async def body() -> tuple[str, list[dict[str, Any]]]:
        sim = mall_simulator(p, mall_id, speed=1, start_ms=int(time.time() * 1000))  # real time: no time-guard refusals
        await sim.start()
        col = Collector(p, mall_id, bootstrap=stack["MALLWATT_KAFKA"], collector_id=f"mon-{uuid.uuid4().hex[:6]}",
                        spool_dir=tmp_path / "spool", clock=sim.now_ms, poll_interval_s=0.5,
                        poller_config=FAST, commands=False)
        server = M.serve(M.metrics_port("collector"), ready=col.readiness)
        assert server is not None
        stop = asyncio.Event()
        task = asyncio.create_task(col.run(stop))
        try:
            # the worker's throughput and lag, as Prometheus scraped them
            await asyncio.to_thread(wait_for, "worker input in Prometheus", lambda: mon.query(
                'sum(mallwatt_worker_input_messages_total{job="mallwatt-worker",topic="mallwatt.readings"}) > 0'), 120)
            await asyncio.to_thread(wait_for, "worker step histogram", lambda: mon.query(
                'mallwatt_worker_step_duration_seconds_count{job="mallwatt-worker"}'), 30)
            lag = await asyncio.to_thread(wait_for, "worker consumer lag", lambda: mon.query(
                'mallwatt_consumer_lag_messages{job="mallwatt-worker",component="worker",topic="mallwatt.readings"}'),
                30)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            # one simulated gateway goes away
            gone = sim.gateways[0]
            assert gone.server is not None
            await gone.server.shutdown()
            gone.server = None
            fired = await asyncio.to_thread(wait_for, "MallwattGatewayDown in Alertmanager", lambda: [
                a for a in mon.active_alerts() if a["labels"].get("alertname") == "MallwattGatewayDown"
                and a["labels"].get("gateway") == gone.name and a["labels"].get("mall") == mall_id], 60)
            line = mon.alert_line()  # what `make demo` prints at its end
            assert line.startswith("alerts firing") and "MallwattGatewayDown" in line, line
            return lag, fired
        finally:
            stop.set()
            await task
            server.close()
            await sim.stop()

    try:
        lag, fired = asyncio.run(body())
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
    assert {s["metric"]["partition"] for s in lag} and all(float(s["value"][1]) >= 0 for s in lag)
    assert fired[0]["labels"]["severity"] == "critical" and fired[0]["labels"]["job"] == "mallwatt-collector"
    assert prom.prometheus_url.endswith(stack["MALLWATT_PROMETHEUS_PORT"])
