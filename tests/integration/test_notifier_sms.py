"""The notify service on the real broker with the tencent_sms provider against a local fake of
Tencent Cloud SMS: throttled then sent once, duplicates suppressed (also after a restart that
lost the dedup file), a deferred message sent by the service's own tick."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from test_notifier import alert, start_service, topics, wait_for  # noqa: F401  (topics: a fixture)

from pipelines.notify import Preferences, parse_config
from pipelines.notify.journal import SendJournal
from schemas import codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "notify"))
from fake_tencent_sms import FakeTencentSms  # noqa: E402

pytestmark = pytest.mark.integration
SECRET_ID, SECRET_KEY = "AKIDintegration0001", "sk-integration-never-logged"
PREFS = {"M1": Preferences("M1", phone="+8613900000001", language="zh-CN")}


def lookup(account: str) -> Preferences | None:
    """The preferences lookup named in the test's notify config ("test_notifier_sms:lookup")."""
    return PREFS.get(account)


class FakeInThread:
    def __init__(self, script: list[str]) -> None:
        self.fake = FakeTencentSms({SECRET_ID: SECRET_KEY}, script=script)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.fake.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.fake.stop())

    def __enter__(self) -> FakeTencentSms:
        self._thread.start()
        assert self._ready.wait(10)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_service_sends_each_alert_once_through_tencent_sms(
        kafka_bootstrap: str, topics: tuple[str, str], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    alerts_topic, dlq_topic = topics
    monkeypatch.setenv("MW_IT_SMS_ID", SECRET_ID)
    monkeypatch.setenv("MW_IT_SMS_KEY", SECRET_KEY)
    journal_path, dedup_path = tmp_path / "sms-journal.jsonl", tmp_path / "dedup.txt"
    # a message held by quiet hours before a restart, due in 1.5 s: the service's tick sends it
    seeded = SendJournal(journal_path)
    seeded.put("held|sms|M2", "deferred", sync=True, due_ms=int(time.time() * 1000) + 1500, recipient="M2",
               request={"phone": "+8613800000002", "template_id": "2001", "params": ["M2", "1.00"],
                        "context": "held|sms|M2"})
    seeded.close()
    config = parse_config({
        "providers": {"sms": {"type": "tencent_sms", "endpoint": "http://127.0.0.1:1", "sms_sdk_app_id": "1400006666",
                              "sign_name": "万达广场", "secret_id_env": "MW_IT_SMS_ID", "secret_key_env": "MW_IT_SMS_KEY",
                              "templates": {"low_balance": {"zh-CN": {"id": "2001", "params": ["account_id"]}}},
                              "preferences": "test_notifier_sms:lookup", "journal_path": str(journal_path),
                              "backoff_s": 0.05, "allow_loopback_http": True}},
        "routes": [{"kinds": ["low_balance"], "providers": ["sms"]}],
        "recipients": {"merchants": {"M1": {"phone": "+8613800000001"}, "M2": {"phone": "+8613800000002"}}},
        "rate_limit": {"per_hour": 100, "burst": 100},
        "dedup": {"path": str(dedup_path)},
        "kafka": {"topic": alerts_topic, "deadletter_topic": dlq_topic, "group": f"itest-sms-{uuid.uuid4().hex[:6]}"},
    })
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(record: dict[str, Any]) -> None:
        producer.produce(alerts_topic, key=record["account_id"].encode(), value=codec.encode("Alert", record))

    with FakeInThread(["throttle"]) as fake:
        config = config.model_copy(update={"providers": {"sms": {**config.providers["sms"], "endpoint": fake.url}}})
        service, stop, thread = start_service(config, kafka_bootstrap)
        a1, a2 = alert("sms-1", "M1"), alert("sms-2", "M2")
        for record in (a1, a1, a2):  # a1 twice: the forwarder re-published it
            send(record)
        producer.flush(10)
        wait_for(lambda: len(fake.accepted) >= 3)
        time.sleep(1.0)  # room for a wrong second message
        phones = sorted(m["PhoneNumberSet"][0] for m in fake.accepted)
        assert phones == ["+8613800000002", "+8613800000002", "+8613900000001"]  # M1's preference phone
        assert sorted(m["SessionContext"] for m in fake.accepted) == ["held|sms|M2", "sms-1|sms|M1", "sms-2|sms|M2"]
        assert fake.refused == ["RequestLimitExceeded"] and service.stats == {"sent": 2, "duplicate": 1}
        stop.set()
        thread.join(30)

        # a crash lost the dedup file: the journal alone keeps the re-published alert from a second SMS
        dedup_path.unlink()
        service, stop, thread = start_service(config, kafka_bootstrap)
        send(a1)
        send(alert("sms-3", "M1"))
        producer.flush(10)
        wait_for(lambda: len(fake.accepted) >= 4)
        time.sleep(1.0)
        assert [m["SessionContext"] for m in fake.accepted].count("sms-1|sms|M1") == 1
        assert len(fake.accepted) == 4 and fake.requests == 5
        stop.set()
        thread.join(30)
    captured = capfd.readouterr()
    assert SECRET_KEY not in captured.out + captured.err
