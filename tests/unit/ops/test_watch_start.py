"""The watcher's start survives a broker that answers "not leader" for a moment (seen in CI:
the thread died and the watcher never became ready)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infra import topics as T
from pipelines.collector_watch import CollectorWatch


class EofMessage:
    def __init__(self, topic: str, partition: int) -> None:
        self._topic, self._partition = topic, partition

    def error(self) -> KafkaError:
        return KafkaError(KafkaError._PARTITION_EOF)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition


class FlakyConsumer:
    """Two partitions per topic; the first `failures` offsets lookups fail like CI's did."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.lookups = 0
        self.assigned: list[TopicPartition] = []
        self.closed = False

    def list_topics(self, timeout: float) -> Any:
        part = SimpleNamespace(error=None, partitions={0: None, 1: None})
        return SimpleNamespace(topics={t: part for t in (T.ALERTS, T.COLLECTOR_EVENTS, T.READINGS)})

    def offsets_for_times(self, wanted: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.lookups += 1
        if self.lookups <= self.failures:
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return [TopicPartition(tp.topic, tp.partition, -1) for tp in wanted]

    def assign(self, positions: list[TopicPartition]) -> None:
        self.assigned = positions

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        return [EofMessage(tp.topic, tp.partition) for tp in self.assigned]

    def unassign(self) -> None:
        self.assigned = []

    def close(self) -> None:
        self.closed = True


def watch_with(consumer: FlakyConsumer) -> CollectorWatch:
    watch = CollectorWatch("127.0.0.1:1", clock=lambda: 1_000_000.0)
    watch.consumer = consumer
    return watch


def test_a_not_leader_answer_at_start_is_retried_and_readiness_names_it() -> None:
    consumer = FlakyConsumer(failures=2)
    watch = watch_with(consumer)
    seen: list[str] = []
    stop = threading.Event()
    original = watch.assign

    def assign() -> None:
        seen.append(watch.readiness()[1])
        original()

    watch.assign = assign  # type: ignore[method-assign]
    assert watch.assign_until_started(stop, backoff_max_s=0.01)
    assert watch.assigned and watch.broker_error is None
    assert watch.readiness()[1] == "reading history: 4 partition(s) behind"  # until their EOFs
    assert seen[0] == "not assigned"
    assert "NOT_LEADER" in seen[1] and seen[1].startswith("broker unreachable: start:")
    assert {tp.topic for tp in consumer.assigned} == {T.COLLECTOR_EVENTS, T.READINGS}
    assert consumer.lookups == 4  # two failures, then alerts and events/readings


def test_stop_ends_a_start_that_never_succeeds() -> None:
    consumer = FlakyConsumer(failures=10**9)
    watch = watch_with(consumer)
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    watch.run(stop)
    assert not watch.assigned and consumer.closed and consumer.lookups >= 2
