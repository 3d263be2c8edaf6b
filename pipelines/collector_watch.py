"""`mallwatt watch`: collector loss -> `collector_offline` alerts on mallwatt.alerts.

Reads mallwatt.collector-events (gateway_down/up, spool_growing/drained) and, as signs of
life, the reading batches' `mallwatt-id` header and broker time (the batch itself is
decoded once per unknown collector, for its mall). The rules and alert ids are in
pipelines/core/collector_watch.py; the notifier then delivers the alerts (route kind
`collector_offline` to `mall_ops`).

No consumer group and no stored state: at start the watcher reads its own alerts of the
last `--lookback` seconds to their end, then the collector events of that period and the
reading batches of the last two silence periods, rebuilding its episodes, so a restart
repeats no alert; alert ids depend
only on that input, and anything it does publish twice the notifier's dedup drops. Silence
is judged only once that history has been read.

    mallwatt watch [--silent-after 300] [--lookback 3600] [--metrics-port 9467] [--log-json]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from collectors.spool import ID_HEADER
from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines import metrics as M
from pipelines.core.collector_watch import (
    WatchConfig,
    WatchState,
    observe_batch,
    observe_event,
    open_episodes,
    restore,
    tick,
)
from pipelines.logsetup import kafka_logger
from pipelines.start_retry import retry_start
from schemas import codec

log = logging.getLogger("mallwatt.watch")


def collector_of(ident: str) -> str | None:
    """batch id `<collector_id>/<shard>/<seq>` -> collector id."""
    parts = ident.rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


class CollectorWatch:
    def __init__(self, bootstrap: str, *, config: WatchConfig | None = None,
                 lookback_s: float = 3600.0, topic_prefix: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or WatchConfig()
        self.state = WatchState()
        self.clock = clock
        self.lookback_ms = int(lookback_s * 1000)
        self.events_topic = topic_prefix + T.COLLECTOR_EVENTS
        self.readings_topic = topic_prefix + T.READINGS
        self.alerts_topic = topic_prefix + T.ALERTS
        self.consumer = Consumer(kafka_config(bootstrap, **{
            "group.id": "mallwatt-watch",  # never committed: positions are chosen at start
            "enable.auto.commit": False, "enable.partition.eof": True,
            "auto.offset.reset": "latest", **kafka_logger("watch")}))
        self.producer = Producer(kafka_config(bootstrap, **{
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, **kafka_logger("watch")}))
        self._behind: set[tuple[str, int]] = set()  # partitions still reading history
        self.assigned = False
        self.broker_error: str | None = None
        self.published = 0
        self._unsent: list[dict[str, Any]] = []  # alerts whose delivery is not confirmed yet

    # --- start positions ------------------------------------------------------------------
    def assign(self, timeout_s: float = 10.0) -> None:
        """Rebuild the episodes from our own alerts, then start on events and readings.

        The alerts are read to their end before any event is judged: the topics are read
        in no fixed order, and an event read before the alert that already opened its
        episode would open it again (a restarted watcher repeating an alert)."""
        self.state = WatchState()  # a retried start must not restore the alerts twice
        now_ms = int(self.clock() * 1000)
        meta = self.consumer.list_topics(timeout=timeout_s)
        self._assign_since(meta, {self.alerts_topic: now_ms - self.lookback_ms}, timeout_s)
        self._read_own_alerts(timeout_s)
        self._assign_since(meta, {self.events_topic: now_ms - self.lookback_ms,
                                  self.readings_topic: now_ms - 2 * self.config.silent_after_ms},
                           timeout_s)
        self.assigned = True

    def _assign_since(self, meta: Any, starts: dict[str, int], timeout_s: float) -> None:
        wanted: list[TopicPartition] = []
        for topic, since in starts.items():
            if topic not in meta.topics or meta.topics[topic].error is not None:
                raise KafkaException(f"topic {topic} not found (mallwatt stack up creates it)")
            wanted += [TopicPartition(topic, p, since) for p in meta.topics[topic].partitions]
        found = self.consumer.offsets_for_times(wanted, timeout=timeout_s)
        positions = [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                     for tp in found]
        self._behind = {(tp.topic, tp.partition) for tp in positions}
        self.consumer.assign(positions)

    def _read_own_alerts(self, timeout_s: float) -> None:
        """Consume the alerts topic to its end (each partition's EOF); the wait is bounded by
        `timeout_s` without progress, so a long history is read however long it takes."""
        deadline = time.monotonic() + timeout_s
        while self._behind:
            msgs = self.consumer.consume(num_messages=500, timeout=0.5)
            for msg in msgs:
                self.handle(msg)
            if msgs:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise KafkaException(f"alerts history not read within {timeout_s:.0f} s: "
                                     f"{self.broker_error or 'no end of partition reached'}")
        self.consumer.unassign()

    @property
    def caught_up(self) -> bool:
        return not self._behind

    def readiness(self) -> tuple[bool, str]:
        if self.broker_error:
            return False, f"broker unreachable: {self.broker_error}"
        if not self.assigned:
            return False, "not assigned"
        if not self.caught_up:
            return False, f"reading history: {len(self._behind)} partition(s) behind"
        return True, "ok"

    # --- loop -----------------------------------------------------------------------------
    def handle(self, msg: Any) -> list[dict[str, Any]]:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._behind.discard((msg.topic(), msg.partition()))
            elif err.code() == KafkaError._ALL_BROKERS_DOWN:
                self.broker_error = str(err)
            else:
                log.warning("consumer error: %s", err)
            return []
        self.broker_error = None
        if msg.topic() == self.alerts_topic:
            # read only at start (assign): later alerts are ours or other kinds
            with contextlib.suppress(codec.DecodeError):  # not ours to judge
                restore(self.state, self.config, codec.decode("Alert", msg.value()))
            return []
        if msg.topic() == self.events_topic:
            try:
                event = codec.decode("CollectorEvent", msg.value())
            except codec.DecodeError as exc:  # the sink dead-letters it; we skip it
                log.warning("undecodable collector event: %s", exc, extra={
                    "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()})
                return []
            return observe_event(self.state, self.config, event)
        ident = next((v.decode() for k, v in (msg.headers() or ()) if k == ID_HEADER and v), "")
        cid = collector_of(ident)
        if cid is None:
            return []
        known = self.state.collectors.get(cid)
        mall = None
        if known is None or not known.mall_id:
            try:  # once per collector: the batch says which mall it serves
                mall = codec.decode("ReadingBatch", msg.value())["mall_id"]
            except codec.DecodeError:
                mall = None
        _, ts = msg.timestamp()
        return observe_batch(self.state, self.config, cid, mall, ts if ts > 0 else
                             int(self.clock() * 1000))

    def publish(self, alerts: list[dict[str, Any]]) -> None:
        """Produce and wait for the acks; alerts not confirmed are produced again next time
        (a duplicate has the same id: the notifier drops it)."""
        self._unsent += alerts
        if not self._unsent:
            return
        for alert in self._unsent:
            cid = alert["details"].get("collector_id") or alert["mall_id"]
            self.producer.produce(self.alerts_topic, key=cid.encode(),
                                  value=codec.encode("Alert", alert))
        if self.producer.flush(10):
            raise KafkaException("alerts not delivered within 10 s")
        for alert in self._unsent:
            cid = alert["details"].get("collector_id") or alert["mall_id"]
            M.WATCH_ALERTS.labels(alert["details"]["cause"], alert["details"]["state"]).inc()
            log.warning(alert["message"], extra={"alert_id": alert["alert_id"],
                                                 "collector_id": cid,
                                                 "gateway_id": alert["details"].get("gateway_id"),
                                                 "state": alert["details"]["state"]})
        self.published += len(self._unsent)
        self._unsent = []

    def step(self, timeout_s: float = 0.5) -> int:
        alerts: list[dict[str, Any]] = []
        for msg in self.consumer.consume(num_messages=500, timeout=timeout_s):
            alerts += self.handle(msg)
        if self.caught_up:
            alerts += tick(self.state, self.config, int(self.clock() * 1000))
        self.publish(alerts)
        for cause, n in open_episodes(self.state).items():
            M.WATCH_OFFLINE.labels(cause).set(n)
        return len(alerts)

    def assign_until_started(self, stop: threading.Event, backoff_max_s: float = 5.0) -> bool:
        """`assign`, retried until it succeeds or `stop` is set (start_retry says why);
        meanwhile readiness names the error."""
        def failed(msg: str) -> None:
            self.broker_error = f"start: {msg}"

        def started() -> bool:
            self.assign()
            self.broker_error = None
            return True

        return bool(retry_start(stop, started, "watch", on_error=failed, backoff_max_s=backoff_max_s))

    def run(self, stop: threading.Event) -> None:
        if not self.assign_until_started(stop):
            self.consumer.close()
            return
        try:
            while not stop.is_set():
                try:
                    self.step()
                except KafkaException as exc:  # unpublished alerts come back with the replay
                    log.error("watch: %s; retrying", exc)
                    stop.wait(1.0)
        finally:
            self.producer.flush(10)
            self.consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mallwatt watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: MALLWATT_KAFKA / dev broker)")
    parser.add_argument("--silent-after", type=float, default=300.0,
                        help="seconds without a reading batch or event before a collector is offline")
    parser.add_argument("--lookback", type=float, default=3600.0,
                        help="seconds of collector events read at start to rebuild open episodes")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (default "
                        "MALLWATT_WATCH_METRICS_PORT or 9467; negative: off)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    from pipelines.logsetup import configure
    configure("watch", level=args.log_level)
    if args.bootstrap is None:
        from infra.broker import bootstrap_servers
        args.bootstrap = bootstrap_servers()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    watch = CollectorWatch(args.bootstrap, config=WatchConfig(silent_after_ms=int(args.silent_after * 1000)),
                           lookback_s=args.lookback)
    server = M.serve(M.metrics_port("watch", args.metrics_port), ready=watch.readiness)
    try:
        watch.run(stop)
    except KafkaException as exc:
        print(f"mallwatt watch: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
