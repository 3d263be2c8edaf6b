"""The forwarder's CPU per reading, in-process, on changelog records of portfolio shape.

`mallwatt bench fwdcost --merchants 350000` bills live-shaped steps with the worker's own
code path (bench/worker_step.py: decode, route, bill, `Envelope.to_bytes`) and keeps the
changelog values it writes (cached in /tmp/perf350k-portfolio/<merchants>/), then feeds
them to `pipelines.forwarder.Forwarder._step` through a stand-in consumer (`--batch`
records per consume, each partition's records in a run, as librdkafka hands out a fetch)
and producer (counts messages and bytes; acknowledges at the next poll). No broker: the
figure is the forwarder's decode + encode + produce-call path only.

`--path both` (default) runs the code before this bench's change (`RowForwarder`: rows
through a polars frame, a batch over the size limit found by encoding it) and the current
one alternately, `--repeat` times each, and prints the ratio of their medians (one run,
one machine state). Prints JSON: cpu_us_per_reading, per ledger entry and per interval
row, records, entries, interval rows, messages and bytes out. `--kafka BOOTSTRAP` (a
PRIVATE broker only) also times each path as a process through it: the records produced to
a fresh changelog topic, the real clients, process CPU until the group committed the end.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra import topics as T
from pipelines.envelope import outbox_of
from pipelines.forwarder import (
    INTERVAL_BATCH_ROWS,
    LEDGER_BATCH_ENTRIES,
    Forwarder,
    bounded_messages,
    log,
)
from pipelines.signing import sign_relay_value
from schemas import codec
from schemas.intervals import INTERVAL_ROWS, rows_to_interval_batch
from schemas.ledger import LEDGER_COLUMNS, LEDGER_ROWS, frame_to_ledger_batch, rows_to_frame

CHANGELOG = "mallwatt-billing-accounts-changelog"


class StubMessage:
    """What the forwarder reads of a consumed changelog record."""

    __slots__ = ("_topic", "_partition", "_offset", "_value")

    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> None:
        return None


class StubConsumer:
    """Hands out the given batches, one per consume(), then nothing."""

    def __init__(self, batches: list[list[StubMessage]]) -> None:
        self._batches: Iterator[list[StubMessage]] = iter(batches)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[StubMessage]:
        return next(self._batches, [])

    def assignment(self) -> list[Any]:
        return []

    def position(self, partitions: list[Any]) -> list[Any]:
        return []

    def commit(self, *args: Any, **kwargs: Any) -> None:
        return None


class StubProducer:
    """Counts what is produced (and keeps it with `keep`); acknowledges at the next poll."""

    def __init__(self, keep: bool = False) -> None:
        self.messages = 0
        self.bytes = 0
        self.kept: list[tuple[str, bytes, bytes, int]] = []
        self._keep = keep
        self._pending: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any = None, partition: int = -1) -> None:
        self.messages += 1
        self.bytes += len(value)
        if self._keep:
            self.kept.append((topic, key, value, partition))
        if on_delivery is not None:
            self._pending.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for callback in pending:
            callback(None, None)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


def _old_unpack_ledger_rows(value: bytes) -> list[tuple[Any, ...]]:
    import msgpack

    width = len(LEDGER_COLUMNS)
    return [tuple(row) if len(row) == width else (*row, *([None] * (width - len(row))))
            for row in msgpack.unpackb(value, raw=False)]


def _old_unpack_interval_rows(value: bytes) -> list[tuple[Any, ...]]:
    import msgpack

    return [tuple(row) for row in msgpack.unpackb(value, raw=False)]


class RowForwarder(Forwarder):
    """The forwarder's decode and encode path before the columnar change (main c687078): the
    reference the new path's messages are compared with (tests) and measured against."""

    def _forward(self, raw: bytes | None, ledger_rows: list[Any], interval_rows: list[Any] | None = None) -> None:
        if raw is None:
            return
        try:
            outbox = outbox_of(raw)
        except (ValueError, struct.error) as exc:
            log.error("forwarder: unreadable changelog record skipped: %s", exc)
            return
        for item in outbox:
            if item.topic == LEDGER_ROWS:
                ledger_rows += _old_unpack_ledger_rows(item.value)
            elif item.topic == INTERVAL_ROWS:
                if interval_rows is not None:
                    interval_rows += _old_unpack_interval_rows(item.value)
            elif item.topic == T.RELAY_COMMANDS:
                self._produce(item.topic, item.key, sign_relay_value(self._signer, item.value), item.partition)
                self.metrics.output(item.topic, item.value)
            else:
                self._produce(item.topic, item.key, item.value, item.partition)
                self.metrics.output(item.topic, item.value)
        self._producer.poll(0)

    def _publish_ledger(self, topic: str, partition: int, rows: list[Any], first: int) -> None:
        def encode(part: list[tuple[Any, ...]], start: int) -> bytes:
            batch = frame_to_ledger_batch(rows_to_frame(part), f"{topic}:{partition}@{first}+{start}")
            return codec.encode("LedgerBatch", batch)

        for value in bounded_messages(rows, LEDGER_BATCH_ENTRIES, encode):
            self._produce(T.LEDGER, f"p{partition}".encode(), value)
        self.metrics.batch(T.LEDGER, len(rows))

    def _publish_intervals(self, topic: str, partition: int, rows: list[Any], first: int) -> None:
        def encode(part: list[tuple[Any, ...]], start: int) -> bytes:
            return codec.encode("IntervalBatch", rows_to_interval_batch(part, f"{topic}:{partition}@{first}+{start}"))

        for value in bounded_messages(rows, INTERVAL_BATCH_ROWS, encode):
            self._produce(T.INTERVALS, f"p{partition}".encode(), value)
        self.metrics.batch(T.INTERVALS, len(rows))


