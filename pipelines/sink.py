"""Kafka -> ClickHouse sink.

Consumes the mallwatt fact topics (group `mallwatt-sink`, manual commits), buffers rows
per table and inserts them in batches (up to --max-rows rows or --max-delay seconds),
then commits the offsets of exactly what was inserted. A failed insert is retried until
it succeeds or the sink stops, and is never acknowledged, so a crash means replay, and
replay is harmless:

* every table is a ReplacingMergeTree keyed by data (readings: circuit + ts; ledger:
  entry_id...), and each insert carries insert_deduplication_token = table + offset
  ranges, so a retried block is dropped at insert time;
* the readings rollup only uses duplicate-insensitive aggregates, and ledger entries that
  are already stored are dropped before insert (pipelines.sink_tables);
* every --close-every seconds the sink closes the UTC days the intervals watermark has
  passed (billed hourly energies into billed_hour_kwh, infra.warehouse_catalog.close_days),
  again from the oldest day it inserted interval facts for since, so late facts are folded in.

Undecodable messages go to mallwatt.deadletter with the reason; the sink keeps going.
In embedded mode the sink owns the chDB folder and serves the warehouse query endpoint
(infra.warehouse), so `mallwatt sql` works while it runs.

    python -m pipelines.sink [--bootstrap HOST:PORT] [--chdb-path DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from infra import warehouse
from infra.kafka_security import kafka_config
from infra.warehouse_catalog import close_days
from pipelines import metrics as M
from pipelines.core.timeguard import DEFAULT_MAX_FUTURE_SKEW_S
from pipelines.logsetup import kafka_logger
from pipelines.sink_tables import (
    DEADLETTER_TOPIC,
    INTERVALS_TOPIC,
    LEDGER_TOPIC,
    TOPIC_TABLES,
    TopicTable,
    dead_letter_row,
    drop_known_ledger_rows,
    insert_arrow,
    watermark_event_ms,
)
from schemas import codec

log = logging.getLogger("mallwatt.sink")

GROUP_ID = "mallwatt-sink"
STAGE = "sink"
DEFAULT_TOPICS = tuple(TOPIC_TABLES)
# Rows per table per insert: every insert makes one part per table and rollup plus a
# watermark row and a commit, so small batches pay that many times (docs/warehouse.md).
DEFAULT_MAX_ROWS = 250_000
# Seconds between close_days runs (closing a day at full scale takes ~1 s; a day is closed
# once, the last RECOMPUTE_DAYS again on every run).
DEFAULT_CLOSE_EVERY = 300.0


def default_bootstrap() -> str:
    try:
        from infra.broker import bootstrap_servers
    except ImportError:
        return os.environ.get("MALLWATT_KAFKA") or "127.0.0.1:19092"
    return bootstrap_servers()


@dataclass
class _Buffer:
    """Rows waiting for one table, and the offsets they came from."""

    spec: TopicTable
    chunks: list[Any] = field(default_factory=list)
    rows: int = 0
    opened_at: float | None = None
    # partition -> [first offset, last offset, max event ts ms]
    ranges: dict[int, list[int]] = field(default_factory=dict)
    messages: Any = None  # this topic's mallwatt_sink_messages_total child
    consumed: int = 0  # messages not yet added to it (a counter inc costs ~10 int adds)

    def __post_init__(self) -> None:
        self.messages = M.SINK_MESSAGES.labels(self.spec.topic)

    def add(self, partition: int, offset: int, chunk: Any, rows: int, event_ms: int | None) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        if chunk is not None:
            self.chunks.append(chunk)
            self.rows += rows
        r = self.ranges.setdefault(partition, [offset, offset, -1])
        r[0], r[1] = min(r[0], offset), max(r[1], offset)
        if event_ms is not None:
            r[2] = max(r[2], event_ms)

    def due(self, max_rows: int, max_delay: float) -> bool:
        if self.opened_at is None:
            return False
        return self.rows >= max_rows or time.monotonic() - self.opened_at >= max_delay

    def token(self) -> str:
        spans = ",".join(f"{p}:{r[0]}-{r[1]}" for p, r in sorted(self.ranges.items()))
        return hashlib.sha1(f"{self.spec.table}|{self.spec.topic}|{spans}".encode()).hexdigest()


@dataclass
class SinkStats:
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows inserted
    messages: int = 0
    dead_letters: int = 0
    flushes: int = 0
    insert_failures: int = 0


class _Stopped(Exception):
    pass


class Sink:
    """One consumer, one producer (for dead letters), one warehouse client."""

    def __init__(
        self,
        client: Any,
        bootstrap: str,
        *,
        topics: Iterable[str] = DEFAULT_TOPICS,
        group_id: str = GROUP_ID,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_delay: float = 1.0,
        stop_event: threading.Event,
        consumer_config: dict[str, Any] | None = None,
        topic_prefix: str = "",
        close_every: float = DEFAULT_CLOSE_EVERY,
        max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_S * 1000,
    ) -> None:
        self.client = client
        # rows this far ahead of their message's broker time never advance the watermark
        self.max_future_skew_ms = max_future_skew_ms
        # 0 disables closing days (tests that count inserts, several sinks on one server:
        # one of them is enough).
        self.close_every = close_every
        self._closed_at = time.monotonic()
        self._oldest_read_day: dt.date | None = None  # oldest UTC day inserted since last close
        # A prefix renames every topic (tests, or several environments on one cluster).
        self.prefix = topic_prefix
        self.deadletter_topic = topic_prefix + DEADLETTER_TOPIC
        self.stop_event = stop_event
        self.max_rows, self.max_delay = max_rows, max_delay
        self.topics = list(topics)
        unknown = set(self.topics) - set(TOPIC_TABLES)
        if unknown:
            raise ValueError(f"no table for topics {sorted(unknown)}")
        self.buffers = {t: _Buffer(TOPIC_TABLES[t]) for t in self.topics}
        self.stats = SinkStats()
        self.consumer = Consumer(
            kafka_config(
                bootstrap,
                **{
                    "group.id": group_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    **M.lag_stats_config("sink"),
                    **kafka_logger("sink"),
                    **(consumer_config or {}),
                },
            )
        )
        self.producer = Producer(
            kafka_config(bootstrap, **{"enable.idempotence": True, **kafka_logger("sink")})
        )
        # readiness (/readyz): partitions assigned and the broker answering
        self.assigned = False
        self.broker_error: str | None = None
        self._watermarks: dict[str, dict[int, int]] = {}  # topic -> partition -> event ms
        self._last_report = time.monotonic()
        self._reported: dict[str, int] = {}

    # --- loop -------------------------------------------------------------------------

    def run(self) -> SinkStats:
        self.consumer.subscribe([self.prefix + t for t in self.topics], on_revoke=self._on_revoke,
                                on_assign=self._on_assign)
        try:
            while not self.stop_event.is_set():
                for msg in self.consumer.consume(num_messages=2000, timeout=0.2):
                    buf = self._handle(msg)
                    if buf is not None and buf.rows >= self.max_rows:
                        self._flush(buf)
                for buf in self.buffers.values():
                    if buf.consumed:  # metrics once per consumed batch, not per message
                        buf.messages.inc(buf.consumed)
                        buf.consumed = 0
                    if buf.due(self.max_rows, self.max_delay):
                        self._flush(buf)
                self._close_days()
                self._report()
            for buf in self.buffers.values():  # graceful stop: write what we have
                if buf.opened_at is not None:
                    self._flush(buf)
        except _Stopped:
            log.warning("stopped with unflushed rows; they will be replayed")
        finally:
            self.producer.flush(5)
            self.consumer.close()
        return self.stats

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = True  # the client assigns them itself after this callback

    def readiness(self) -> tuple[bool, str]:
        if self.broker_error:
            return False, f"broker unreachable: {self.broker_error}"
        if not self.assigned:
            return False, "waiting for partition assignment"
        return True, "ok"

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Write and commit before another member takes over, or it replays our buffer.
        topics = {tp.topic.removeprefix(self.prefix) for tp in partitions}
        try:
            for topic in topics & set(self.buffers):
                if self.buffers[topic].opened_at is not None:
                    self._flush(self.buffers[topic])
        except _Stopped:
            pass

    def _handle(self, msg: Message) -> _Buffer | None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._ALL_BROKERS_DOWN:
                self.broker_error = str(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            return None
        self.broker_error = None
        self.stats.messages += 1
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        buf = self.buffers[topic.removeprefix(self.prefix)]
        buf.consumed += 1
        try:
            chunk, rows, event_ms = buf.spec.decode(msg.value())
        except (codec.DecodeError, ValueError, KeyError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._dead_letter(msg, reason, buf)
            buf.add(partition, offset, None, 0, None)
            return buf
        stamp_type, stamp = msg.timestamp()
        broker_ms = stamp if stamp_type != TIMESTAMP_NOT_AVAILABLE and stamp > 0 else None
        event_ms = watermark_event_ms(buf.spec, chunk, event_ms, broker_ms, self.max_future_skew_ms)
        buf.add(partition, offset, chunk, rows, event_ms)
        return buf

    def _dead_letter(self, msg: Message, reason: str, buf: _Buffer) -> None:
        self.stats.dead_letters += 1
        record = {
            "source_topic": msg.topic(),
            "source_partition": msg.partition(),
            "source_offset": msg.offset(),
            "stage": STAGE,
            "reason": reason[:4000],
            "key": msg.key(),
            "value": (msg.value() or b"")[: 512 * 1024] or None,
            "ts_ms": int(time.time() * 1000),
        }
        M.DEAD_LETTERS.labels("sink", STAGE, M.reason_class(reason)).inc()
        log.warning("dead letter %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason,
                    extra={"topic": msg.topic(), "partition": msg.partition(),
                           "offset": msg.offset(), "stage": STAGE})
        if msg.topic() == self.deadletter_topic:
            # Never loop on the dead-letter topic: store the raw message directly.
            buf.chunks.append([dead_letter_row(record)])
            buf.rows += 1
            return
        self.producer.produce(
            self.deadletter_topic,
            key=msg.topic().encode(),
            value=codec.encode("DeadLetter", record),
        )
        self.producer.poll(0)

    # --- flush ------------------------------------------------------------------------

    def _flush(self, buf: _Buffer) -> None:
        table = buf.spec.to_arrow(buf.chunks) if buf.chunks else None
        token = buf.token()
        delay = 0.5
        t0 = time.perf_counter()
        while True:
            try:
                inserted = self._write(buf, table, token)
                break
            except Exception as exc:  # any failure: retry, never commit
                self.stats.insert_failures += 1
                M.SINK_INSERT_FAILURES.labels(_short(buf.spec.table)).inc()
                log.error("insert into %s failed (retry in %.1fs): %s", buf.spec.table, delay, exc,
                          extra={"table": buf.spec.table, "token": token,
                                 "offsets": {p: r[:2] for p, r in buf.ranges.items()}})
                if self.stop_event.wait(delay):
                    raise _Stopped from exc
                delay = min(delay * 2, 10.0)
        self.consumer.commit(
            offsets=[
                TopicPartition(self.prefix + buf.spec.topic, p, r[1] + 1)
                for p, r in buf.ranges.items()
            ],
            asynchronous=False,
        )
        self.stats.flushes += 1
        M.SINK_INSERT_SECONDS.labels(_short(buf.spec.table)).observe(time.perf_counter() - t0)
        if table is not None:
            self.stats.rows[buf.spec.table] = self.stats.rows.get(buf.spec.table, 0) + inserted
            M.SINK_ROWS.labels(_short(buf.spec.table)).inc(inserted)
        self._note_watermark(buf)
        buf.chunks, buf.rows, buf.opened_at, buf.ranges = [], 0, None, {}

    def _write(self, buf: _Buffer, table: Any, token: str) -> int:
        """Insert the rows, drain dead letters, advance the watermark; rows inserted."""
        if table is not None and buf.spec.topic == LEDGER_TOPIC:
            table = drop_known_ledger_rows(table, self.client)
        if table is not None and table.num_rows:
            insert_arrow(self.client, buf.spec.table, table, token)
            if buf.spec.topic == INTERVALS_TOPIC:  # billed energy: its hours are closed by day
                self._note_read_days(table)
        # Dead letters of this batch must be durable before its offsets are committed.
        if self.producer.flush(10) > 0:
            raise RuntimeError("dead-letter producer did not drain")
        now_ms = int(time.time() * 1000)
        rows = [
            [self.prefix + buf.spec.topic, p, r[1], r[2] if r[2] >= 0 else 0, now_ms]
            for p, r in buf.ranges.items()
        ]
        ts = pa.timestamp("ms", tz="UTC")
        insert_arrow(
            self.client,
            f"{warehouse.DATABASE}.ingest_watermark",
            pa.table(
                {
                    "topic": pa.array([r[0] for r in rows], pa.string()),
                    "partition": pa.array([r[1] for r in rows], pa.int32()),
                    "max_offset": pa.array([r[2] for r in rows], pa.int64()),
                    "max_event_ts": pa.array([r[3] for r in rows], ts),
                    "updated_at": pa.array([r[4] for r in rows], ts),
                }
            ),
        )
        return 0 if table is None else table.num_rows

    def _note_watermark(self, buf: _Buffer) -> None:
        """mallwatt_sink_watermark_*: the oldest of the partitions' newest event times."""
        topic = self.prefix + buf.spec.topic
        known = self._watermarks.get(topic)
        if known is None:
            known = self._watermarks[topic] = {}
            M.SINK_WATERMARK_AGE.labels(topic).set_function(lambda k=known: (
                time.time() - min(k.values()) / 1000 if k else 0.0))
        for p, r in buf.ranges.items():
            if r[2] >= 0:
                known[p] = max(known.get(p, 0), r[2])
        if known:
            M.SINK_WATERMARK.labels(topic).set(min(known.values()) / 1000)

    def _note_read_days(self, table: pa.Table) -> None:
        first = pc.min(table.column("end_ts")).as_py()
        if first is not None:  # an interval belongs to the hour of its last millisecond
            day = (first - dt.timedelta(milliseconds=1)).astimezone(dt.UTC).date()
            if self._oldest_read_day is None or day < self._oldest_read_day:
                self._oldest_read_day = day

    def _close_days(self) -> None:
        """Close the days the intervals watermark has passed, recomputing from the oldest
        day read since the last run (late reads of a closed day). A failure is logged and
        tried again next time: queries derive unclosed days from circuit_daily anyway."""
        if self.close_every <= 0 or time.monotonic() - self._closed_at < self.close_every:
            return
        self._closed_at = time.monotonic()
        oldest, self._oldest_read_day = self._oldest_read_day, None
        try:
            t0 = time.monotonic()
            done = close_days(self.client, from_day=oldest, topic=self.prefix + INTERVALS_TOPIC)
            if done is not None:
                log.info("closed days %s..%s in %.1fs", done[0], done[1], time.monotonic() - t0)
        except Exception as exc:  # the engine's error, whatever its class
            log.error("closing days failed (next try in %.0fs): %s", self.close_every, exc)
            if oldest is not None and (
                self._oldest_read_day is None or oldest < self._oldest_read_day
            ):
                self._oldest_read_day = oldest

    def _report(self, every: float = 10.0) -> None:
        now = time.monotonic()
        elapsed = now - self._last_report
        if elapsed < every:
            return
        parts = []
        for table, total in sorted(self.stats.rows.items()):
            delta = total - self._reported.get(table, 0)
            if delta:
                parts.append(f"{table.split('.')[-1]} {delta / elapsed:,.0f} rows/s")
        self._reported = dict(self.stats.rows)
        self._last_report = now
        if parts or self.stats.dead_letters:
            log.info("%s; dead letters %d", ", ".join(parts) or "idle", self.stats.dead_letters)


