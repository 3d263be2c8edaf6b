"""The walking skeleton on real components: Modbus meters -> collector -> Kafka -> worker -> sink ->
ClickHouse, and back: a credit trip opens the simulated relay, a top-up closes it again."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from kafka_tail import TopicTail
from operators import register, signed

from collectors.run import run_collector
from collectors.sim_portfolio import mall_simulator
from infra import topics as T
from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portfolio import dump_portfolio, parse_portfolio

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SIM_START = int(datetime.fromisoformat("2026-07-14T10:00:00+08:00").timestamp() * 1000)


def _start(name: str, args: list[str], env: dict[str, str], logdir: Path) -> subprocess.Popen[bytes]:
    log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_meter_to_warehouse_with_trip_and_reconnect(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"E{uuid.uuid4().hex[:6]}"
    data = generate(1, 3, seed=4, mall_prefix=prefix, base_port=random.randint(21000, 29000))
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 0  # the stream posts openings: balances here come from top-ups
        merchant["business_type"] = "restaurant"  # busy at 10:00-14:00, so credit runs out quickly
    register(data)  # the finance operator who signs the top-ups below
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0]
    poor = mall.merchants[0]
    poor_meter = next(m for m in mall.meters if m.account == poor.id)
    partitions = T.default_partitions()
    chdb = tmp_path / "chdb"
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": f"e2e-{prefix}",
           "MALLWATT_CHDB_PATH": str(chdb), "MALLWATT_CONFIG": str(config)}
    outcomes = TopicTail(kafka_bootstrap, T.RELAY_OUTCOMES, "RelayOutcome")
    sink = _start("sink", ["sink", "--group", f"e2e-sink-{prefix}"], env, tmp_path)
    worker = _start("worker", ["worker", "--config", str(config)], env, tmp_path)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def pay(account: str, amount: int, payment_id: str, ts_ms: int) -> None:
        produce_payment(producer, signed({"payment_id": payment_id, "account_id": account, "kind": "TOPUP",
                                          "amount_minor": amount, "ts_ms": ts_ms}), partitions)
        producer.flush(10)

    async def scenario() -> None:
        sim = mall_simulator(portfolio, mall.id, speed=120.0, start_ms=SIM_START)
        await sim.start()
        stop = asyncio.Event()
        collector = asyncio.create_task(run_collector(
            config, mall.id, stop, bootstrap=kafka_bootstrap, clock=sim.now_ms, poll_interval_s=0.5,
            spool_dir=tmp_path / "spool", command_offset_reset="earliest", command_max_age_s=None))
        try:
            for merchant in mall.merchants:
                pay(merchant.id, 150 if merchant.id == poor.id else 1_000_000, f"{prefix}-{merchant.id}-open",
                    SIM_START)
            trip = await asyncio.to_thread(outcomes.wait_for, lambda o: o["meter_id"] == poor_meter.id
                                           and o["action"] == "TRIP", 150)
            assert trip["status"] == "CONFIRMED" and trip["relay_after"] == "OPEN", trip["detail"]
            assert not sim.meters[poor_meter.id].relay_closed
            frozen = sim.meters[poor_meter.id].import_kwh
            await asyncio.sleep(2.0)  # four simulated minutes: an open relay means no energy
            assert sim.meters[poor_meter.id].import_kwh == frozen

            pay(poor.id, 100_000, f"{prefix}-rescue", sim.now_ms())
            back = await asyncio.to_thread(outcomes.wait_for, lambda o: o["meter_id"] == poor_meter.id
                                           and o["action"] == "RECONNECT", 90)
            assert back["status"] == "CONFIRMED" and back["relay_after"] == "CLOSED"
            assert sim.meters[poor_meter.id].relay_closed
        finally:
            stop.set()
            await asyncio.wait_for(collector, 30)
            await sim.stop()

    try:
        asyncio.run(scenario())
        from infra import warehouse

        circuit = poor_meter.circuits[0].id
        deadline = time.monotonic() + 60
        rows: list = []
        while time.monotonic() < deadline:
            _, rows = warehouse.query(
                "SELECT count() FROM mallwatt.readings FINAL WHERE circuit_id = {c:String}", {"c": circuit},
                path=str(chdb))
            _, charges = warehouse.query(
                "SELECT count(), countIf(tou_period IN ('peak', 'sharp', 'flat')), sum(energy_wh), "
                "-sum(amount_minor) FROM mallwatt.ledger FINAL WHERE account_id = {a:String} AND kind = 'charge'",
                {"a": poor.id}, path=str(chdb))
            if rows and rows[0][0] > 3 and charges[0][0] > 0:
                break
            time.sleep(2)
        assert rows[0][0] > 3, "readings of the collector never reached the warehouse"
        n, priced, energy_wh, charged = charges[0]
        assert n > 0 and priced == n and energy_wh > 0
        # priced at 80..170 fen/kWh (flat .. critical peak): the money follows the energy
        assert 0.08 * energy_wh * 0.999 <= charged <= 0.17 * energy_wh + n
    finally:
        _stop(worker)
        _stop(sink)
