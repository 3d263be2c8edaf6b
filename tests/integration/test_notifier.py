"""The notify service on the real broker, delivering to a local signed-webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipelines.notify import parse_config, verify
from pipelines.notify.providers import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from pipelines.notify.service import NotifyService
from schemas import codec

pytestmark = pytest.mark.integration
SECRET = "integration-secret-of-32-bytes-or-more"


class Receiver:
    """An aiohttp webhook endpoint on 127.0.0.1 (ephemeral port) in its own thread."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    async def _hook(self, request: web.Request) -> web.Response:
        self.requests.append({"body": await request.read(), "headers": dict(request.headers)})
        return web.Response(text="ok")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def start(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def alert_ids(self) -> list[str]:
        return [json.loads(r["body"])["alert"]["alert_id"] for r in self.requests]


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = (f"itest.notify-alerts.{suffix}", f"itest.notify-dlq.{suffix}")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(names[0], 2, 1), NewTopic(names[1], 1, 1)]).values():
        fut.result(30)
    try:
        yield names
    finally:
        for fut in admin.delete_topics(list(names)).values():
            with contextlib.suppress(Exception):  # cleanup of a test topic must not fail the test
                fut.result(30)


def alert(alert_id: str, account: str) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": "low_balance", "severity": "WARNING", "mall_id": "MALL1",
            "account_id": account, "meter_id": None, "ts_ms": int(time.time() * 1000),
            "message": f"balance low for {account}", "details": {"balance_minor": "500"}}


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def start_service(config: Any, bootstrap: str) -> tuple[NotifyService, threading.Event, threading.Thread]:
    service = NotifyService(config, bootstrap)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    assert service.assigned.wait(30), "no partitions assigned"
    return service, stop, thread


def test_each_alert_reaches_the_webhook_once_signed(kafka_bootstrap: str, topics: tuple[str, str],
                                                    tmp_path: Path) -> None:
    alerts_topic, dlq_topic = topics
    receiver = Receiver().start()
    config = parse_config({
        "providers": {"hook": {"type": "webhook", "channel": "sms", "url": receiver.url, "secret": SECRET,
                               "retries": 2, "backoff_s": 0.05, "allow_loopback_http": True}},
        "routes": [{"kinds": ["*"], "providers": ["hook"]}],
        "recipients": {"merchants": {"M1": {"phone": "+8613800000001"}, "M2": {"phone": "+8613800000002"}}},
        "rate_limit": {"per_hour": 100, "burst": 100},
        "dedup": {"path": str(tmp_path / "dedup.txt")},
        "kafka": {"topic": alerts_topic, "deadletter_topic": dlq_topic, "group": f"itest-notify-{uuid.uuid4().hex[:6]}"},
    })
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(record: dict[str, Any] | None, key: str = "M1") -> None:
        value = codec.encode("Alert", record) if record is not None else b"\x07not an alert"
        producer.produce(alerts_topic, key=key.encode(), value=value)

    try:
        service, stop, thread = start_service(config, kafka_bootstrap)
        first = [alert(f"it-{i}", "M1" if i % 2 else "M2") for i in range(4)]
        for a in first:
            send(a, a["account_id"])
        send(first[1], "M1")  # a duplicate alert_id (e.g. the forwarder re-published it)
        send(None)  # garbage: dead-lettered, the service keeps going
        producer.flush(10)
        wait_for(lambda: sum(service.stats.values()) >= 5 and len(receiver.requests) >= 4)
        time.sleep(1.0)  # room for a wrong second delivery to show up
        assert sorted(receiver.alert_ids()) == sorted(a["alert_id"] for a in first)
        assert service.stats == {"sent": 4, "duplicate": 1}
        for req in receiver.requests:
            h = req["headers"]
            assert verify(SECRET.encode(), h[TIMESTAMP_HEADER], h[NONCE_HEADER], req["body"], h[SIGNATURE_HEADER])
        stop.set()
        thread.join(30)

        # a restart resumes after the committed offsets and remembers what it delivered
        service, stop, thread = start_service(config, kafka_bootstrap)
        send(first[2], first[2]["account_id"])
        send(alert("it-new", "M2"), "M2")
        producer.flush(10)
        wait_for(lambda: "it-new" in receiver.alert_ids())
        time.sleep(1.0)
        assert sorted(receiver.alert_ids()) == sorted([a["alert_id"] for a in first] + ["it-new"])
        assert service.stats == {"sent": 1, "duplicate": 1}
        stop.set()
        thread.join(30)
    finally:
        receiver.stop()

    dlq = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"itest-dlq-{uuid.uuid4().hex[:6]}",
                    "auto.offset.reset": "earliest"})
    dlq.subscribe([dlq_topic])
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while not letters and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and not msg.error():
            letters.append(codec.decode("DeadLetter", msg.value()))
    dlq.close()
    assert len(letters) == 1
    assert letters[0]["stage"] == "notify.decode" and letters[0]["source_topic"] == alerts_topic