def _short(table: str) -> str:
    return table.rsplit(".", 1)[-1]  # metrics label: the table without its database


def run_sink(
    stop_event: threading.Event,
    bootstrap: str | None = None,
    *,
    chdb_path: str | os.PathLike[str] | None = None,
    topics: Iterable[str] = DEFAULT_TOPICS,
    group_id: str = GROUP_ID,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_delay: float = 1.0,
    serve: bool = True,
    consumer_config: dict[str, Any] | None = None,
    topic_prefix: str = "",
    portfolio: Any = None,
    close_every: float = DEFAULT_CLOSE_EVERY,
    metrics_port: int = -1,
) -> SinkStats:
    """Run until `stop_event` is set; owns the warehouse (and its endpoint) meanwhile.

    `metrics_port` >= 0: serve /metrics, /healthz and /readyz there (pipelines.metrics).

    `portfolio` (pipelines.portfolio.Portfolio): load the analytics dimension tables from
    it first (idempotent; infra.warehouse_dims).
    """
    with warehouse.open_owner(chdb_path, serve=serve) as owner:
        if portfolio is not None:
            from infra.warehouse_dims import load_dimensions

            log.info("dimensions loaded: %s", load_dimensions(owner.client, portfolio))
        sink = Sink(
            owner.client,
            bootstrap or default_bootstrap(),
            topics=topics,
            group_id=group_id,
            max_rows=max_rows,
            max_delay=max_delay,
            stop_event=stop_event,
            consumer_config=consumer_config,
            topic_prefix=topic_prefix,
            close_every=close_every,
            max_future_skew_ms=(portfolio.time.max_future_skew_s if portfolio is not None
                                else DEFAULT_MAX_FUTURE_SKEW_S) * 1000,
        )
        log.info("sink started: topics %s, group %s", ", ".join(sink.topics), group_id)
        server = M.serve(metrics_port, ready=sink.readiness)
        try:
            stats = sink.run()
        finally:
            if server is not None:
                server.close()
    log.info("sink stopped: %s", stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt sink",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--bootstrap", help="Kafka bootstrap servers (default MALLWATT_KAFKA or 127.0.0.1:19092)"
    )
    parser.add_argument(
        "--chdb-path", help="embedded chDB folder (default MALLWATT_CHDB_PATH or var/chdb)"
    )
    parser.add_argument("--group", default=GROUP_ID)
    parser.add_argument(
        "--topics", nargs="+", default=list(DEFAULT_TOPICS), choices=list(DEFAULT_TOPICS)
    )
    parser.add_argument(
        "--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per table per insert"
    )
    parser.add_argument("--max-delay", type=float, default=1.0, help="seconds a row may wait")
    parser.add_argument("--no-serve", action="store_true", help="do not serve the query endpoint")
    parser.add_argument(
        "--close-every",
        type=float,
        default=DEFAULT_CLOSE_EVERY,
        help="seconds between closing the finished days' hourly energies (0: never)",
    )
    parser.add_argument("--config", help="portfolio YAML: load the analytics dimensions at start")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /healthz, /readyz (default MALLWATT_SINK_METRICS_PORT or 9462; "
        "negative: off)",
    )
    args = parser.parse_args(argv)
    from pipelines.logsetup import configure

    configure("sink", level=logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_sink(
        stop,
        args.bootstrap,
        chdb_path=args.chdb_path,
        topics=args.topics,
        group_id=args.group,
        max_rows=args.max_rows,
        max_delay=args.max_delay,
        serve=not args.no_serve,
        close_every=args.close_every,
        portfolio=_load_config(args.config) if args.config else None,
        metrics_port=M.metrics_port("sink", args.metrics_port),
    )
    return 0


def _load_config(path: str) -> Any:
    from pipelines.portfolio import load_portfolio

    return load_portfolio(path)


if __name__ == "__main__":
    sys.exit(main())
