"""Poll results -> one ReadingBatch per account shard per flush -> spool -> Kafka.

Readings are grouped by the shard of their account (schemas.keys.account_shard), so a
batch lands on the partition whose worker owns those accounts' money. A flush happens
every `flush_interval_s` or when `max_readings` are waiting. Every message (readings,
collector events, relay outcomes) is appended to the spool first; the spool's Drainer
produces it, so an outage or a crash costs delay, never data.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import polars as pl
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from collectors.mapping import CollectorPlan
from collectors.poller import PollEvent, PollResult, wall_clock_ms
from collectors.spool import ID_HEADER, Drainer, Spool, SpoolRecord
from infra import topics as T
from infra.kafka_security import kafka_config
from schemas import codec
from schemas.keys import account_shard, shard_key
from schemas.readings import FLOAT_COLUMNS, FRAME_SCHEMA, RELAY_CODES, frame_to_batch

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    # an outage surfaces (and the lane is re-checked) after 10 s instead of 5 minutes
    "message.timeout.ms": 10_000,
    "linger.ms": 5,
}


Address = str | Callable[[], str]


def _resolve(bootstrap: Address) -> str:
    return bootstrap() if callable(bootstrap) else bootstrap


def kafka_producer_factory(bootstrap: Address, **overrides: Any) -> Callable[[], Producer]:
    """Each call builds a producer for the address as it is now (a callable may change)."""
    return lambda: Producer(kafka_config(_resolve(bootstrap), **{**PRODUCER_DEFAULTS,
                             **overrides}))


def kafka_find_written(bootstrap: Address, *, timeout_s: float = 5.0, tail: int = 10_000,
                       max_scan: int = 200_000) -> Callable[[str, int, int | None, set[str]],
                                                            set[str]]:
    """Which of `idents` are already in a partition (by the `mallwatt-id` header).

    Scans from just after the last confirmed offset to the end; with no known offset, the
    last `tail` messages. Raises KafkaException when the broker does not answer.
    """
    def find(topic: str, partition: int, after: int | None, idents: set[str]) -> set[str]:
        c = Consumer(kafka_config(_resolve(bootstrap), **{"group.id": "mallwatt-spool-check",
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "socket.timeout.ms": int(timeout_s * 1000)}))
        try:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            start = max(lo, after + 1 if after is not None else hi - tail, hi - max_scan)
            found: set[str] = set()
            if start >= hi:
                return found
            c.assign([TopicPartition(topic, partition, start)])
            deadline = time.monotonic() + 6 * timeout_s
            while time.monotonic() < deadline:
                msg = c.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        return found
                    raise KafkaException(msg.error())
                for name, value in msg.headers() or ():
                    if name == ID_HEADER and value is not None and value.decode() in idents:
                        found.add(value.decode())
                if msg.offset() >= hi - 1:
                    return found
            raise KafkaException(f"scan of {topic}[{partition}] did not finish")
        finally:
            c.close()
    return find


def flag_name(kind: str, field: str) -> str:
    """Flags about the billing register keep the bare name; others say which field."""
    return kind if field in ("", "import_kwh") else f"{kind}:{field}"


class ReadingPublisher:
    def __init__(self, spool: Spool, plan: CollectorPlan, *, collector_id: str,
                 partitions: int | None = None, flush_interval_s: float = 1.0,
                 max_readings: int = 5000, clock: Callable[[], int] = wall_clock_ms) -> None:
        self.spool = spool
        self.plan = plan
        self.collector_id = collector_id
        self.partitions = partitions or T.default_partitions()
        self.flush_interval_s = flush_interval_s
        self.max_readings = max_readings
        self.clock = clock
        self._rows: dict[int, list[dict[str, Any]]] = {}
        self._flags: dict[int, list[tuple[int, str]]] = {}
        self._waiting = 0
        self._last_flush = time.monotonic()
        self.readings = self.batches = self.events = 0
        self._account_shard: dict[str, int] = {}

    # --- readings ------------------------------------------------------------------
    def shard_of(self, account_id: str) -> int:
        s = self._account_shard.get(account_id)
        if s is None:
            s = self._account_shard[account_id] = account_shard(account_id, self.partitions)
        return s

    def add(self, result: PollResult) -> None:
        """Take one poll result (the poller's on_result callback)."""
        route = self.plan.routes.get(result.meter_id)
        if route is None:
            log.warning("reading from unknown meter %s dropped", result.meter_id)
            return
        shard = self.shard_of(route.account_id)
        rows = self._rows.setdefault(shard, [])
        flags = self._flags.setdefault(shard, [])
        relay = RELAY_CODES.get(result.relay, RELAY_CODES["UNKNOWN"])
        for circuit_id, values in result.circuits.items():
            index = len(rows)
            rows.append({"circuit_id": circuit_id, "meter_id": result.meter_id,
                         "account_id": route.account_id, "ts_ms": result.ts_ms,
                         **{c: values.get(c) for c in FLOAT_COLUMNS}, "relay": relay})
            flags.extend((index, flag_name(f.kind, f.field))
                         for f in result.flags if f.circuit == circuit_id)
            self._waiting += 1
        if self._waiting >= self.max_readings:
            self.flush()

    def due(self) -> bool:
        return time.monotonic() - self._last_flush >= self.flush_interval_s

    def flush(self) -> int:
        """Spool one batch per shard with waiting readings (fsync); returns batches."""
        self._last_flush = time.monotonic()
        if not self._waiting:
            return 0
        now = self.clock()
        n = 0
        for shard in sorted(self._rows):
            rows = self._rows[shard]
            if not rows:
                continue
            seq = self.spool.next_seq(f"readings/{shard}")
            batch_id = f"{self.collector_id}/{shard}/{seq}"
            frame = pl.DataFrame(rows, schema=FRAME_SCHEMA)
            record = frame_to_batch(frame, batch_id=batch_id, collector_id=self.collector_id,
                                    mall_id=self.plan.mall_id, shard=shard, seq=seq,
                                    collected_at_ms=now, flags=self._flags.get(shard, []))
            self.spool.append(SpoolRecord(T.READINGS, shard, shard_key(shard),
                                          codec.encode("ReadingBatch", record), batch_id,
                                          f"readings/{shard}", seq))
            self.readings += len(rows)
            n += 1
        self.spool.flush()
        self._rows.clear()
        self._flags.clear()
        self._waiting = 0
        self.batches += n
        return n

    # --- other messages ---------------------------------------------------------------
    def event(self, kind: str, *, gateway_id: str | None = None, meter_id: str | None = None,
              detail: str = "", ts_ms: int | None = None, flush: bool = True) -> None:
        """Spool one CollectorEvent (key collector_id)."""
        event_id = f"{self.collector_id}/{uuid.uuid4().hex[:12]}"
        rec = {"event_id": event_id, "collector_id": self.collector_id,
               "mall_id": self.plan.mall_id, "gateway_id": gateway_id, "meter_id": meter_id,
               "kind": kind, "ts_ms": self.clock() if ts_ms is None else ts_ms,
               "detail": detail}
        self._spool_keyed(T.COLLECTOR_EVENTS, self.collector_id,
                          codec.encode("CollectorEvent", rec), "events", flush)
        self.events += 1

    def poll_event(self, ev: PollEvent) -> None:
        """The poller's on_event callback."""
        self.event(ev.kind, gateway_id=ev.gateway_id, meter_id=ev.meter_id, detail=ev.detail,
                   ts_ms=ev.ts_ms)

    def outcome(self, outcome: dict[str, Any], account_id: str | None = None) -> None:
        """Spool one RelayOutcome record (key gateway_id); durable when this returns. With the
        meter's account it goes to that account's shard: the worker that owns the account's
        relay state reads it there (the power loop, pipelines/powerloop.py)."""
        self._spool_keyed(T.RELAY_OUTCOMES, outcome["gateway_id"],
                          codec.encode("RelayOutcome", outcome), "outcomes", True, shard_of=account_id)

    def _spool_keyed(self, topic: str, key: str, value: bytes, stream: str,
                     flush: bool, shard_of: str | None = None) -> None:
        # explicit partition: one producer must not mix explicit and partitioner-chosen
        # partitions (librdkafka queues them separately, breaking produce order)
        seq = self.spool.next_seq(stream)
        self.spool.append(SpoolRecord(topic, account_shard(shard_of or key, self.partitions), key.encode(),
                                      value, f"{self.collector_id}/{stream}/{seq}", stream, seq))
        if flush:
            self.spool.flush()


def make_drainer(spool: Spool, bootstrap: Address, **producer_overrides: Any) -> Drainer:
    return Drainer(spool, kafka_producer_factory(bootstrap, **producer_overrides),
                   find_written=kafka_find_written(bootstrap))


__all__ = ["ReadingPublisher", "PRODUCER_DEFAULTS", "flag_name", "kafka_find_written",
           "kafka_producer_factory", "make_drainer"]