def forward_all(kind: type[Forwarder], batches: list[list[StubMessage]], keep: bool = False
                ) -> tuple[float, StubProducer]:
    """CPU seconds of forwarding every batch (one `_step` each) and the producer stand-in."""
    producer = StubProducer(keep)
    forwarder = kind("stub:0", CHANGELOG, consumer=StubConsumer(batches), producer=producer)
    started = time.process_time()
    for _ in batches:
        forwarder._step()
    producer.flush()
    return time.process_time() - started, producer


def consume_batches(records: list[tuple[int, bytes | None]], batch: int, order: str = "runs",
                    topic: str = CHANGELOG) -> list[list[StubMessage]]:
    """Records (partition, value) in written order as consume() batches of `batch` records:
    "runs" gives each partition's records together (as one fetch response hands them out),
    "interleaved" keeps the written order."""
    offsets: dict[int, int] = {}
    messages = []
    for partition, value in records:
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        messages.append(StubMessage(topic, partition, offset, value))
    if order == "runs":
        messages.sort(key=lambda m: m.partition())  # stable: each partition keeps its order
    return [messages[i:i + batch] for i in range(0, len(messages), batch)]


def capture(merchants: int, messages: int, steps: int, backlog: int = 1) -> dict[str, Any]:
    """Changelog values (partition, value) of `steps` live steps of `messages` ReadingBatch
    messages each, billed by the worker's code path (bench/worker_step.py), and the readings."""
    import asyncio
    import shutil

    import polars as pl

    from bench.scale_input import LiveInput, choose_trip_accounts, opening_payments
    from bench.worker_step import Msg, StepStore, roster_of
    from pipelines import batching, billing
    from schemas.readings import batch_to_frame, checked_batch

    roster = roster_of(merchants)
    ctx = billing.ContextHolder(roster.config, 8).current()
    live = LiveInput(roster, 8, 60.0, choose_trip_accounts(roster, 100))
    directory = f"/tmp/fwdcost-store-{merchants}"
    shutil.rmtree(directory, ignore_errors=True)
    store = StepStore(directory, None, "fwdcost-changelog")
    loop = asyncio.new_event_loop()
    offsets = [0] * 8

    def bill(cycles: list[int]) -> tuple[int, list[tuple[int, bytes | None]]]:
        msgs = []
        for cycle in cycles:
            for m in live.cycle(cycle)[:messages]:
                msgs.append(Msg(m.partition, offsets[m.partition], m.value, m.ts_ms))
                offsets[m.partition] += 1
        frames = [(m.partition, m.offset, checked_batch(codec.decode("ReadingBatch", m.value)),
                   int(m.timestamp * 1000)) for m in msgs]
        frame = batching.messages_frame(frames)
        routed = batching.route_readings(frame, ctx)
        written: list[tuple[int, bytes | None]] = []
        envs = {key: store.load(key) for key in routed.buckets}
        for changed in batching.apply_readings_many(envs, routed, ctx):
            store.store_all(changed, ctx)
            for part, writes in store.unsent.items():
                written += [(part, value) for _, value in writes]
            loop.run_until_complete(store.written())
        return frame.height, written

    first = live.cycle(0)[:messages]
    accounts = set(pl.concat([batch_to_frame(codec.decode("ReadingBatch", m.value)) for m in first])["account_id"])
    pays = [(ctx.partition_of_key(p["account_id"]), i, p) for i, p in enumerate(opening_payments(live))
            if p["account_id"] in accounts]
    envs = {ctx.bucket_of(p[2]["account_id"]): store.load(ctx.bucket_of(p[2]["account_id"])) for p in pays}
    for changed in batching.apply_payments_many(envs, pays, ctx, now_ms=None):
        store.store_all(changed, ctx)
    loop.run_until_complete(store.written())
    bill([0])  # baselines: a circuit's first reading bills nothing
    readings = 0
    records: list[tuple[int, bytes | None]] = []
    for step in range(steps):
        billed, written = bill(list(range(1 + step * backlog, 1 + (step + 1) * backlog)))
        readings += billed
        records += written
    store.close()
    shutil.rmtree(directory, ignore_errors=True)
    return {"merchants": merchants, "messages": messages, "steps": steps, "backlog": backlog,
            "readings": readings, "records": records}


