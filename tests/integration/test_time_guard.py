"""Bounded time on the real broker: a future and a year-3000 reading are dead-lettered by name,
the rest of their message is billed, and the circuit keeps billing afterwards."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Producer
from kafka_tail import TopicTail
from test_worker import T0, topup, worker  # noqa: F401  (worker is a fixture)

from infra import topics as T
from pipelines.portfolio import parse_portfolio
from schemas import codec, readings
from schemas.keys import account_shard, shard_key

pytestmark = pytest.mark.integration
Y3000 = int(datetime(3000, 1, 1, tzinfo=UTC).timestamp() * 1000)


def test_future_readings_dead_lettered_and_circuit_keeps_billing(
        kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:  # noqa: F811
    data, _ = worker
    mall = parse_portfolio(data).malls[0]
    merchant = mall.merchants[0]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    circuit = meter.circuits[0].id
    shard = account_shard(merchant.id, T.default_partitions())
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    dead = TopicTail(kafka_bootstrap, T.DEADLETTER, "DeadLetter")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    topup(producer, merchant.id, shard, f"{merchant.id}-open", 100_000, T0 - 1000)
    tomorrow = int(time.time() * 1000) + 86_400_000  # ahead of the message time (the producer's clock)

    def send(seq: int, ts: list[int], kwh: list[float]) -> None:
        n = len(ts)
        frame = pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter.id] * n,
                              "account_id": [merchant.id] * n, "ts_ms": ts, "import_kwh": kwh})
        batch = readings.frame_to_batch(frame, batch_id=f"{merchant.id}/{seq}", collector_id="test",
                                        mall_id=mall.id, shard=shard, seq=seq, collected_at_ms=T0)
        producer.produce(T.READINGS, key=shard_key(shard), partition=shard,
                         value=codec.encode("ReadingBatch", batch))
        producer.flush(10)

    send(1, [T0, T0 + 900_000], [100.0, 101.0])
    send(2, [T0 + 1_800_000, tomorrow, Y3000], [102.0, 500.0, 900.0])
    send(3, [T0 + 2_700_000, T0 + 3_600_000], [103.0, 104.0])

    letter = dead.wait_for(lambda d: d["source_topic"] == T.READINGS and circuit in d["reason"], timeout=90)
    assert letter["stage"] == "routing"
    assert "1 reading(s) refused, ts more than 300 s ahead of the broker time" in letter["reason"]
    assert "1 reading(s) refused, ts not a plausible epoch-ms time" in letter["reason"]
    assert f"{circuit}@3000-01-01T00:00:00Z" in letter["reason"]
    # every real interval is billed at 1 kWh, including the good reading of message 2 and those after
    last = ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["ts_ms"] == T0 + 3_600_000)
    assert last["energy_wh"] == 1000 and last["kind"] == "charge"
    charged = ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["ts_ms"] == T0 + 1_800_000)
    assert charged["energy_wh"] == 1000
