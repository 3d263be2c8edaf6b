"""`mallwatt bench pipeline --json`: end-to-end readings/s through the agents vs the ceiling.

All figures come from one run on one private broker (var/bench-pipeline/kafka):
- ceiling: a bare confluent-kafka consumer decoding the same reading topic, nothing else;
- readings_per_s: the billing worker (one process, its forwarder in another) with the
  opening top-ups applied; the readings are produced in one burst while it runs, and the
  time runs from the start of the burst to the worker's last state write;
- trip latency: input replayed at 50 % of the measured throughput; for every reading that
  exhausts a wallet, the time from its produce timestamp to the trip command it causes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from confluent_kafka import Consumer, Producer, TopicPartition

from infra import broker
from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.forwarder import changelog_topic
from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portfolio import dump_portfolio, parse_portfolio
from schemas import codec, readings
from schemas.keys import account_shard, shard_key

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench-pipeline"
PORT = 19292
T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00
STEP = 900_000


def log(text: str) -> None:
    print(f"[bench pipeline] {text}", file=sys.stderr, flush=True)


def build_input(stalls: int, steps: int, *, low_balance: set[str] | None = None
                ) -> tuple[dict[str, Any], list[tuple[int, bytes, int]], list[dict[str, Any]]]:
    """Portfolio, encoded reading batches (partition, value, readings) per time step, opening top-ups."""
    data = generate(1, stalls, seed=5, mall_prefix="B")
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 0  # the stream posts openings: balances here come from top-ups
    portfolio = parse_portfolio(data)
    partitions = T.default_partitions()
    rng = random.Random(1)
    circuits = [(m.circuits[0].id, m.id, m.account or f"{mall.id}-LANDLORD", rng.uniform(100, 9000))
                for mall, m in portfolio.meters()]
    shards = [account_shard(acc, partitions) for _, _, acc, _ in circuits]
    messages: list[tuple[int, bytes, int]] = []
    registers = [c[3] for c in circuits]
    for step in range(steps):
        for i in range(len(registers)):
            registers[i] += rng.uniform(0.05, 0.6)
        frame = pl.DataFrame({"circuit_id": [c[0] for c in circuits], "meter_id": [c[1] for c in circuits],
                              "account_id": [c[2] for c in circuits], "ts_ms": [T0 + step * STEP] * len(circuits),
                              "import_kwh": [round(r, 2) for r in registers], "shard": shards})
        for (shard,), group in frame.partition_by("shard", as_dict=True).items():
            record = readings.frame_to_batch(group.drop("shard"), batch_id=f"bench/{shard}/{step}",
                                             collector_id="bench", mall_id="B01", shard=int(shard), seq=step,
                                             collected_at_ms=T0 + step * STEP)
            messages.append((int(shard), codec.encode("ReadingBatch", record), group.height, step))
    low = low_balance or set()
    # provider payments (as the portal's webhook sends them): not operator-signed (docs/security.md)
    payments = [{"payment_id": f"open-{m.id}", "account_id": m.id, "kind": "TOPUP", "provider": "bench",
                 "amount_minor": 300 if m.id in low else 10_000_000, "ts_ms": T0 - 1}
                for m in portfolio.malls[0].merchants]
    return data, messages, payments


def end_offsets(consumer: Consumer, topic: str) -> dict[int, int]:
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}


def ceiling(bootstrap: str, expected: int) -> float:
    consumer = Consumer(kafka_config(bootstrap, **{"group.id": f"ceiling-{time.time()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([T.READINGS])
    count, start = 0, None
    while count < expected:
        for msg in consumer.consume(500, 1.0):
            if msg.error():
                continue
            start = start or time.perf_counter()
            count += readings.batch_to_frame(codec.decode("ReadingBatch", msg.value())).height
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return count / elapsed if elapsed else 0.0


def committed_total(consumer: Consumer, group_consumer: Consumer, topic: str) -> int:
    parts = [TopicPartition(topic, p) for p in end_offsets(consumer, topic)]
    return sum(max(tp.offset, 0) for tp in group_consumer.committed(parts, timeout=10))


def run_worker(config: Path, bootstrap: str, app_id: str,
               extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The worker with its forwarder in a second process (one core each, as deployed)."""
    env = {**os.environ, "MALLWATT_KAFKA": bootstrap, "MALLWATT_APP_ID": app_id, **(extra_env or {})}
    out = open(BENCH_DIR / f"{app_id}.log", "wb")  # noqa: SIM115
    cmd = (f"{sys.executable} -m pipelines.cli forward & "
           f"exec {sys.executable} -m pipelines.cli worker --no-forwarder --config {config}")
    return subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def write_span_ms(bootstrap: str, topic: str, timeout: float = 60.0) -> tuple[int, int] | None:
    """Create times of the earliest and the latest record of a topic (the worker's first and
    last state write)."""
    consumer = Consumer(kafka_config(bootstrap, **{"group.id": f"span-{time.time()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([topic])
    first: int | None = None
    last: int | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = consumer.consume(1000, 1.0)
        stamps = [m.timestamp()[1] for m in batch if not m.error()]
        if stamps:
            first = min(stamps) if first is None else min(first, *stamps)
            last = max(stamps) if last is None else max(last, *stamps)
        elif first is not None:
            break
    consumer.close()
    return None if first is None or last is None else (first, last)


def produce(bootstrap: str, payments: list[dict[str, Any]], messages: list[tuple[int, bytes, int, int]]) -> None:
    producer = Producer(kafka_config(bootstrap, **{"linger.ms": 20, "compression.type": "lz4"}))
    partitions = T.default_partitions()
    for p in payments:
        produce_payment(producer, p, partitions)
    for shard, value, _, _ in messages:
        producer.produce(T.READINGS, key=shard_key(shard), partition=shard, value=value)
        producer.poll(0)
    producer.flush()


def wait_quiet(bootstrap: str, topic: str, quiet_s: float = 2.0, timeout: float = 120.0) -> None:
    """Until `topic` has records and none arrived for `quiet_s`."""
    probe = Consumer(kafka_config(bootstrap, **{"group.id": "probe"}))
    try:
        deadline = time.monotonic() + timeout
        last_total, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            try:
                total = sum(end_offsets(probe, topic).values())
            except Exception:  # the topic is created by the worker as it starts
                total = 0
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif total and time.monotonic() - last_change >= quiet_s:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{topic} did not settle within {timeout}s")
    finally:
        probe.close()


def throughput(bootstrap: str, config: Path, payments: list[dict[str, Any]],
               messages: list[tuple[int, bytes, int, int]],
               worker_env: dict[str, str] | None = None) -> tuple[float, float]:
    """Worker readings/s, end to end: the worker runs and has applied the opening top-ups; then
    the readings are produced in one burst. From the start of the burst to the worker's last
    state write (its changelog's create time), once its committed offsets show it consumed all
    the input. Returns (readings/s, seconds the burst took to produce)."""
    app_id = f"bench-tp-{int(time.time())}"
    probe = Consumer(kafka_config(bootstrap, **{"group.id": "probe"}))
    group = Consumer(kafka_config(bootstrap, **{"group.id": app_id}))
    proc = run_worker(config, bootstrap, app_id, worker_env)
    try:
        produce(bootstrap, payments, [])
        wait_quiet(bootstrap, changelog_topic(app_id))
        start_ms = time.time() * 1000
        produce(bootstrap, [], messages)
        produced_s = time.time() - start_ms / 1000
        target = sum(end_offsets(probe, T.READINGS).values())
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if committed_total(probe, group, T.READINGS) >= target:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited; see {BENCH_DIR / (app_id + '.log')}")
            time.sleep(0.2)
        span = write_span_ms(bootstrap, changelog_topic(app_id))
        if span is None or span[1] <= start_ms:
            return 0.0, produced_s
        return sum(m[2] for m in messages) / ((span[1] - start_ms) / 1000), produced_s
    finally:
        stop(proc)
        probe.close()
        group.close()


def latency(bootstrap: str, config: Path, data: dict[str, Any], messages: list[tuple[int, bytes, int, int]],
            rate: float, worker_env: dict[str, str] | None = None) -> list[float]:
    """Trip latencies (ms): input paced at `rate` readings/s into a fresh worker whose accounts hold
    random small balances, so trips happen all through the run; each trip is matched to the
    reading that caused it (same account shard, same reading timestamp)."""
    app_id = f"bench-lat-{int(time.time())}"
    merchants = [m["id"] for m in data["malls"][0]["merchants"]]
    rng = random.Random(7)
    partitions = T.default_partitions()
    env_extra = {**(worker_env or {}), "MALLWATT_OFFSET_RESET": "latest"}
    proc = run_worker(config, bootstrap, app_id, env_extra)
    producer = Producer(kafka_config(bootstrap, **{"linger.ms": 0}))
    tail = Consumer(kafka_config(bootstrap, **{"group.id": f"tail-{app_id}", "enable.auto.commit": False}))
    tail.assign([TopicPartition(T.RELAY_COMMANDS, p, o) for p, o in end_offsets(tail, T.RELAY_COMMANDS).items()])
    try:
        time.sleep(12)  # the worker joins the group (at the end of each partition)
        for account in merchants:
            p = {"payment_id": f"{app_id}-{account}", "account_id": account, "kind": "TOPUP", "provider": "bench",
                 "amount_minor": rng.randint(100, 20_000), "ts_ms": T0 - 1}
            produce_payment(producer, p, partitions)
        producer.flush()
        time.sleep(2)
        sent_ms: dict[tuple[int, int], float] = {}
        start = time.perf_counter()
        readings_sent = 0
        for shard, value, n, step in messages:
            delay = start + readings_sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.produce(T.READINGS, key=shard_key(shard), partition=shard, value=value)
            sent_ms[(shard, T0 + step * STEP)] = time.time() * 1000
            producer.poll(0)
            readings_sent += n
        producer.flush()
        latencies: list[float] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = tail.poll(0.5)
            if msg is None or msg.error():
                continue
            cmd = codec.decode("RelayCommand", msg.value())
            if cmd["action"] != "TRIP" or not cmd["account_id"]:
                continue
            cause = sent_ms.get((account_shard(cmd["account_id"], partitions), cmd["cause_ts_ms"]))
            if cause is not None:
                latencies.append(msg.timestamp()[1] - cause)
        return latencies
    finally:
        stop(proc)
        tail.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mallwatt bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stalls", type=int, default=1000, help="merchants (one circuit each; default 1000)")
    parser.add_argument("--steps", type=int, default=200, help="15-minute readings per circuit (default 200)")
    parser.add_argument("--json", action="store_true", help="print only the JSON figures on stdout")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the worker, e.g. MALLWATT_BATCH_WITHIN_MS=25 or "
                             "MALLWATT_LOG_STEPS=1 (its log is in var/bench-pipeline); repeatable")
    args = parser.parse_args(argv)
    worker_env: dict[str, str] = {}  # for the worker in both phases
    for item in args.worker_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--worker-env {item!r}: expected NAME=VALUE")
        worker_env[name] = value
    # SIGTERM unwinds like Ctrl-C, so the cleanup below always stops what was started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shutil.rmtree(BENCH_DIR, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True)
    kafka = broker.BrokerConfig.from_env(data_dir=BENCH_DIR / "kafka", port=PORT, controller_port=PORT + 1)
    log("starting a private broker")
    bootstrap = broker.start(kafka).bootstrap
    try:
        T.provision_topics(bootstrap)
        data, messages, payments = build_input(args.stalls, args.steps)
        config = BENCH_DIR / "portfolio.yaml"
        dump_portfolio(data, config)
        total = sum(m[2] for m in messages)
        log(f"throughput: one worker; {total} readings in {len(messages)} messages arrive while it runs")
        worker_rps, produced_s = throughput(bootstrap, config, payments, messages, worker_env)
        log("ceiling: bare consumer decoding the same topic")
        ceiling_rps = ceiling(bootstrap, total)
        log(f"trip latency: input paced at 50% of {worker_rps:.0f} readings/s")
        lat = latency(bootstrap, config, data, messages, max(100.0, worker_rps * 0.5), worker_env)
        result = {"readings": total, "messages": len(messages), "readings_per_message": total // len(messages),
                  "readings_per_s": round(worker_rps), "ceiling_readings_per_s": round(ceiling_rps),
                  "input_produce_s": round(produced_s, 2),
                  "ratio": round(worker_rps / ceiling_rps, 3) if ceiling_rps else None,
                  "trip_samples": len(lat), "trip_latency_ms_p50": round(percentile(lat, 0.5), 1),
                  "trip_latency_ms_p99": round(percentile(lat, 0.99), 1)}
    finally:
        broker.stop(kafka)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
