"""Reading Kafka topics from the offsets they had when a test started."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, TopicPartition

from schemas import codec
from schemas.ledger import batch_entries


def _end_offsets(bootstrap: str, topic: str) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    out = []
    for p in parts:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        out.append(TopicPartition(topic, p, high))
    consumer.close()
    return out


def decode_records(schema: str, value: bytes | None) -> list[dict]:
    """The records of one message: a LedgerBatch carries many entries, other contracts one."""
    if schema == "LedgerBatch":
        return batch_entries(codec.decode(schema, value))
    return [codec.decode(schema, value)]


class TopicTail:
    """Reads a topic from the offsets it had when the test started."""

    def __init__(self, bootstrap: str, topic: str, schema: str) -> None:
        self.schema = schema
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                                  "enable.auto.commit": False})
        self.consumer.assign(_end_offsets(bootstrap, topic))
        self.seen: list[dict] = []

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for record in self.seen:
            if predicate(record):
                return record
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            for record in decode_records(self.schema, msg.value()):
                self.seen.append(record)
                if predicate(record):
                    return record
        raise AssertionError(f"no matching {self.schema} within {timeout}s; saw {len(self.seen)}")
