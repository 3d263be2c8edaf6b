"""Publishes the outputs stored in the billing table's changelog to their topics.

Each changelog record carries the outbox of one state change (see pipelines.envelope).
Delivery is at least once: an offset is committed only once every output of the records
before it has been delivered, so a crash re-publishes, never loses. Output ids are
deterministic, so consumers deduplicate.

Commits never stop the forwarding. Every COMMIT_INTERVAL_S the consumed positions are set
aside with the outputs produced so far (an epoch); they are committed when the broker has
acknowledged all of those outputs, while newer records keep flowing. (Flushing the producer
before each commit held every relay command behind it for a broker round trip.)
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from infra import topics as T
from infra.kafka_security import secured
from pipelines import metrics as M
from pipelines.envelope import outbox_tuples
from pipelines.faults import fault_point
from pipelines.signing import relay_signer, sign_relay_value
from schemas.columnar import encode_bounded
from schemas.intervals import INTERVAL_ROWS, interval_row_columns, unpack_interval_values
from schemas.ledger import LEDGER_ROWS, ledger_row_columns, unpack_ledger_values

log = logging.getLogger("mallwatt.forwarder")


#: consume() returns after this long unless 500 records came: a relay trip waits up to this
CONSUME_WAIT_S = 0.005
COMMIT_INTERVAL_S = 0.5  # how often the forwarder commits (and so waits for its outputs)
#: Ledger entries / interval facts per output message at most, and its size at most: a batch
#: above MAX_OUTPUT_BYTES is split (1,024 ledger entries measured 121 kB at 350k merchants).
LEDGER_BATCH_ENTRIES = 1024
INTERVAL_BATCH_ROWS = 1024
MAX_OUTPUT_BYTES = 60_000
TABLE_NAME = "accounts"  # the worker's faust table: one state value per account


CLAIMS_TABLE = "claims"  # the worker's faust table of payment and posting ids (pipelines.core.claims)


def changelog_topic(app_id: str, table: str = TABLE_NAME) -> str:
    """A table's changelog, which faust names after the app and the table."""
    return f"{app_id}-{table}-changelog"


def changelog_topics(app_id: str) -> list[str]:
    """Every changelog whose records carry outboxes: account states and claims."""
    return [changelog_topic(app_id), changelog_topic(app_id, CLAIMS_TABLE)]


#: The forwarder group's session timeout: how long a killed member's changelog partitions (and
#: so every relay command stored in them) wait before another forwarder takes them. The client
#: default (45 s) held commands for a rebalance's length; 6 s is the broker's default minimum.
SESSION_TIMEOUT_MS = int(os.environ.get("MALLWATT_FORWARDER_SESSION_TIMEOUT_MS", 6000))


def consumer_config(bootstrap: str, group: str, instance: str | None = None) -> dict[str, Any]:
    """The forwarder's consumer settings. With a stable instance name (`MALLWATT_WORKER_NAME`:
    one per worker process, kept across restarts) the member is static: a restarted worker takes
    its partitions back at once, without a rebalance, instead of waiting out the session."""
    instance = instance if instance is not None else os.environ.get("MALLWATT_WORKER_NAME")
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "fetch.wait.max.ms": 20,
        "topic.metadata.refresh.interval.ms": 2000,
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": max(500, SESSION_TIMEOUT_MS // 6),
    }
    if instance:
        config["group.instance.id"] = f"{group}-{instance}"
    config.update(M.lag_stats_config("forwarder"))  # consumer lag per changelog partition
    return secured(config)


