"""The power loop on the real broker with simulated Modbus meters (issue 14):

- a top-up billed after a 10-minute worker outage (timestamps make the 10 minutes explicit)
  reconnects: the command is stamped when it is issued, so the collector (max age 300 s)
  executes it;
- a meter that ignores its first TRIP is tripped by the stream's retry, and the alert names it;
- a trip deferred by a friendly period comes at the period's end although the readings after
  it carry 0 Wh.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
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
from schemas import codec, readings
from schemas.keys import account_shard, shard_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MINUTE = 60_000
#: fast retries for the test (the defaults are 30 s backoff, 60 s without an answer)
LOOP_ENV = {"MALLWATT_RELAY_BACKOFF_MS": "1000", "MALLWATT_RELAY_ACK_TIMEOUT_MS": "20000", "MALLWATT_TICK_S": "0.5"}


class Worker:
    def __init__(self, config: Path, env: dict[str, str], logdir: Path) -> None:
        self.config, self.env, self.logdir, self.starts = config, env, logdir, 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"worker-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "worker", "--config", str(self.config)],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _portfolio(tmp_path: Path, prefix: str, **policy: object) -> tuple[dict, Path]:
    data = generate(1, 2, seed=4, mall_prefix=prefix, base_port=random.randint(21000, 29000))
    for level in data["levels"]:
        level["policy"] = {"alert_levels": [], "cutoff": 0, **policy}
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["business_type"] = "restaurant"
        merchant.pop("opening_balance_minor", None)
    register(data)  # the finance operator who signs the top-ups
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    return data, config


def _pay(producer: Producer, account: str, payment_id: str, amount: int, ts_ms: int, **kw: object) -> None:
    produce_payment(producer, signed({"payment_id": payment_id, "account_id": account, "kind": "TOPUP",
                                      "amount_minor": amount, "ts_ms": ts_ms}), T.default_partitions(), **kw)
    producer.flush(10)


def _scenario(kafka_bootstrap: str, tmp_path: Path, prefix: str, body) -> None:  # type: ignore[no-untyped-def]
    """A worker, a simulated mall at real time (collector clock = now, commands expire after
    300 s as in production) and a collector; `body(ctx)` drives the test."""
    data, config = _portfolio(tmp_path, prefix)
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0]
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": f"loop-{prefix}", **LOOP_ENV}
    worker = Worker(config, env, tmp_path)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    tails = {name: TopicTail(kafka_bootstrap, topic, schema) for name, topic, schema in (
        ("commands", T.RELAY_COMMANDS, "RelayCommand"), ("outcomes", T.RELAY_OUTCOMES, "RelayOutcome"),
        ("alerts", T.ALERTS, "Alert"))}

    async def run() -> None:
        sim = mall_simulator(portfolio, mall.id, speed=1.0, start_ms=int(time.time() * 1000))
        await sim.start()
        stop = asyncio.Event()
        collector = asyncio.create_task(run_collector(
            config, mall.id, stop, bootstrap=kafka_bootstrap, clock=sim.now_ms, poll_interval_s=0.5,
            spool_dir=tmp_path / "spool", command_offset_reset="earliest", command_max_age_s=300.0))
        try:
            await body(sim, mall, worker, producer, tails)
        finally:
            stop.set()
            await asyncio.wait_for(collector, 30)
            await sim.stop()

    worker.start()
    try:
        asyncio.run(run())
    finally:
        worker.stop()


async def _wait(tail: TopicTail, predicate, timeout: float = 90.0) -> dict:  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(tail.wait_for, predicate, timeout)


def test_topup_billed_after_a_ten_minute_outage_reconnects(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"L{uuid.uuid4().hex[:6]}"

    async def body(sim, mall, worker, producer, tails) -> None:  # type: ignore[no-untyped-def]
        merchant = mall.merchants[0]
        meter = next(m for m in mall.meters if m.account == merchant.id)
        # no opening top-up: the account opens at 0 with its first charge, at the cut-off: a trip
        # (a 1 fen top-up billed after that charge would reconnect it and race the test)
        trip = await _wait(tails["outcomes"], lambda o: o["meter_id"] == meter.id and o["action"] == "TRIP")
        assert trip["status"] == "CONFIRMED" and not sim.meters[meter.id].relay_closed

        worker.kill9()
        # paid 10 minutes ago, while the worker was down: the provider's message carries that time
        paid = int(time.time() * 1000) - 10 * MINUTE
        _pay(producer, merchant.id, f"{prefix}-late", 100_000, paid, timestamp=paid)
        worker.start()
        cmd = await _wait(tails["commands"], lambda c: c["meter_id"] == meter.id and c["action"] == "RECONNECT")
        assert cmd["cause_ts_ms"] == paid and cmd["issued_at_ms"] - paid >= 10 * MINUTE - 5_000
        back = await _wait(tails["outcomes"], lambda o: o["meter_id"] == meter.id and o["action"] == "RECONNECT")
        assert back["status"] == "CONFIRMED" and back["relay_after"] == "CLOSED", back["detail"]
        assert sim.meters[meter.id].relay_closed

    _scenario(kafka_bootstrap, tmp_path, prefix, body)


def test_meter_that_ignores_its_first_trip_is_tripped_by_the_retry(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"L{uuid.uuid4().hex[:6]}"

    async def body(sim, mall, worker, producer, tails) -> None:  # type: ignore[no-untyped-def]
        merchant = mall.merchants[1]
        meter = next(m for m in mall.meters if m.account == merchant.id)
        sim.meters[meter.id].faults.ignore_relay_writes = 3  # every write of the collector's first command
        # no top-up: the account opens at 0 with its first charge, at the cut-off: a trip
        first = await _wait(tails["outcomes"], lambda o: o["meter_id"] == meter.id and o["action"] == "TRIP")
        assert first["status"] == "FAILED" and first["relay_after"] == "CLOSED"
        retry = await _wait(tails["outcomes"], lambda o: o["meter_id"] == meter.id and o["action"] == "TRIP"
                            and o["command_id"] == f"{first['command_id']}:r2")
        assert retry["status"] == "CONFIRMED" and retry["relay_after"] == "OPEN", retry["detail"]
        assert not sim.meters[meter.id].relay_closed
        alert = await _wait(tails["alerts"], lambda a: a["kind"] == "relay_retry" and a["meter_id"] == meter.id)
        assert meter.id in alert["message"] and alert["details"]["previous"] == first["command_id"]

    _scenario(kafka_bootstrap, tmp_path, prefix, body)


def test_friendly_period_ends_with_zero_wh_readings_and_the_trip_comes_at_its_end(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"L{uuid.uuid4().hex[:6]}"
    data, config = _portfolio(tmp_path, prefix, friendly={"weekday_hours": [[18, 8]]})
    mall = parse_portfolio(data).malls[0]
    merchant = mall.merchants[0]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    circuit = meter.circuits[0].id
    shard = account_shard(merchant.id, T.default_partitions())
    evening = 1_784_113_200_000  # 2026-07-15 19:00 +08:00, a Wednesday: friendly (18:00-08:00)
    friendly_end = evening + 13 * 60 * MINUTE  # 08:00 the next morning
    commands = TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": f"loop-{prefix}", **LOOP_ENV}
    worker = Worker(config, env, tmp_path)

    def send(seq: int, stamps: list[int], kwh: list[float]) -> None:
        n = len(stamps)
        frame = pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter.id] * n,
                              "account_id": [merchant.id] * n, "ts_ms": stamps, "import_kwh": kwh})
        batch = readings.frame_to_batch(frame, batch_id=f"{prefix}/{seq}", collector_id="t", mall_id=mall.id,
                                        shard=shard, seq=seq, collected_at_ms=stamps[-1])
        # produced when the readings were taken: the message times are the stream's clock
        producer.produce(T.READINGS, key=shard_key(shard), partition=shard, timestamp=stamps[-1],
                         value=codec.encode("ReadingBatch", batch))
        producer.flush(10)

    worker.start()
    try:
        _pay(producer, merchant.id, f"{prefix}-open", 100, evening - 1, timestamp=evening - 1)
        send(1, [evening, evening + 15 * MINUTE], [100.0, 102.0])  # 2 kWh: below the cut-off, deferred
        morning = friendly_end - 30 * MINUTE
        send(2, [morning + i * 15 * MINUTE for i in range(5)], [102.0] * 5)  # 07:30-08:30, 0 Wh
        trip = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "TRIP", timeout=90)
        assert trip["cause_ts_ms"] == friendly_end and f"friendly_end:{friendly_end}" in trip["command_id"]
        assert trip["reason"] == "credit"
    finally:
        worker.stop()
