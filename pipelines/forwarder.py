"""Publishes the outputs stored in the billing table's changelog to their topics.

Each changelog record carries the outbox of one state change (see pipelines.envelope).
Delivery is at least once: offsets are committed only after the producer has flushed, so
a crash re-publishes, never loses. Output ids are deterministic, so consumers deduplicate.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from pipelines.envelope import outbox_of

log = logging.getLogger("mallwatt.forwarder")


#: consume() returns after this long unless 500 records came: a relay trip waits up to this
CONSUME_WAIT_S = 0.005
COMMIT_INTERVAL_S = 0.5  # how often the forwarder commits (and so waits for its outputs)
TABLE_NAME = "buckets"  # the worker's faust table of state buckets


def changelog_topic(app_id: str) -> str:
    """The billing table's changelog, which faust names after the app and the table."""
    return f"{app_id}-{TABLE_NAME}-changelog"


class Forwarder:
    def __init__(self, bootstrap: str, changelog_topic: str, group: str = "mallwatt-forwarder") -> None:
        self.changelog_topic = changelog_topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 20,
            "topic.metadata.refresh.interval.ms": 2000,
        })
        self._producer = Producer({
            "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 2, "compression.type": "lz4",
        })
        self.forwarded = 0
        self._uncommitted = False
        self._committed_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # The changelog is created by faust when the worker starts; subscribe() waits for it.
        self._consumer.subscribe([self.changelog_topic])
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except KafkaException as exc:  # transient broker trouble: retry, never lose
                    log.warning("forwarder: %s; rewinding to the committed offsets", exc)
                    self._stop.wait(1.0)
                    self._rewind()
        finally:
            if self._uncommitted:
                try:
                    self._commit()
                except KafkaException as exc:  # redelivered to the next forwarder: at least once
                    log.warning("forwarder: final commit failed (%s)", exc)
            self._consumer.close()

    def _step(self) -> None:
        # consume() waits for a full batch or the timeout: keep the timeout short, because a
        # relay trip waits in here
        messages = self._consumer.consume(num_messages=500, timeout=CONSUME_WAIT_S)
        for msg in messages:
            if msg.error():
                if msg.error().code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    log.warning("forwarder: %s", msg.error())
                continue
            self._forward(msg.value())
            self._uncommitted = True
        if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._commit()

    def _commit(self) -> None:
        """Commit what was consumed, once every output of it is delivered. Outputs leave as
        they are produced; only the commit waits for them, every COMMIT_INTERVAL_S, so a
        relay command never waits for a flush of the ledger."""
        remaining = self._producer.flush(30)
        if remaining:
            raise KafkaException(f"{remaining} output(s) not delivered; offsets not committed")
        self._consumer.commit(asynchronous=False)
        self._uncommitted = False
        self._committed_at = time.monotonic()

    def _rewind(self) -> None:
        """Go back to the last committed offsets, so nothing consumed but unsent is skipped."""
        try:
            for tp in self._consumer.committed(self._consumer.assignment(), timeout=10):
                if tp.offset >= 0:
                    self._consumer.seek(tp)
        except KafkaException as exc:
            log.warning("forwarder: rewind failed (%s); will retry", exc)

    def _forward(self, raw: bytes | None) -> None:
        if raw is None:  # a tombstone: bucket deleted, nothing to publish
            return
        try:
            outbox = outbox_of(raw)
        except (ValueError, struct.error) as exc:
            log.error("forwarder: unreadable changelog record skipped: %s", exc)
            return
        for item in outbox:
            while True:
                try:
                    self._producer.produce(item.topic, key=item.key, value=item.value)
                    break
                except BufferError:
                    self._producer.poll(0.05)
            self.forwarded += 1
        self._producer.poll(0)


def main(argv: list[str] | None = None) -> int:
    """`mallwatt forward`: the forwarder as its own process (frees the worker's core)."""
    import argparse
    import os
    import signal

    from infra.broker import bootstrap_servers

    parser = argparse.ArgumentParser(
        prog="mallwatt forward",
        description="Publish the outputs (ledger entries, alerts, relay commands) stored in the billing "
        "table's changelog. Run it beside `mallwatt worker --no-forwarder` to give it its own core; "
        "several forwarders share the changelog partitions.")
    parser.add_argument("--app-id", default=os.environ.get("MALLWATT_APP_ID", "mallwatt-billing"),
                        help="the worker's app id (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    forwarder = Forwarder(bootstrap_servers(), changelog_topic(args.app_id), group=f"{args.app_id}-forwarder")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    forwarder.start()
    stop.wait()
    forwarder.stop()
    return 0
