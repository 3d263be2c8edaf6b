"""The forwarder publishes every output of a changelog once per clean run, and commits
offsets behind its deliveries so that the next forwarder in the group resumes exactly there."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipelines.envelope import Envelope, OutboxItem
from pipelines.forwarder import Forwarder

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    changelog, output = f"test-fwd-changelog-{suffix}", f"test-fwd-out-{suffix}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(changelog, 2, 1), NewTopic(output, 1, 1)]).values():
        future.result(30)
    yield changelog, output
    admin.delete_topics([changelog, output])


def write_changes(bootstrap: str, changelog: str, output: str, first: int, count: int) -> None:
    """`count` state changes with three outputs each, plus a tombstone and an empty outbox."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(first, first + count):
        outbox = [OutboxItem(output, b"k", f"change-{i}-output-{j}".encode()) for j in range(3)]
        producer.produce(changelog, key=f"bucket-{i % 5}".encode(), value=Envelope(outbox=outbox).to_bytes())
    producer.produce(changelog, key=b"bucket-gone", value=None)
    producer.produce(changelog, key=b"bucket-quiet", value=Envelope().to_bytes())
    producer.flush(30)


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    values: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(values) < expected:
        values += [m.value().decode() for m in consumer.consume(500, 0.5) if not m.error()]
    time.sleep(1.0)  # anything beyond `expected` (a duplicate) has time to show up
    values += [m.value().decode() for m in consumer.consume(500, 1.0) if not m.error()]
    consumer.close()
    return values


def wait_committed(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> None:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    ends = [TopicPartition(topic, p, probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
            for p in range(2)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            committed = probe.committed([TopicPartition(topic, p) for p in range(2)], timeout=10)
            if [tp.offset for tp in committed] == [tp.offset for tp in ends]:
                return
            time.sleep(0.2)
        raise AssertionError(f"committed {committed}, end {ends}")
    finally:
        probe.close()


def test_outputs_once_and_commits_follow_deliveries(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    changelog, output = topics
    group = f"test-fwd-{uuid.uuid4().hex[:8]}"
    write_changes(kafka_bootstrap, changelog, output, 0, 40)

    forwarder = Forwarder(kafka_bootstrap, changelog, group=group)
    forwarder.start()
    try:
        assert len(read_all(kafka_bootstrap, output, 120)) >= 120
        # committed while running (not only on stop): the epochs close and their outputs are in
        wait_committed(kafka_bootstrap, group, changelog)
    finally:
        forwarder.stop()

    write_changes(kafka_bootstrap, changelog, output, 40, 10)
    successor = Forwarder(kafka_bootstrap, changelog, group=group)
    successor.start()
    try:
        values = read_all(kafka_bootstrap, output, 150)
    finally:
        successor.stop()
    expected = sorted(f"change-{i}-output-{j}" for i in range(50) for j in range(3))
    assert sorted(values) == expected  # every output once: nothing lost, nothing re-sent
    assert successor.forwarded == 30
