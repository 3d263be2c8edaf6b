"""`mallwatt notify`: consume mallwatt.alerts and deliver them to merchants and operators.

At least once: offsets are committed after a batch's delivery attempts are recorded (the
dedup file is fsynced and failures are dead-lettered), so a crash re-delivers a batch and
the dedup set keeps merchants from getting the same alert twice. A message that is not an
Alert, or whose delivery failed after the provider's retries, goes to the dead-letter topic
with the reason; the service never stops on a bad message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from infra.kafka_security import kafka_config
from pipelines import metrics as M
from pipelines.deadletter import dead_letter_record
from pipelines.logsetup import kafka_logger
from pipelines.notify.config import NotifyConfig, NotifyConfigError, load_config
from pipelines.notify.dispatch import Dispatcher, Outcome
from schemas import codec

log = logging.getLogger("mallwatt.notify")


class NotifyService:
    def __init__(self, config: NotifyConfig, bootstrap: str, *, dispatcher: Dispatcher | None = None,
                 group: str | None = None) -> None:
        self.config = config
        self.dispatcher = dispatcher or Dispatcher.from_config(config)
        self.topic = config.kafka.topic
        self.dlq_topic = config.kafka.deadletter_topic
        self.assigned = threading.Event()  # set once partitions are assigned (tests wait on it)
        self.stats: dict[str, int] = {}
        self._consumer = Consumer(kafka_config(bootstrap, **{
            "group.id": group or config.kafka.group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 5000,
            **M.lag_stats_config("notify"), **kafka_logger("notify"),
        }))
        self._producer = Producer(kafka_config(bootstrap, **{"enable.idempotence": True, "acks": "all",
                                   "linger.ms": 5, **kafka_logger("notify")}))
        self.broker_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._consumer.subscribe([self.topic], on_assign=lambda c, parts: self.assigned.set())
        next_tick = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_tick:  # deferred (quiet-hours) messages, once a second
                    loop.run_until_complete(self.dispatcher.tick())
                    next_tick = time.monotonic() + 1.0
                messages = self._consumer.consume(num_messages=200, timeout=0.5)
                if messages:
                    try:
                        self._batch(messages, loop)
                    except KafkaException as exc:  # broker trouble: rewind so nothing is skipped
                        log.warning("notify: %s; rewinding to the committed offsets", exc)
                        stop.wait(1.0)
                        self._rewind()
        finally:
            loop.run_until_complete(self.dispatcher.close())
            loop.close()
            self._producer.flush(10)
            self._consumer.close()

    def readiness(self) -> tuple[bool, str]:
        """/readyz: partitions assigned and the broker answering."""
        if self.broker_error:
            return False, f"broker unreachable: {self.broker_error}"
        if not self.assigned.is_set():
            return False, "waiting for partition assignment"
        return True, "ok"

    def _batch(self, messages: list[Any], loop: asyncio.AbstractEventLoop) -> None:
        good: list[tuple[Any, dict[str, Any]]] = []
        for msg in messages:
            if msg.error():
                if msg.error().code() == KafkaError._ALL_BROKERS_DOWN:
                    self.broker_error = str(msg.error())
                if msg.error().code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    log.warning("notify: %s", msg.error())
                continue
            self.broker_error = None
            try:
                good.append((msg, codec.decode("Alert", msg.value())))
            except codec.DecodeError as exc:
                self._dead_letter(msg, "notify.decode", str(exc))
        outcomes = loop.run_until_complete(self.dispatcher.handle_many([a for _, a in good])) if good else []
        for (msg, alert), outcome in zip(good, outcomes, strict=True):
            self._count(outcome)
            M.NOTIFY_ALERTS.labels(outcome.status, str(alert.get("kind", ""))[:40]).inc()
            if outcome.status == "error":
                self._dead_letter(msg, "notify.dispatch", outcome.error or "error")
            elif outcome.failures:
                reasons = "; ".join(f"{r.provider}>{r.recipient}: {r.error} after {r.attempts} attempt(s)"
                                    for r in outcome.failures)
                self._dead_letter(msg, "notify.delivery", reasons)
        self.dispatcher.dedup.flush()
        if self._producer.flush(30):
            raise KafkaException("dead letters not delivered; offsets not committed")
        self._consumer.commit(asynchronous=False)

    def _count(self, outcome: Outcome) -> None:
        self.stats[outcome.status] = self.stats.get(outcome.status, 0) + 1

    def _dead_letter(self, msg: Any, stage: str, reason: str) -> None:
        M.DEAD_LETTERS.labels("notify", stage, M.reason_class(reason)).inc()
        log.warning("dead letter %s[%s]@%s (%s): %s", msg.topic(), msg.partition(), msg.offset(), stage, reason,
                    extra={"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                           "stage": stage})
        record = dead_letter_record(msg.topic(), msg.partition(), msg.offset(), stage, reason,
                                    msg.key(), msg.value(), int(time.time() * 1000))
        self._producer.produce(self.dlq_topic, key=msg.topic().encode(), value=codec.encode("DeadLetter", record))
        self._producer.poll(0)

    def _rewind(self) -> None:
        try:
            for tp in self._consumer.committed(self._consumer.assignment(), timeout=10):
                if tp.offset >= 0:
                    self._consumer.seek(tp)
        except KafkaException as exc:
            log.warning("notify: rewind failed (%s); the next rebalance resets positions", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mallwatt notify", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("MALLWATT_NOTIFY_CONFIG", "notify.yaml"),
                        help="notify.yaml (providers, routes, recipients, rate limits)")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: MALLWATT_KAFKA / dev broker)")
    parser.add_argument("--group", help="consumer group (default: kafka.group in the config)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (default "
                        "MALLWATT_NOTIFY_METRICS_PORT or 9463; negative: off)")
    args = parser.parse_args(argv)
    from pipelines.logsetup import configure
    configure("notify", level=args.log_level)
    try:
        config = load_config(args.config)
        dispatcher = Dispatcher.from_config(config)
    except NotifyConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        routes = len(config.routes)
        print(f"{args.config}: ok ({len(config.providers)} provider(s), {routes} route(s), "
              f"{len(config.recipients.merchants)} merchant recipient(s))")
        return 0
    if args.bootstrap is None:
        from infra.broker import bootstrap_servers
        args.bootstrap = bootstrap_servers()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service = NotifyService(config, args.bootstrap, dispatcher=dispatcher, group=args.group)
    log.info("notify: consuming %s as %s", service.topic, args.group or config.kafka.group)
    server = M.serve(M.metrics_port("notify", args.metrics_port), ready=service.readiness)
    try:
        service.run(stop)
    finally:
        if server is not None:
            server.close()
    log.info("notify: stopped; outcomes %s", service.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
