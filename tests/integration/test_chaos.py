"""Chaos: workers are killed with SIGKILL mid-stream, restarted and rebalanced (1 -> 2 -> 1).

At the end the ledger published by the stream must equal an offline recomputation of the
same input by the billing core: the same entries with the same amounts, every balance to
the last minor unit, and no payment applied twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Producer
from kafka_tail import TopicTail, decode_records

from infra import topics as T
from pipelines.context import build_context
from pipelines.core.engine import CoreState, process_batch
from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portfolio import dump_portfolio, parse_portfolio
from schemas import codec, readings
from schemas.keys import account_shard, shard_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00
STEP = 900_000
STEPS = 64  # 16 hours of 15-minute readings per circuit


def _input(prefix: str, seed: int) -> tuple[dict, pl.DataFrame, list[dict]]:
    data = generate(1, 16, seed=seed, mall_prefix=prefix)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
    portfolio = parse_portfolio(data)
    rng = random.Random(seed)
    rows = []
    for mall, meter in portfolio.meters():
        account = meter.account or f"{mall.id}-LANDLORD"
        register = rng.uniform(100, 5000)
        for step in range(STEPS):
            register += rng.uniform(0.0, 2.5)
            rows.append((meter.circuits[0].id, meter.id, account, T0 + step * STEP, round(register, 2)))
    frame = pl.DataFrame(rows, orient="row", schema={"circuit_id": pl.String, "meter_id": pl.String,
                                                     "account_id": pl.String, "ts_ms": pl.Int64,
                                                     "import_kwh": pl.Float64})
    payments = []
    for merchant in portfolio.malls[0].merchants:
        payments.append({"payment_id": f"{merchant.id}-open", "account_id": merchant.id, "kind": "TOPUP",
                         "amount_minor": rng.randint(500, 5000), "ts_ms": T0})
        for k in range(3):
            payments.append({"payment_id": f"{merchant.id}-p{k}", "account_id": merchant.id, "kind": "TOPUP",
                             "amount_minor": rng.randint(1000, 20000), "ts_ms": T0 + rng.randint(1, STEPS) * STEP})
    return data, frame.sort("ts_ms"), payments


def _produce(bootstrap: str, mall_id: str, frame: pl.DataFrame, payments: list[dict], stop: threading.Event,
             chunks: int = 32) -> None:
    """Readings in time order as a collector would flush them, payments (some twice) in between."""
    partitions = T.default_partitions()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    rng = random.Random(3)
    by_time = sorted(payments, key=lambda p: p["ts_ms"])
    step_ts = frame["ts_ms"].unique().sort().to_list()
    per_chunk = max(1, len(step_ts) // chunks)
    seq = 0
    for i in range(0, len(step_ts), per_chunk):
        if stop.is_set():
            return
        window = step_ts[i:i + per_chunk]
        part = frame.filter(pl.col("ts_ms").is_in(window)).with_columns(
            shard=pl.col("account_id").map_elements(lambda a: account_shard(a, partitions), pl.Int64))
        for (shard,), group in part.partition_by("shard", as_dict=True).items():
            seq += 1
            batch = readings.frame_to_batch(group.drop("shard"), batch_id=f"chaos/{shard}/{seq}",
                                            collector_id="chaos", mall_id=mall_id, shard=int(shard), seq=seq,
                                            collected_at_ms=window[-1])
            producer.produce(T.READINGS, key=shard_key(int(shard)), partition=int(shard),
                             value=codec.encode("ReadingBatch", batch))
        while by_time and by_time[0]["ts_ms"] <= window[-1]:
            p = by_time.pop(0)
            copies = 2 if rng.random() < 0.3 else 1  # the provider's webhook retried
            for _ in range(copies):
                produce_payment(producer, p, partitions)
        producer.flush(30)
        time.sleep(0.4)


class Workers:
    def __init__(self, config: Path, env: dict[str, str], logdir: Path) -> None:
        self.config, self.env, self.logdir = config, env, logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start(self, name: str) -> None:
        self.starts += 1
        log = open(self.logdir / f"{name}-{self.starts}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "worker", "--config", str(self.config)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def test_kill9_and_rebalance_match_offline_replay(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"X{uuid.uuid4().hex[:6]}"
    data, frame, payments = _input(prefix, seed=17)
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    mall_id = data["malls"][0]["id"]

    # offline recomputation of the same input, in one batch
    ctx = build_context(parse_portfolio(data), T.default_partitions())
    _, expected_out = process_batch(CoreState(), frame, payments, ctx.rating, flush=True)
    expected = {r["entry_id"]: r["amount_minor"] for r in expected_out.ledger.iter_rows(named=True)}
    accounts = {r["account_id"] for r in expected_out.ledger.iter_rows(named=True)}
    assert len(expected) > 500 and any(e.endswith("-p2") for e in expected)

    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": f"chaos-{prefix}",
           "MALLWATT_SESSION_TIMEOUT_S": "6"}
    workers = Workers(config, env, tmp_path)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(kafka_bootstrap, mall_id, frame, payments, stop))
    rng = random.Random(99)
    try:
        workers.start("a")
        time.sleep(6)
        producer.start()
        for action in ("kill a", "start a", "start b", "kill b", "kill a", "start a", "start b", "kill a"):
            time.sleep(rng.uniform(2.0, 5.0))
            verb, name = action.split()
            workers.kill9(name) if verb == "kill" else workers.start(name)
        producer.join(120)
        assert not producer.is_alive(), "the input producer did not finish"

        seen: dict[str, list[int]] = {}

        def complete(record: dict) -> bool:
            if record["account_id"] in accounts:
                seen.setdefault(record["entry_id"], []).append(record["amount_minor"])
            return len(seen) >= len(expected)

        ledger.wait_for(complete, timeout=150)
        time.sleep(3)  # let late duplicates arrive, so the duplicate check below sees them
        while (msg := ledger.consumer.poll(1.0)) is not None:
            if not msg.error():
                for r in decode_records("LedgerBatch", msg.value()):
                    if r["account_id"] in accounts:
                        seen.setdefault(r["entry_id"], []).append(r["amount_minor"])
    finally:
        stop.set()
        workers.stop_all()

    # duplicates may be published (at least once) but never with a different amount
    assert all(len(set(amounts)) == 1 for amounts in seen.values())
    stream = {entry: amounts[0] for entry, amounts in seen.items()}
    assert stream == expected
    topups = [e for e in stream if ":topup:" in e]
    assert len(topups) == len(payments)  # every payment once, duplicates never credited
    for account in accounts:
        mine = [a for e, a in stream.items() if e.startswith(f"{account}:")]
        theirs = [a for e, a in expected.items() if e.startswith(f"{account}:")]
        assert sum(mine) == sum(theirs), account
