"""`mallwatt export-input`: the stream's input as read back from Kafka, for replay.

    mallwatt export-input --out DIR [--from-ms EPOCH_MS]

Writes DIR/readings.parquet, DIR/payments.parquet and DIR/outcomes.parquet (relay outcomes,
for `replay --outcomes`): every reading, payment and outcome with the
Kafka position of the message that brought it (``partition``, ``offset``) and its message
timestamp (``msg_ts_ms``), which `mallwatt replay --arrival-order` needs to bill them in the
stream's order. Each partition keeps its offset order; partitions are merged by message time
(the order between partitions does not change any account). Readings are written in row
groups as they are read, so memory holds one group, not the topic. Undecodable messages are
skipped with a count (the stream dead-letters them).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from confluent_kafka import Consumer, TopicPartition

from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.core.money_authority import MONEY_RECORD, needs_signature
from schemas import codec
from schemas.readings import batch_to_frame

ROW_GROUP = 200_000


def _messages(bootstrap: str, topic: str, partition: int, start: int, end: int) -> Iterator[Any]:
    """Messages of one partition from `start` up to (not including) `end`, in offset order."""
    if start >= end:
        return
    consumer = Consumer(kafka_config(bootstrap, **{"group.id": "mallwatt-export-input",
                         "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, partition, start)])
    try:
        while True:
            msg = consumer.poll(5.0)
            if msg is None:
                raise RuntimeError(f"{topic}[{partition}]: no message at offset >= {start} within 5 s (end {end})")
            if msg.error():
                continue
            yield msg
            if msg.offset() >= end - 1:
                return
    finally:
        consumer.close()


def ranges(bootstrap: str, topic: str, start: dict[int, int] | None = None, from_ms: int | None = None
           ) -> dict[int, tuple[int, int]]:
    """partition -> (first offset, end offset) to export: from `start` (or the first message at
    or after `from_ms`, or the beginning) to the end offsets of now."""
    consumer = Consumer(kafka_config(bootstrap, **{"group.id": "mallwatt-export-input"}))
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        out = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            first = low
            if start is not None:
                first = max(low, start.get(p, low))
            elif from_ms is not None:
                found = consumer.offsets_for_times([TopicPartition(topic, p, from_ms)], timeout=10)[0].offset
                first = high if found < 0 else found
            out[p] = (first, high)
        return out
    finally:
        consumer.close()


def _merged(bootstrap: str, topic: str, spans: dict[int, tuple[int, int]]) -> Iterator[Any]:
    streams = [_messages(bootstrap, topic, p, a, b) for p, (a, b) in spans.items()]
    # each partition stays in offset order; partitions interleave by message time
    return heapq.merge(*streams, key=lambda m: (m.timestamp()[1], m.partition(), m.offset()))


def export_readings(bootstrap: str, path: Path, spans: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """Write readings with their positions; returns (rows, undecodable messages)."""
    writer: pq.ParquetWriter | None = None
    frames: list[pl.DataFrame] = []
    rows = bad = buffered = 0

    def flush() -> None:
        nonlocal writer, frames, buffered
        if not frames:
            return
        table = pl.concat(frames, how="vertical_relaxed").to_arrow()
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table.cast(writer.schema))
        frames, buffered = [], 0

    for msg in _merged(bootstrap, T.READINGS, spans):
        try:
            frame = batch_to_frame(codec.decode("ReadingBatch", msg.value()))
        except (codec.DecodeError, ValueError, KeyError):
            bad += 1
            continue
        ts = msg.timestamp()[1]
        frames.append(frame.with_columns(partition=pl.lit(msg.partition(), pl.Int64),
                                         offset=pl.lit(msg.offset(), pl.Int64),
                                         msg_ts_ms=pl.lit(ts if ts > 0 else None, pl.Int64)))
        rows += frame.height
        buffered += frame.height
        if buffered >= ROW_GROUP:
            flush()
    flush()
    if writer is None:
        pl.DataFrame(schema={"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64,
                             "import_kwh": pl.Float64, "partition": pl.Int64, "offset": pl.Int64,
                             "msg_ts_ms": pl.Int64}).write_parquet(path)
    else:
        writer.close()
    return rows, bad


def export_payments(bootstrap: str, path: Path, spans: dict[int, tuple[int, int]]) -> tuple[int, int]:
    records: list[dict[str, Any]] = []
    bad = 0
    for msg in _merged(bootstrap, T.PAYMENTS, spans):
        try:
            p = codec.decode("Payment", msg.value())
        except (codec.DecodeError, ValueError, KeyError):
            bad += 1
            continue
        ts = msg.timestamp()[1]
        records.append({"payment_id": p["payment_id"], "account_id": p["account_id"], "kind": str(p["kind"]).lower(),
                        "amount_minor": p["amount_minor"], "ts_ms": p["ts_ms"],
                        "reverses_payment_id": p.get("reverses_payment_id"), "partition": msg.partition(),
                        "offset": msg.offset(), "msg_ts_ms": ts if ts > 0 else None,
                        # a manual top-up's whole record: replay repeats the stream's signature check
                        MONEY_RECORD: json.dumps(p, sort_keys=True) if needs_signature(p) else None})
    pl.DataFrame(records, schema={"payment_id": pl.String, "account_id": pl.String, "kind": pl.String,
                                  "amount_minor": pl.Int64, "ts_ms": pl.Int64, "reverses_payment_id": pl.String,
                                  "partition": pl.Int64, "offset": pl.Int64, "msg_ts_ms": pl.Int64,
                                  MONEY_RECORD: pl.String}
                 ).write_parquet(path)
    return len(records), bad


def export_outcomes(bootstrap: str, path: Path, spans: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """The relay outcomes with their positions and message times: replay's power loop places
    them by arrival (`mallwatt replay --arrival-order --outcomes`)."""
    from pipelines.replay_relay import OUTCOME_SCHEMA

    records: list[dict[str, Any]] = []
    bad = 0
    for msg in _merged(bootstrap, T.RELAY_OUTCOMES, spans):
        try:
            o = codec.decode("RelayOutcome", msg.value())
        except (codec.DecodeError, ValueError, KeyError):
            bad += 1
            continue
        ts = msg.timestamp()[1]
        records.append({**{k: o.get(k) for k in OUTCOME_SCHEMA if k in o}, "action": str(o["action"]),
                        "status": str(o["status"]), "relay_after": str(o["relay_after"]),
                        "partition": msg.partition(), "offset": msg.offset(), "msg_ts_ms": ts if ts > 0 else None})
    pl.DataFrame(records, schema=OUTCOME_SCHEMA).write_parquet(path)
    return len(records), bad


def export_input(bootstrap: str, out: Path, start: dict[str, dict[int, int]] | None = None,
                 from_ms: int | None = None) -> dict[str, Any]:
    """Export readings, payments and relay outcomes (from `start[topic][partition]` offsets, or
    `from_ms`)."""
    out.mkdir(parents=True, exist_ok=True)
    start = start or {}
    r_spans = ranges(bootstrap, T.READINGS, start.get(T.READINGS), from_ms)
    p_spans = ranges(bootstrap, T.PAYMENTS, start.get(T.PAYMENTS), from_ms)
    o_spans = ranges(bootstrap, T.RELAY_OUTCOMES, start.get(T.RELAY_OUTCOMES), from_ms)
    readings, bad_r = export_readings(bootstrap, out / "readings.parquet", r_spans)
    payments, bad_p = export_payments(bootstrap, out / "payments.parquet", p_spans)
    outcomes, bad_o = export_outcomes(bootstrap, out / "outcomes.parquet", o_spans)
    return {"readings": readings, "payments": payments, "outcomes": outcomes,
            "undecodable_messages": bad_r + bad_p + bad_o}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt export-input", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for readings.parquet, payments.parquet and "
                                                 "outcomes.parquet")
    ap.add_argument("--from-ms", type=int, help="start at the first message at or after this broker time "
                                                "(epoch ms; default: the beginning of each partition)")
    a = ap.parse_args(argv)
    from infra.broker import bootstrap_servers

    print(json.dumps(export_input(bootstrap_servers(), Path(a.out), from_ms=a.from_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
