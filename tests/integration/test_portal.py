"""The portal on the real broker: a webhook's payment goes through the worker's claims to the
ledger, and the read model shows the new balance within 2 s of Kafka's acknowledgement."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer
from operators import register, signed

from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portal.app import Portal, build_app
from pipelines.portal.auth import RateLimiter, TokenStore
from pipelines.portal.directory import load_directory
from pipelines.portal.feed import KafkaFeed
from pipelines.portal.payments import KafkaPaymentSink
from pipelines.portal.providers import HmacProvider, SimulatedProvider
from pipelines.portal.readmodel import ReadModel
from pipelines.portfolio import dump_portfolio

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SECRET = b"integration-secret-0123"


@pytest.fixture
def worker(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict, Path]]:
    prefix = f"P{uuid.uuid4().hex[:6]}"
    data = generate(1, 3, seed=5, mall_prefix=prefix)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 0
    register(data)  # the finance operator who signs the opening top-up and postings
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": f"test-{prefix}"}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "worker", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield data, config
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_webhook_topup_shows_in_the_read_model_within_2s(
        kafka_bootstrap: str, worker: tuple[dict, Path], tmp_path: Path) -> None:
    data, config = worker
    account = data["malls"][0]["merchants"][0]["id"]
    directory = load_directory(config, 8)
    model, lock = ReadModel(directory.mall_tz), threading.Lock()
    feed = KafkaFeed(kafka_bootstrap, model, lock)
    feed.start()
    sink = KafkaPaymentSink(kafka_bootstrap)
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.create("merchant", account, 0)[1]
    acme = HmacProvider("acme", SECRET)
    portal = Portal(model, lock, directory, tokens, sink, {"acme": acme, "sim": SimulatedProvider()},
                    limiter=RateLimiter(1000, 1000))  # the test polls every 20 ms
    headers = {"Authorization": f"Bearer {token}"}
    try:
        # the worker starts (faust) while an opening top-up waits for it
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        produce_payment(producer, signed({"payment_id": f"{account}-open", "account_id": account, "kind": "TOPUP",
                                          "amount_minor": 10_000, "ts_ms": int(time.time() * 1000) - 1000}))
        assert producer.flush(10) == 0

        async def scenario() -> dict[str, float]:
            async with TestClient(TestServer(build_app(portal))) as client:
                portal.base_url = str(client.make_url("")).rstrip("/")
                url = f"/api/v1/accounts/{account}/balance"

                async def balance_becomes(expected: int, timeout: float) -> float:
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        body = await (await client.get(url, headers=headers)).json()
                        if body["balance_minor"] == expected:
                            return time.monotonic()
                        await asyncio.sleep(0.02)
                    raise AssertionError(f"balance never became {expected}; last {body}")

                await balance_becomes(10_000, 120)
                # the merchant's page: checkout, the simulated provider pays and signs the webhook
                session = await (await client.post(f"/api/v1/accounts/{account}/checkout",
                                                   json={"amount_minor": 5_000}, headers=headers)).json()
                paid = await client.post(session["pay_url"])
                acked = time.monotonic()
                assert paid.status == 200, await paid.text()
                sim_ms = (await balance_becomes(15_000, 10) - acked) * 1000

                # a provider's own webhook, then the same transaction again under a new nonce: once
                raw = json.dumps({"transaction_id": "tx-42", "account_id": account, "amount_minor": 2_000}).encode()
                first = await client.post("/api/v1/webhooks/acme", data=raw,
                                          headers=acme.sign(raw, int(time.time() * 1000)))
                acked = time.monotonic()
                assert first.status == 200, await first.text()
                hmac_ms = (await balance_becomes(17_000, 10) - acked) * 1000
                again = await client.post("/api/v1/webhooks/acme", data=raw,
                                          headers=acme.sign(raw, int(time.time() * 1000)))
                assert again.status == 200  # recorded again; the worker's claim credits nothing
                marker = json.dumps({"transaction_id": "tx-43", "account_id": account, "amount_minor": 1}).encode()
                assert (await client.post("/api/v1/webhooks/acme", data=marker,
                                          headers=acme.sign(marker, int(time.time() * 1000)))).status == 200
                await balance_becomes(17_001, 10)
                return {"sim_ms": sim_ms, "hmac_ms": hmac_ms}

        figures = asyncio.run(scenario())
        print(f"ack -> read model balance: {figures}")
        assert figures["sim_ms"] < 2000 and figures["hmac_ms"] < 2000, figures
    finally:
        feed.stop()
        sink.close()
