"""/metrics, /healthz, /readyz and the series the sink, collector and notifier export."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME
from prometheus_client import REGISTRY

from pipelines import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notify"))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_endpoints_serve_metrics_health_and_readiness() -> None:
    state = {"ready": False}
    server = M.serve(0, host="127.0.0.1", ready=lambda: (state["ready"], "waiting for partitions"))
    assert server is not None
    try:
        M.SINK_ROWS.labels("readings").inc(3)
        status, body = get(server.url + "/metrics")
        assert status == 200
        before = float(next(line.split()[-1] for line in body.splitlines()
                            if line.startswith('mallwatt_sink_rows_inserted_total{table="readings"}')))
        M.SINK_ROWS.labels("readings").inc(2)
        _, body = get(server.url + "/metrics")
        after = float(next(line.split()[-1] for line in body.splitlines()
                           if line.startswith('mallwatt_sink_rows_inserted_total{table="readings"}')))
        assert after == before + 2
        # every declared family is there (with or without children yet)
        for family in ("mallwatt_collector_polls_total", "mallwatt_consumer_lag_messages",
                       "mallwatt_notify_deliveries_total", "mallwatt_worker_step_duration_seconds",
                       "process_cpu_seconds_total"):
            assert f"# TYPE {family.removesuffix('_total')}" in body, family
        assert get(server.url + "/healthz") == (200, "ok\n")
        assert get(server.url + "/readyz") == (503, "waiting for partitions\n")
        state["ready"] = True
        assert get(server.url + "/readyz") == (200, "waiting for partitions\n")
        assert get(server.url + "/nope")[0] == 404
    finally:
        server.close()


def test_a_failing_readiness_check_is_not_ready_and_a_taken_port_is_no_crash() -> None:
    def boom() -> bool:
        raise RuntimeError("no broker")

    server = M.serve(0, host="127.0.0.1", ready=boom)
    assert server is not None
    try:
        status, body = get(server.url + "/readyz")
        assert status == 503 and "RuntimeError: no broker" in body
        assert M.serve(server.port, host="127.0.0.1") is None  # logged, not raised
    finally:
        server.close()
    assert M.serve(-1) is None


def test_port_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLWATT_METRICS_PORT", raising=False)
    monkeypatch.delenv("MALLWATT_SINK_METRICS_PORT", raising=False)
    assert M.metrics_port("sink") == M.DEFAULT_PORTS["sink"] == 9462
    monkeypatch.setenv("MALLWATT_METRICS_PORT", "9500")
    assert M.metrics_port("sink") == 9500
    monkeypatch.setenv("MALLWATT_SINK_METRICS_PORT", "9501")
    assert M.metrics_port("sink") == 9501
    assert M.metrics_port("sink", 7) == 7
    monkeypatch.setenv("MALLWATT_SINK_METRICS_PORT", "x")
    with pytest.raises(ValueError, match="MALLWATT_SINK_METRICS_PORT"):
        M.metrics_port("sink")


def test_consumer_lag_from_librdkafka_statistics() -> None:
    cb = M.lag_stats_config("t-lag")["stats_cb"]
    stats = {"topics": {"mallwatt.alerts": {"partitions": {
        "0": {"fetch_state": "active", "consumer_lag": 42},
        "1": {"fetch_state": "none", "consumer_lag": 7},  # not ours
        "-1": {"fetch_state": "active", "consumer_lag": 9}}}}}  # fmt: skip
    cb(json.dumps(stats))
    assert value("mallwatt_consumer_lag_messages", component="t-lag", topic="mallwatt.alerts",
                 partition="0") == 42
    assert REGISTRY.get_sample_value("mallwatt_consumer_lag_messages", {
        "component": "t-lag", "topic": "mallwatt.alerts", "partition": "1"}) is None
    cb("not json")  # ignored


# --- sink ---------------------------------------------------------------------------------


class _FakeProducer:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def produce(self, topic: str, **kw: Any) -> None:
        self.sent.append((topic, kw))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


class _FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        self.commits.append(offsets)

    def close(self) -> None:
        pass


def test_sink_counts_messages_rows_failures_dead_letters_and_watermark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from pipelines import sink as sink_mod
    from tests.unit.warehouse.test_watermark_time import NOW, FakeMessage, readings

    class Message(FakeMessage):
        def key(self) -> bytes:
            return b"k"

    calls = {"n": 0}

    def insert(client: Any, table: str, data: Any, token: str | None = None) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("server away")  # first attempt fails, the retry succeeds

    monkeypatch.setattr(sink_mod, "insert_arrow", insert)
    sink = sink_mod.Sink(object(), "127.0.0.1:1", topics=["mallwatt.readings"],
                         stop_event=threading.Event(), close_every=0)
    sink.consumer.close()
    sink.consumer = _FakeConsumer()  # type: ignore[assignment]
    sink.producer = _FakeProducer()  # type: ignore[assignment]
    msgs0 = value("mallwatt_sink_messages_total", topic="mallwatt.readings")
    rows0 = value("mallwatt_sink_rows_inserted_total", table="readings")
    fail0 = value("mallwatt_sink_insert_failures_total", table="readings")
    dl0 = value("mallwatt_dead_letters_total", component="sink", stage="sink", reason="DecodeError")
    assert sink.readiness() == (False, "waiting for partition assignment")
    sink._on_assign(None, [])  # type: ignore[arg-type]
    assert sink.readiness()[0]
    buf = sink._handle(Message(readings([NOW, NOW]), 0, (TIMESTAMP_CREATE_TIME, NOW)))
    sink._handle(Message(b"\x00garbage", 1, (TIMESTAMP_CREATE_TIME, NOW)))
    assert buf is not None
    sink._flush(buf)
    assert buf.consumed == 2  # added to the metric once per consumed batch, in run()
    buf.messages.inc(buf.consumed)
    assert value("mallwatt_sink_messages_total", topic="mallwatt.readings") == msgs0 + 2
    assert value("mallwatt_sink_rows_inserted_total", table="readings") == rows0 + 2
    assert value("mallwatt_sink_insert_failures_total", table="readings") == fail0 + 1
    assert value("mallwatt_dead_letters_total", component="sink", stage="sink",
                 reason="DecodeError") == dl0 + 1
    assert value("mallwatt_sink_watermark_timestamp_seconds", topic="mallwatt.readings") == NOW / 1000
    age = value("mallwatt_sink_watermark_age_seconds", topic="mallwatt.readings")
    assert age == pytest.approx(time.time() - NOW / 1000, abs=5)
    assert value("mallwatt_sink_insert_duration_seconds_count", table="readings") >= 1


# --- collector ------------------------------------------------------------------------------


def test_collector_exports_polls_gateways_spool_and_readings(tmp_path: Path) -> None:
    from collectors.run import Collector
    from pipelines.generate import generate
    from pipelines.portfolio import parse_portfolio

    data = copy.deepcopy(generate(1, 4, seed=3, mall_prefix="TMET"))
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0].id
    c = Collector(portfolio, mall, bootstrap="127.0.0.1:1", collector_id="tmet",
                  spool_dir=tmp_path / "spool", commands=False)
    try:
        c.export_metrics(every_s=0)
        ok0 = value("mallwatt_collector_polls_total", collector="tmet", result="ok")
        assert value("mallwatt_collector_gateways", collector="tmet", state="up") == len(c.poller.links)
        assert value("mallwatt_collector_kafka_up", collector="tmet") == 1
        # three good polls, one meter down, one gateway lost, one reading spooled
        st = next(iter(c.poller.devices.values()))
        st.polls_ok += 3
        st.down = True
        link = next(iter(c.poller.links.values()))
        link.up = False
        c.publisher.readings += 5
        c.export_metrics(every_s=0)
        assert value("mallwatt_collector_polls_total", collector="tmet", result="ok") == ok0 + 3
        assert value("mallwatt_collector_devices", collector="tmet", state="down") == 1
        assert value("mallwatt_collector_gateway_up", collector="tmet", mall=mall,
                     gateway=link.name) == 0
        assert value("mallwatt_collector_readings_total", collector="tmet") == 5
        assert value("mallwatt_collector_last_reading_timestamp_seconds", collector="tmet",
                     mall=mall) > 0
        assert c.readiness() == (False, "poller not running")
    finally:
        c.spool.close()


# --- notifier -------------------------------------------------------------------------------


def test_notifier_counts_sent_failed_and_deduplicated_by_channel() -> None:
    from notify_helpers import FakeNotifier, alert, config_data

    from pipelines.notify import Dispatcher, parse_config

    config = parse_config(config_data())
    fakes = {name: FakeNotifier(name, fail={"bad"}) for name in config.providers}
    d = Dispatcher.from_config(config, providers=fakes)

    def n(result: str) -> float:
        return value("mallwatt_notify_deliveries_total", channel="sms", provider="sms", result=result)

    sent0, failed0, dup0 = n("sent"), n("failed"), n("deduplicated")
    asyncio.run(d.handle(alert("m1")))
    asyncio.run(d.handle(alert("m1")))  # same id: deduplicated
    asyncio.run(d.handle(alert("bad")))
    assert (n("sent"), n("failed"), n("deduplicated")) == (sent0 + 1, failed0 + 1, dup0 + 1)
    assert value("mallwatt_notify_send_duration_seconds_count", channel="sms") >= 2
