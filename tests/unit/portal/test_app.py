"""The portal API in process (aiohttp test server, a fake payment sink): access, scoping,
webhooks (signature, replay, policy, Kafka outage), the simulated provider, OpenAPI, the page."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from pipelines.core.models import WalletPolicy
from pipelines.portal.app import Portal, build_app
from pipelines.portal.auth import RateLimiter, TokenStore
from pipelines.portal.directory import Directory
from pipelines.portal.payments import PaymentNotAcknowledged
from pipelines.portal.providers import HmacProvider, SimulatedProvider
from pipelines.portal.readmodel import ReadModel

NOW = 1_784_080_800_000
SECRET = b"acme-secret-0123456789"


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.down = False

    async def send(self, payment: dict[str, Any]) -> int:
        if self.down:
            raise PaymentNotAcknowledged("broker away")
        self.sent.append(payment)
        return NOW


def make_portal(tmp_path: Path, rate: float = 100.0) -> tuple[Portal, dict[str, str]]:
    directory = Directory({"M01-S0001": "M01", "M01-S0002": "M01", "M02-S0001": "M02"},
                          {a: WalletPolicy(min_topup=1000, max_topup=100_000)
                           for a in ("M01-S0001", "M01-S0002", "M02-S0001")}, {"M01": "Asia/Shanghai"})
    tokens = TokenStore(tmp_path / "tokens.json")
    issued = {"s1": tokens.create("merchant", "M01-S0001", 0)[1], "s2": tokens.create("merchant", "M01-S0002", 0)[1],
              "op1": tokens.create("operator", "M01", 0)[1]}
    model = ReadModel(directory.mall_tz)
    model.apply_entries([{"entry_id": "p1", "account_id": "M01-S0001", "mall_id": "M01", "kind": "topup",
                          "amount_minor": 5000, "balance_after_minor": 5000, "ts_ms": NOW - 1000,
                          "source_id": "p1"}], NOW - 500)
    portal = Portal(model, threading.Lock(), directory, tokens, FakeSink(),
                    {"acme": HmacProvider("acme", SECRET), "sim": SimulatedProvider()},
                    limiter=RateLimiter(rate, rate), clock=lambda: NOW)
    return portal, issued


def run(tmp_path: Path, scenario: Callable[[TestClient, Portal, dict[str, str]], Awaitable[None]],
        rate: float = 100.0) -> None:
    async def main() -> None:
        portal, issued = make_portal(tmp_path, rate)
        async with TestClient(TestServer(build_app(portal))) as client:
            portal.base_url = str(client.make_url("")).rstrip("/")
            await scenario(client, portal, issued)
    asyncio.run(main())


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_access_and_scoping(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        url = "/api/v1/accounts/M01-S0001/balance"
        assert (await client.get(url)).status == 401
        bad = await client.get(url, headers=auth("mwp_00000000_nope"))
        assert bad.status == 401 and (await bad.json())["field"] == "Authorization"
        ok = await client.get(url, headers=auth(tok["s1"]))
        body = await ok.json()
        assert ok.status == 200 and body["balance_minor"] == 5000 and body["as_of_ms"] == NOW - 500
        assert (await client.get(url, headers=auth(tok["s2"]))).status == 403  # another merchant's
        assert (await client.get(url, headers=auth(tok["op1"]))).status == 200  # the mall's operator
        assert (await client.get("/api/v1/accounts/M02-S0001/balance", headers=auth(tok["op1"]))).status == 403
        listed = await (await client.get("/api/v1/accounts", headers=auth(tok["op1"]))).json()
        assert listed["accounts"] == ["M01-S0001", "M01-S0002"]
        for path in ("activity", "alerts", "usage", "usage?period=month", "overview"):
            answer = await client.get(f"/api/v1/accounts/M01-S0001/{path}", headers=auth(tok["s1"]))
            assert answer.status == 200, path
        overview = await (await client.get("/api/v1/accounts/M01-S0001/overview", headers=auth(tok["s1"]))).json()
        assert overview["topup"]["min_minor"] == 1000 and overview["activity"][0]["entry_id"] == "p1"
        # a revoked token is refused at once
        token_id = portal.tokens.authenticate(tok["s1"]).token_id
        portal.tokens.revoke(token_id, NOW)
        assert (await client.get(url, headers=auth(tok["s1"]))).status == 401
    run(tmp_path, scenario)


def test_rate_limit(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        codes = [(await client.get("/api/v1/accounts", headers=auth(tok["s1"]))).status for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert (await client.get("/api/v1/accounts", headers=auth(tok["s2"]))).status == 200
    run(tmp_path, scenario, rate=3)


def signed(body: dict[str, Any], nonce: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, HmacProvider("acme", SECRET).sign(raw, NOW, nonce=nonce)


def test_webhook_paths(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, _tok: dict[str, str]) -> None:
        sink: FakeSink = portal.sink  # type: ignore[assignment]
        note = {"transaction_id": "tx-1", "account_id": "M01-S0002", "amount_minor": 20000}
        raw, headers = signed(note, "nonce-0001")
        # Kafka away: no 2xx, nothing recorded, and the provider's retry (same nonce) goes through
        sink.down = True
        down = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
        assert down.status == 503 and sink.sent == []
        sink.down = False
        ok = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
        assert ok.status == 200 and (await ok.json())["payment_id"] == "acme:tx-1"
        assert [(p["payment_id"], p["account_id"], p["amount_minor"]) for p in sink.sent] == [
            ("acme:tx-1", "M01-S0002", 20000)]
        replay = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
        assert replay.status == 409 and len(sink.sent) == 1
        tampered = await client.post("/api/v1/webhooks/acme", data=raw.replace(b"20000", b"90000"),
                                     headers={**headers, "X-Signature-Nonce": "nonce-0002"})
        assert tampered.status == 401 and (await tampered.json())["error"] == "bad_signature"
        raw, headers = signed({**note, "account_id": "M09-S0001"})
        unknown = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
        assert unknown.status == 404 and (await unknown.json())["field"] == "account_id"
        for amount in (999, 100_001):
            raw, headers = signed({**note, "amount_minor": amount})
            policy = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
            assert policy.status == 422 and (await policy.json())["field"] == "amount_minor"
        raw, headers = signed({**note, "pad": "x" * 20_000})
        big = await client.post("/api/v1/webhooks/acme", data=raw, headers=headers)
        assert big.status == 413 and "error" in await big.json()
        assert (await client.post("/api/v1/webhooks/nope", data=b"{}")).status == 404
        assert len(sink.sent) == 1
    run(tmp_path, scenario)


def test_checkout_through_the_simulated_provider(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        sink: FakeSink = portal.sink  # type: ignore[assignment]
        url = "/api/v1/accounts/M01-S0001/checkout"
        low = await client.post(url, json={"amount_minor": 10}, headers=auth(tok["s1"]))
        assert low.status == 422 and (await low.json())["field"] == "amount_minor"
        assert (await client.post("/api/v1/accounts/M01-S0002/checkout", json={"amount_minor": 5000},
                                  headers=auth(tok["s1"]))).status == 403
        session = await (await client.post(url, json={"amount_minor": 5000}, headers=auth(tok["s1"]))).json()
        page = await client.get(session["checkout_url"])
        assert page.status == 200 and "50.00" in await page.text()
        paid = await client.post(session["pay_url"])
        assert paid.status == 200, await paid.text()
        assert sink.sent[0]["account_id"] == "M01-S0001" and sink.sent[0]["provider"] == "sim"
        assert (await client.post(session["pay_url"])).status == 404  # a session pays once
    run(tmp_path, scenario)


def test_openapi_and_page(tmp_path: Path) -> None:
    async def scenario(client: TestClient, _portal: Portal, _tok: dict[str, str]) -> None:
        spec = await (await client.get("/api/v1/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and "/api/v1/webhooks/{provider}" in spec["paths"]
        page = await client.get("/m")
        text = await page.text()
        assert page.status == 200 and "<svg" in text and "http" not in text.split("<script>")[0].lower().replace(
            'http-equiv', '')
        assert (await client.get("/api/v1/nothing")).status == 404
    run(tmp_path, scenario)


def test_requests_are_counted_by_route_pattern_never_by_account(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    pattern = "/api/v1/accounts/{account}/balance"

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("mallwatt_portal_requests_total", {"route": pattern, "status": status}) or 0.0

    async def scenario(client: TestClient, _portal: Portal, tok: dict[str, str]) -> None:
        ok_before, refused_before = count("200"), count("401")
        await client.get("/api/v1/accounts/M01-S0001/balance", headers=auth(tok["s1"]))
        await client.get("/api/v1/accounts/M01-S0002/balance")
        assert count("200") == ok_before + 1 and count("401") == refused_before + 1
        labels = {s.labels.get("route") for m in REGISTRY.collect() if m.name == "mallwatt_portal_requests"
                  for s in m.samples}
        assert not any("M01-S000" in (r or "") for r in labels)
    run(tmp_path, scenario)
