"""Alert preferences on the real broker: a PUT is answered after Kafka's ack, and a portal
started afterwards (a fresh read model and feed) shows them: they survive a restart. The
notifier's lookup reads the same record."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pipelines.core.models import WalletPolicy
from pipelines.portal.app import Portal, build_app
from pipelines.portal.auth import TokenStore
from pipelines.portal.directory import Directory
from pipelines.portal.feed import KafkaFeed
from pipelines.portal.notify_lookup import PreferenceBook
from pipelines.portal.payments import KafkaPaymentSink
from pipelines.portal.readmodel import ReadModel

pytestmark = pytest.mark.integration


def test_saved_preferences_survive_a_portal_restart(kafka_bootstrap: str, tmp_path: Path) -> None:
    account = f"PREF-{int(time.time() * 1000)}"
    directory = Directory({account: "PM"}, {account: WalletPolicy(max_topup=100_000)}, {"PM": "Asia/Shanghai"})
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.create("merchant", account, 0)[1]
    sink = KafkaPaymentSink(kafka_bootstrap)
    body = {"channels": ["sms"], "phone": "+8613800138000", "quiet_hours": {"start": "22:00", "end": "07:00"},
            "low_balance_minor": 2_000, "language": "en"}
    try:
        portal = Portal(ReadModel(), threading.Lock(), directory, tokens, sink, {})

        async def save() -> int:
            async with TestClient(TestServer(build_app(portal))) as client:
                answer = await client.put(f"/api/v1/accounts/{account}/preferences", json=body,
                                          headers={"Authorization": f"Bearer {token}"})
                return answer.status
        assert asyncio.run(save()) == 200
    finally:
        sink.close()
    # "restart": nothing but the topic carries them into a new read model
    model = ReadModel()
    feed = KafkaFeed(kafka_bootstrap, model, threading.Lock())
    feed.start()
    try:
        assert feed.caught_up.wait(60)
        saved = model.preferences[account]
        assert (saved.phone, saved.quiet_start, saved.quiet_end, saved.low_balance_minor, saved.language) == (
            "+8613800138000", "22:00", "07:00", 2_000, "en")
        notifier = PreferenceBook(model, directory.mall_of, directory.mall_tz)(account)
        assert notifier is not None and notifier.channels == frozenset({"sms"}) and notifier.tz == "Asia/Shanghai"
    finally:
        feed.stop()