class Forwarder:
    def __init__(self, bootstrap: str, changelog_topic: str | list[str], group: str = "mallwatt-forwarder",
                 consumer: Any = None, producer: Any = None) -> None:
        """`consumer`/`producer`: stand-ins for the Kafka clients (bench/forwarder_cost.py
        measures the decode and encode path without a broker)."""
        self.topics = [changelog_topic] if isinstance(changelog_topic, str) else list(changelog_topic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._consumer = consumer if consumer is not None else Consumer(consumer_config(bootstrap, group))
        self._producer = producer if producer is not None else Producer(secured({
            "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 2, "compression.type": "lz4",
        }))
        self.forwarded = 0
        self._uncommitted = False
        self._committed_at = time.monotonic()
        self._epoch = 0  # outputs produced now belong to this epoch
        self._undelivered: dict[int, int] = {0: 0}  # epoch -> outputs not yet acknowledged
        self._closed: deque[tuple[int, list[TopicPartition]]] = deque()  # epoch, positions after it
        self._failure: str | None = None  # a delivery the broker refused
        self._signer = relay_signer()  # relay commands leave signed; collectors refuse unsigned ones
        from pipelines.worker_metrics import ForwarderMetrics

        self.metrics = ForwarderMetrics()  # plain ints per output, counters once a second

    def start(self) -> None:
        self._thread.start()

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: partitions assigned (which needs the broker), the thread alive."""
        if not self._thread.is_alive():
            return False, "forwarder thread stopped"
        try:
            assigned = self._consumer.assignment()
        except Exception as exc:  # closed or not yet subscribed
            return False, f"no assignment: {exc}"
        return (True, "ok") if assigned else (False, "waiting for partition assignment")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # The changelog is created by faust when the worker starts; subscribe() waits for it.
        self._consumer.subscribe(self.topics)
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except KafkaException as exc:  # transient broker trouble: retry, never lose
                    log.warning("forwarder: %s; rewinding to the committed offsets", exc)
                    self._stop.wait(1.0)
                    self._rewind()
        finally:
            if self._uncommitted or self._closed:
                try:
                    self._commit()
                except KafkaException as exc:  # redelivered to the next forwarder: at least once
                    log.warning("forwarder: final commit failed (%s)", exc)
            self._consumer.close()

    def _step(self) -> None:
        # consume() waits for a full batch or the timeout: keep the timeout short, because a
        # relay trip waits in here
        messages = self._consumer.consume(num_messages=500, timeout=CONSUME_WAIT_S)
        # changelog partition -> its records' packed ledger rows, in order (unpacked together)
        ledger: dict[tuple[str, int], list[Any]] = {}
        intervals: dict[tuple[str, int], list[Any]] = {}  # the same for interval facts
        first: dict[tuple[str, int], int] = {}  # changelog partition -> its first offset in this step
        for msg in messages:
            if msg.error():
                if msg.error().code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    log.warning("forwarder: %s", msg.error())
                continue
            where = (msg.topic(), msg.partition())
            rows = ledger.get(where)
            if rows is None:
                rows = ledger[where] = []
                intervals[where] = []
                first[where] = msg.offset()
            self._forward(msg.value(), rows, intervals[where])
            self._uncommitted = True
        for (topic, partition), packed in ledger.items():
            if packed:
                self._publish_ledger(topic, partition, packed, first[topic, partition])
        for (topic, partition), packed in intervals.items():
            if packed:
                self._publish_intervals(topic, partition, packed, first[topic, partition])
        self._producer.poll(0)  # delivery reports
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise KafkaException(f"an output was not delivered ({failure}); offsets not committed")
        if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._close_epoch()
        self._commit_delivered()
        self.metrics.flush()

    def _close_epoch(self) -> None:
        """Set aside the positions consumed so far; they commit once this epoch's outputs are in."""
        positions = [tp for tp in self._consumer.position(self._consumer.assignment()) if tp.offset >= 0]
        self._closed.append((self._epoch, positions))
        self._epoch += 1
        self._undelivered[self._epoch] = 0
        self._uncommitted = False
        self._committed_at = time.monotonic()

    def _commit_delivered(self) -> None:
        """Commit the newest closed epoch whose outputs, and all before it, are delivered."""
        ready: list[TopicPartition] | None = None
        while self._closed and self._undelivered[self._closed[0][0]] == 0:
            epoch, ready = self._closed.popleft()
            del self._undelivered[epoch]
        if ready:
            fault_point("forwarder_after_publish_before_commit")  # chaos proof: delivered, not committed
            self._consumer.commit(offsets=ready, asynchronous=True)

    def _commit(self) -> None:
        """Commit everything consumed, once every output is delivered (on stop)."""
        remaining = self._producer.flush(30)
        if remaining:
            raise KafkaException(f"{remaining} output(s) not delivered; offsets not committed")
        self._consumer.commit(asynchronous=False)
        self._uncommitted = False
        self._committed_at = time.monotonic()

    def _delivered(self, epoch: int, err: Any, _msg: Any) -> None:
        if err is not None:
            self._failure = str(err)
        elif epoch in self._undelivered:  # not an epoch abandoned by a rewind
            self._undelivered[epoch] -= 1

    def _rewind(self) -> None:
        """Go back to the last committed offsets, so nothing consumed but unsent is skipped."""
        self._producer.flush(30)  # settle what is in flight; its epochs are abandoned below
        self._closed.clear()
        self._epoch += 1
        self._undelivered = {self._epoch: 0}
        self._uncommitted = False
        self._failure = None
        try:
            for tp in self._consumer.committed(self._consumer.assignment(), timeout=10):
                if tp.offset >= 0:
                    self._consumer.seek(tp)
        except KafkaException as exc:
            log.warning("forwarder: rewind failed (%s); will retry", exc)

    def _forward(self, raw: bytes | None, ledger_rows: list[Any], interval_rows: list[Any] | None = None) -> None:
        """Publish a record's outputs; its packed ledger rows are added to `ledger_rows` instead,
        its packed interval facts to `interval_rows`."""
        if raw is None:  # a tombstone: account state deleted, nothing to publish
            return
        try:
            outbox = outbox_tuples(raw)
        except (ValueError, struct.error) as exc:
            log.error("forwarder: unreadable changelog record skipped: %s", exc)
            return
        produced = False
        for topic, key, value, partition in outbox:
            if topic == LEDGER_ROWS:
                ledger_rows.append(value)
            elif topic == INTERVAL_ROWS:
                if interval_rows is not None:
                    interval_rows.append(value)
            else:
                if topic == T.RELAY_COMMANDS:
                    self._produce(topic, key, sign_relay_value(self._signer, value), partition)
                else:
                    self._produce(topic, key, value, partition)
                self.metrics.output(topic, value)
                produced = True
        if produced:  # delivery reports of what went out (a record of rows only produced nothing)
            self._producer.poll(0)

    def _publish_ledger(self, topic: str, partition: int, packed: list[Any], first: int) -> None:
        """The packed ledger rows of one changelog partition's records (from offset `first`) as
        LedgerBatches, in order, keyed by that partition so that all entries of an account stay
        in one ledger partition. The messages are those of `bounded_messages` over
        `frame_to_ledger_batch(rows_to_frame(part))`, built without a frame and each encoded
        once (schemas.columnar)."""
        self._publish_rows(T.LEDGER, unpack_ledger_values(packed), ledger_row_columns, LEDGER_BATCH_ENTRIES,
                           topic, partition, first)

    def _publish_intervals(self, topic: str, partition: int, packed: list[Any], first: int) -> None:
        """The packed interval facts of one changelog partition's records as IntervalBatches,
        keyed like the ledger (a circuit's facts stay in one partition, in order)."""
        self._publish_rows(T.INTERVALS, unpack_interval_values(packed), interval_row_columns, INTERVAL_BATCH_ROWS,
                           topic, partition, first)

    def _publish_rows(self, output: str, rows: list[Any], columns: Any, most: int, topic: str, partition: int,
                      first: int) -> None:
        if not rows:
            return
        prefix = f"{topic}:{partition}@{first}+"
        for _, _, value in encode_bounded(columns(rows), lambda start: f"{prefix}{start}", most, MAX_OUTPUT_BYTES):
            self._produce(output, f"p{partition}".encode(), value)
        self.metrics.batch(output, len(rows))

    def _produce(self, topic: str, key: bytes, value: bytes, partition: int = -1) -> None:
        self._undelivered[self._epoch] += 1
        where = {"partition": partition} if partition >= 0 else {}
        while True:
            try:
                self._producer.produce(topic, key=key, value=value,
                                       on_delivery=partial(self._delivered, self._epoch), **where)
                break
            except BufferError:
                self._producer.poll(0.05)
        self.forwarded += 1


def bounded_messages(rows: list[Any], most: int, encode: Any, limit: int | None = None) -> list[bytes]:
    """Rows in order as encoded messages of at most `most` rows and `limit` bytes: a message
    over the limit is split in half and encoded again (entry sizes vary with ids and flags)."""
    cap = MAX_OUTPUT_BYTES if limit is None else limit
    out: list[bytes] = []

    def add(start: int, part: list[Any]) -> None:
        value = encode(part, start)
        if len(value) > cap and len(part) > 1:
            half = len(part) // 2
            add(start, part[:half])
            add(start + half, part[half:])
        else:
            out.append(value)

    for start in range(0, len(rows), most):
        add(start, rows[start:start + most])
    return out


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
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (default "
                        "MALLWATT_FORWARDER_METRICS_PORT or 9465; negative: off)")
    args = parser.parse_args(argv)
    from pipelines.logsetup import configure

    configure("forwarder", level=logging.INFO)
    forwarder = Forwarder(bootstrap_servers(), changelog_topics(args.app_id), group=f"{args.app_id}-forwarder")
    server = M.serve(M.metrics_port("forwarder", args.metrics_port), ready=forwarder.readiness)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    forwarder.start()
    stop.wait()
    forwarder.stop()
    if server:
        server.close()
    return 0
