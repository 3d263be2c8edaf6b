"""collector_offline alerts on the real broker, delivered once through the notifier."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from test_notifier import Receiver, start_service, wait_for

from collectors.spool import ID_HEADER
from infra import topics as T
from pipelines.collector_watch import CollectorWatch
from pipelines.core.collector_watch import WatchConfig
from pipelines.notify import parse_config
from schemas import codec
from schemas.readings import frame_to_batch

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(kafka_bootstrap: str) -> Iterator[str]:
    pre = f"itest{uuid.uuid4().hex[:6]}."
    names = [pre + t for t in (T.COLLECTOR_EVENTS, T.READINGS, T.ALERTS, T.DEADLETTER)]
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(n, 2, 1) for n in names]).values():
        fut.result(30)
    try:
        yield pre
    finally:
        for fut in admin.delete_topics(names).values():
            with contextlib.suppress(Exception):
                fut.result(30)


def event(kind: str, gateway: str | None, ts: int) -> bytes:
    return codec.encode("CollectorEvent", {
        "event_id": f"C1/{uuid.uuid4().hex[:8]}", "collector_id": "C1", "mall_id": "MALL1",
        "gateway_id": gateway, "meter_id": None, "kind": kind, "ts_ms": ts, "detail": "refused"})


def batch(collector: str, seq: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    frame = pl.DataFrame({"circuit_id": ["c1"], "meter_id": ["m1"], "account_id": ["a1"],
                          "ts_ms": [int(time.time() * 1000)], "import_kwh": [1.0]})
    ident = f"{collector}/0/{seq}"
    value = codec.encode("ReadingBatch", frame_to_batch(
        frame, batch_id=ident, collector_id=collector, mall_id="MALL1", shard=0, seq=seq,
        collected_at_ms=int(time.time() * 1000)))
    return value, [(ID_HEADER, ident.encode())]


def run_watch(bootstrap: str, prefix: str, silent_after_s: float) -> tuple[CollectorWatch, threading.Event, threading.Thread]:
    watch = CollectorWatch(bootstrap, config=WatchConfig(silent_after_ms=int(silent_after_s * 1000)),
                           lookback_s=600, topic_prefix=prefix)
    stop = threading.Event()
    thread = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: watch.readiness()[0], 30)
    return watch, stop, thread


def test_gateway_loss_and_silence_reach_ops_once(kafka_bootstrap: str, prefix: str, tmp_path: Path) -> None:
    receiver = Receiver().start()
    config = parse_config({
        "providers": {"hook": {"type": "webhook", "channel": "sms", "url": receiver.url, "secret": "s" * 32,
                               "retries": 1, "backoff_s": 0.05, "allow_loopback_http": True}},
        "routes": [{"kinds": ["collector_offline"], "to": "mall_ops", "providers": ["hook"]}],
        "recipients": {"mall_ops": {"MALL1": {"name": "Ops desk", "phone": "+862000000000"}}},
        "rate_limit": {"per_hour": 100, "burst": 100},
        "dedup": {"path": str(tmp_path / "dedup.txt")},
        "kafka": {"topic": prefix + T.ALERTS, "deadletter_topic": prefix + T.DEADLETTER,
                  "group": f"itest-watch-{uuid.uuid4().hex[:6]}"},
    })
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    now = int(time.time() * 1000)
    producer.produce(prefix + T.COLLECTOR_EVENTS, key=b"C1", value=event("gateway_down", "GW1", now))
    producer.produce(prefix + T.COLLECTOR_EVENTS, key=b"C1", value=event("gateway_down", "GW1", now + 5))
    value, headers = batch("C1", 1)
    producer.produce(prefix + T.READINGS, key=b"shard-0", value=value, headers=headers)
    producer.flush(10)
    service, stop_notify, notify_thread = start_service(config, kafka_bootstrap)
    watch, stop, thread = run_watch(kafka_bootstrap, prefix, silent_after_s=3.0)
    try:
        open_id = f"collector_offline:MALL1:GW1:{now}"
        wait_for(lambda: open_id in receiver.alert_ids(), 30)
        # no readings for 3 s: the collector is silent (one alert naming its gateway)
        wait_for(lambda: any(":silent:" in a for a in receiver.alert_ids()), 30)
        silent = next(json.loads(r["body"])["alert"] for r in receiver.requests
                      if ":silent:" in json.loads(r["body"])["alert"]["alert_id"])
        assert silent["details"]["gateways"] == "GW1" and silent["kind"] == "collector_offline"
        # a restarted watcher rebuilds its episodes from history and repeats nothing ...
        stop.set()
        thread.join(30)
        time.sleep(4.0)  # longer than the silence period: the readings fall out of its window
        watch, stop, thread = run_watch(kafka_bootstrap, prefix, silent_after_s=3.0)
        time.sleep(1.5)
        assert watch.published == 0
        # ... and the gateway coming back resolves its episode (and the collector's silence)
        producer.produce(prefix + T.COLLECTOR_EVENTS, key=b"C1",
                         value=event("gateway_up", "GW1", int(time.time() * 1000)))
        producer.flush(10)
        wait_for(lambda: open_id + ":resolved" in receiver.alert_ids(), 30)
        time.sleep(1.0)  # give any duplicate time to arrive
        ids = receiver.alert_ids()
        assert ids.count(open_id) == 1 and ids.count(silent["alert_id"]) == 1, ids
        assert silent["alert_id"] + ":resolved" in ids
    finally:
        stop.set()
        stop_notify.set()
        thread.join(30)
        notify_thread.join(30)
        receiver.stop()


def test_own_alerts_are_read_before_any_event_is_judged(kafka_bootstrap: str, prefix: str) -> None:
    """The topics are read in no fixed order: a restarted watcher that met the
    gateway_down event before the alert it had already published for it opened the
    episode again (a repeated alert, seen in CI). Its alerts now come first, to their end."""
    first, stop, thread = run_watch(kafka_bootstrap, prefix, silent_after_s=600.0)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    now = int(time.time() * 1000)
    producer.produce(prefix + T.COLLECTOR_EVENTS, key=b"C1", value=event("gateway_down", "GW1", now))
    producer.flush(10)
    try:
        wait_for(lambda: first.published == 1, 30)
    finally:
        stop.set()
        thread.join(30)
    again = CollectorWatch(kafka_bootstrap, config=WatchConfig(silent_after_ms=600_000),
                           lookback_s=600, topic_prefix=prefix)
    try:
        again.assign()
        # the episode is known once assign returns, before the event topic is even read
        assert list(again.state.episodes) == ["gw:MALL1:GW1"]
        assigned = {tp.topic for tp in again.consumer.assignment()}
        assert assigned == {prefix + T.COLLECTOR_EVENTS, prefix + T.READINGS}
        deadline = time.monotonic() + 10
        while not again.caught_up and time.monotonic() < deadline:
            again.step(0.2)
        assert again.caught_up and again.published == 0
    finally:
        again.consumer.close()
