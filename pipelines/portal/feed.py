"""Feeding the read model from Kafka: ledger batches, alerts, relay commands and the
merchants' alert preferences (a compacted topic: the newest record per account survives).

One consumer thread, assigned (no consumer group) to every partition of the four topics
from their beginning (the topics' retention bounds the replay), applies each message to the
read model under its lock. A message that does not decode is counted and skipped: the portal
only reads, and the producers' dead letters already hold bad input.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.portal.preferences import Preferences
from pipelines.portal.readmodel import ReadModel
from pipelines.start_retry import retry_start
from schemas import codec
from schemas.ledger import batch_entries

log = logging.getLogger(__name__)
SCHEMAS = {T.LEDGER: "LedgerBatch", T.ALERTS: "Alert", T.RELAY_COMMANDS: "RelayCommand",
           T.ALERT_PREFERENCES: "AlertPreferences"}


class KafkaFeed:
    def __init__(self, bootstrap: str, model: ReadModel, lock: threading.Lock,
                 topics: tuple[str, ...] = tuple(SCHEMAS)) -> None:
        self.bootstrap, self.model, self.lock, self.topics = bootstrap, model, lock, topics
        self.messages = 0
        self.bad_messages = 0
        self.caught_up = threading.Event()  # reached the end offsets seen at start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="portal-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        consumer = Consumer(kafka_config(self.bootstrap, **{"group.id": "mallwatt-portal",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 50,
                             "fetch.min.bytes": 1}))

        def assign() -> dict[tuple[str, int], int]:
            parts, ends = [], {}
            for topic in self.topics:
                meta = consumer.list_topics(topic, timeout=30).topics[topic]
                if meta.error is not None:
                    raise KafkaException(meta.error)
                for p in meta.partitions:
                    parts.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                    ends[(topic, p)] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            consumer.assign(parts)
            return ends

        ends = retry_start(self._stop, assign, "portal feed")
        if ends is None:
            consumer.close()
            return
        pending = {k for k, end in ends.items() if end > 0}
        if not pending:
            self.caught_up.set()
        try:
            while not self._stop.is_set():
                batch = consumer.consume(500, 0.1)
                for msg in batch:
                    if msg.error():
                        continue
                    key = (msg.topic(), msg.partition())
                    self._apply(msg.topic(), msg.value())
                    if key in pending and msg.offset() + 1 >= ends[key]:
                        pending.discard(key)
                        if not pending:
                            self.caught_up.set()
        finally:
            consumer.close()

    def _apply(self, topic: str, value: bytes | None) -> None:
        now_ms = int(time.time() * 1000)
        try:
            record: Any = codec.decode(SCHEMAS[topic], value)
            entries = batch_entries(record) if topic == T.LEDGER else None
        except Exception as exc:  # noqa: BLE001 - any undecodable message is skipped, counted
            self.bad_messages += 1
            log.warning("portal feed: skipped an undecodable message on %s: %s", topic, exc)
            return
        with self.lock:
            self.messages += 1
            if entries is not None:
                self.model.apply_entries(entries, now_ms)
            elif topic == T.ALERTS:
                self.model.apply_alert(record)
            elif topic == T.ALERT_PREFERENCES:
                self.model.apply_preferences(Preferences.from_record(record))
            else:
                self.model.apply_relay_command(record)