def through_kafka(bootstrap: str, records: list[tuple[int, bytes | None]], paths: dict[str, type[Forwarder]],
                  repeat: int) -> dict[str, list[float]]:
    """Process CPU seconds (every thread: librdkafka's fetch, decompression and produce
    included) of forwarding `records` from a changelog topic on a (private) broker, per path:
    from the forwarder's start until its group has committed the end of every partition."""
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    partitions = max(p for p, _ in records) + 1
    topic = f"fwdcost-changelog-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": "lz4", "linger.ms": 20})
    for partition, value in records:  # as the worker's changelog writer: lz4, batched
        while True:
            try:
                producer.produce(topic, value=value, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "fwdcost-probe", "enable.auto.commit": False})
    ends = [TopicPartition(topic, p, probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
            for p in range(partitions)]
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(repeat):
            for name, kind in paths.items():
                group = f"fwdcost-{name}-{uuid.uuid4().hex[:8]}"
                forwarder = kind(bootstrap, topic, group=group)
                watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
                started = time.process_time()
                forwarder.start()
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    time.sleep(0.2)
                    done = watcher.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
                    # a partition without records has no committed offset (-1001): skip it
                    if all(c.offset >= e.offset for c, e in zip(done, ends, strict=True) if e.offset > 0):
                        break
                else:
                    raise RuntimeError(f"{name}: the forwarder did not commit the changelog's end within 300 s")
                seconds[name].append(time.process_time() - started)
                watcher.close()
                forwarder.stop()
    finally:
        probe.close()
        admin.delete_topics([topic])
    return seconds


def row_counts(records: list[tuple[int, bytes | None]]) -> tuple[int, int]:
    """Ledger entries and interval rows in the records' outboxes."""
    import msgpack

    entries = intervals = 0
    for _, value in records:
        for item in outbox_of(value) if value else []:
            if item.topic == LEDGER_ROWS:
                entries += len(msgpack.unpackb(item.value))
            elif item.topic == INTERVAL_ROWS:
                intervals += len(msgpack.unpackb(item.value))
    return entries, intervals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mallwatt bench fwdcost", description=__doc__.split("\n\n")[0])
    p.add_argument("--merchants", type=int, default=350_000)
    p.add_argument("--messages", type=int, default=256, help="ReadingBatch messages per billed step")
    p.add_argument("--steps", type=int, default=4, help="billed steps whose changelog is forwarded")
    p.add_argument("--backlog", type=int, default=1, help="cycles per billed step (catch-up: several)")
    p.add_argument("--batch", type=int, default=500, help="records per consume (the forwarder's 500)")
    p.add_argument("--order", choices=("runs", "interleaved"), default="runs")
    p.add_argument("--path", choices=("both", "new", "old"), default="both")
    p.add_argument("--repeat", type=int, default=3, help="timed passes of each path")
    p.add_argument("--profile", default=None, help="cProfile stats of one pass of the new path to this file")
    p.add_argument("--kafka", default=None, help="bootstrap of a PRIVATE broker: also time the forwarder "
                   "process through it (librdkafka included); its outputs go to the real output topics")
    p.add_argument("--json", action="store_true", help="(the output is always JSON)")
    args = p.parse_args(argv)

    cache = Path(f"/tmp/perf350k-portfolio/{args.merchants}/fwdcost-{args.messages}x{args.steps}x{args.backlog}.pkl")
    if cache.exists():
        captured = pickle.loads(cache.read_bytes())
    else:
        started = time.monotonic()
        captured = capture(args.merchants, args.messages, args.steps, args.backlog)
        print(f"captured {len(captured['records'])} records in {time.monotonic() - started:.0f} s", file=sys.stderr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(captured))
    records = captured["records"]
    readings = captured["readings"]
    entries, intervals = row_counts(records)
    batches = consume_batches(records, args.batch, args.order)
    paths = {"old": RowForwarder, "new": Forwarder}
    chosen = ["old", "new"] if args.path == "both" else [args.path]
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    out: dict[str, StubProducer] = {}
    forward_all(paths[chosen[-1]], batches[:2])  # warm-up: imports, schema parsing, signer
    for _ in range(args.repeat):
        for name in chosen:
            cpu, out[name] = forward_all(paths[name], batches)
            seconds[name].append(cpu)
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        forward_all(paths[chosen[-1]], batches)
        prof.disable()
        prof.dump_stats(args.profile)
    result: dict[str, Any] = {
        "merchants": captured["merchants"], "messages_per_step": captured["messages"], "steps": captured["steps"],
        "backlog": captured["backlog"], "readings": readings, "records": len(records), "entries": entries,
        "interval_rows": intervals, "batch": args.batch, "order": args.order,
    }
    for name in chosen:
        cpu = statistics.median(seconds[name])
        result[name] = {"cpu_us_per_reading": round(cpu / readings * 1e6, 2),
                        "cpu_us_per_entry": round(cpu / max(entries, 1) * 1e6, 2),
                        "cpu_us_per_interval_row": round(cpu / max(intervals, 1) * 1e6, 2),
                        "cpu_s_per_1000_readings": round(cpu / readings * 1000, 4),
                        "passes_s": [round(s, 3) for s in seconds[name]],
                        "messages_out": out[name].messages, "bytes_out": out[name].bytes}
    if args.kafka:
        kafka = through_kafka(args.kafka, records, {name: paths[name] for name in chosen}, args.repeat)
        for name in chosen:
            cpu = statistics.median(kafka[name])
            result[name]["kafka_cpu_us_per_reading"] = round(cpu / readings * 1e6, 2)
            result[name]["kafka_passes_s"] = [round(s, 3) for s in kafka[name]]
        if len(chosen) == 2:
            result["kafka_ratio_new_old"] = round(statistics.median(kafka["new"]) / statistics.median(kafka["old"]), 3)
    if len(chosen) == 2:
        result["ratio_new_old"] = round(statistics.median(seconds["new"]) / statistics.median(seconds["old"]), 3)
        result["same_bytes_out"] = out["new"].bytes == out["old"].bytes
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
