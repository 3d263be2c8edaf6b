"""A rebalance's start-offset lookup survives a broker that answers "not leader" for a moment:
an exception in it would end the collector's relay-command loop (no trip, no reconnect)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition

from collectors import commands
from collectors.commands import CommandExecutor


class FlakyConsumer:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        if self.calls <= self.failures:
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        # partition 0 has a committed offset; 1 and 2 are new to this group
        return [TopicPartition(tp.topic, tp.partition, 7 if tp.partition == 0 else -1001)
                for tp in partitions]

    def offsets_for_times(self, wanted: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        # partition 1 has a message within the lookback, 2 has none
        return [TopicPartition(tp.topic, tp.partition, 40 if tp.partition == 1 else -1) for tp in wanted]


def executor() -> CommandExecutor:
    return CommandExecutor(relay=Any, publisher=Any, plan=Any, bootstrap="127.0.0.1:1",  # type: ignore[arg-type]
                           collector_id="C1", verifier=None)


def test_start_offsets_are_asked_again_after_not_leader() -> None:
    consumer = FlakyConsumer(failures=2)
    parts = [TopicPartition("relay-commands", p) for p in range(3)]
    starts = executor()._lookback_starts(consumer, parts)  # type: ignore[arg-type]
    assert consumer.calls == 3
    assert [(tp.partition, tp.offset) for tp in starts] == [(0, 7), (1, 40), (2, OFFSET_END)]


def test_a_broker_that_never_answers_still_raises_after_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "START_RETRY_S", 0.5)
    consumer = FlakyConsumer(failures=10**9)
    with pytest.raises(KafkaException):
        executor()._lookback_starts(consumer, [TopicPartition("relay-commands", 0)])  # type: ignore[arg-type]
    assert consumer.calls >= 2
