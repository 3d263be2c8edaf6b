"""The merchant's page in headless Chromium on a phone viewport, against the real broker and
worker: a tripped account tops up through the page's button and the simulated provider,
and the page shows the new balance and the power coming back (RECONNECT).

Chromium is Debian's, installed by the project (infra.debian) when missing; the test skips
only when this machine cannot install it, saying why. Screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from cdp import Chromium
from confluent_kafka import Producer
from operators import signed
from test_portal import worker  # noqa: F401  (the fixture: a worker on a 3-merchant portfolio)

from infra.debian import DebianUnavailable, chromium_executable
from pipelines.money_input import produce_posting
from pipelines.portal.app import Portal, build_app
from pipelines.portal.auth import RateLimiter, TokenStore
from pipelines.portal.directory import load_directory
from pipelines.portal.feed import KafkaFeed
from pipelines.portal.payments import KafkaPaymentSink
from pipelines.portal.providers import SimulatedProvider
from pipelines.portal.readmodel import ReadModel

pytestmark = pytest.mark.integration

# the page's own rendering of money: "-¥20.00", "¥80.00" (grouping commas removed)
READ_BALANCE = """(() => { const t = document.getElementById('balance').textContent.replace(/[,\\s]/g, '');
  const m = /^(-?)¥(\\d+)\\.(\\d\\d)$/.exec(t); return m ? (m[1] ? -1 : 1) * (+m[2] * 100 + +m[3]) : null; })()"""
RELAY = "document.getElementById('relay').className"


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return chromium_executable()
    except DebianUnavailable as exc:
        pytest.skip(f"Debian's chromium cannot be installed here: {exc}")


@pytest.mark.timeout(1800)  # a fresh machine installs chromium in the fixture first (apt-get)
def test_page_tops_up_a_tripped_account_in_chromium(
        kafka_bootstrap: str, worker: tuple[dict, Path], chromium: str, tmp_path: Path) -> None:  # noqa: F811
    data, config = worker
    merchant = data["malls"][0]["merchants"][0]
    account, mall = merchant["id"], data["malls"][0]["id"]
    directory = load_directory(config, 8)
    model, lock = ReadModel(directory.mall_tz), threading.Lock()
    feed = KafkaFeed(kafka_bootstrap, model, lock)
    feed.start()
    sink = KafkaPaymentSink(kafka_bootstrap)
    tokens = TokenStore(tmp_path / "tokens.json")
    token = tokens.create("merchant", account, 0)[1]
    portal = Portal(model, lock, directory, tokens, sink, {"sim": SimulatedProvider()},
                    limiter=RateLimiter(100, 100))
    shots = tmp_path / "screenshots"

    def view() -> tuple[int | None, str]:
        with lock:
            body = model.balance(account, int(time.time() * 1000))
        if body is None:
            return None, "unknown"
        return body["balance_minor"], body["relay"]["state"]

    try:
        # a shared-cost posting takes the new account (opening balance 0) below its cutoff:
        # the worker trips it, so the page starts with the power off
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        produce_posting(producer, signed({"entry_id": f"{account}:shr:browser", "account_id": account,
                                          "mall_id": mall, "kind": "shared_cost", "amount_minor": -2_000,
                                          "ts_ms": int(time.time() * 1000) - 1000, "source_id": "P1|area|test|2000",
                                          "rate": "1.000000"}))
        assert producer.flush(10) == 0

        async def scenario() -> dict[str, float]:
            runner = web.AppRunner(build_app(portal), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            portal.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            try:
                deadline = time.monotonic() + 180  # the worker (faust) starts while the posting waits
                while view() != (-2_000, "disconnected"):
                    assert time.monotonic() < deadline, f"the trip never reached the read model: {view()}"
                    await asyncio.sleep(0.1)
                async with Chromium(chromium, tmp_path / "chromium-profile") as page:
                    await page.phone_viewport(390, 844)
                    await page.navigate(f"{portal.base_url}/m#t={token}&lang=zh-CN")
                    assert await page.wait_for(f"{READ_BALANCE} === -2000", 15)
                    assert "off" in await page.evaluate(RELAY)
                    assert await page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
                    await page.screenshot(shots / "1-tripped.png")

                    await page.click('#amounts button[data-a="10000"]')
                    assert await page.wait_for(
                        "document.querySelector('#amounts button.sel').dataset.a === '10000'", 5)
                    clicked = time.monotonic()
                    await page.click("#topup")
                    await page.wait_for(f"{READ_BALANCE} === 8000", 20)
                    balance_s = time.monotonic() - clicked
                    await page.screenshot(shots / "2-credited.png")
                    # the RECONNECT arrives on its own topic; the page refreshes every 10 s
                    await page.wait_for(f"{RELAY}.includes('on')", 25)
                    relay_s = time.monotonic() - clicked
                    assert await page.evaluate("document.getElementById('msg').textContent") == "已到账"
                    await page.screenshot(shots / "3-reconnected.png")
                    activity = await page.evaluate("document.getElementById('activity').textContent")
                    assert "+¥100.00" in activity and "-¥20.00" in activity, activity
                    return {"click_to_balance_s": balance_s, "click_to_relay_on_s": relay_s}
            finally:
                await runner.cleanup()

        figures = asyncio.run(scenario())
        print(f"page figures: {figures}; screenshots in {shots}")
        assert view() == (8_000, "connected")
        assert sorted(p.name for p in shots.glob("*.png")) == ["1-tripped.png", "2-credited.png", "3-reconnected.png"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots.glob("*.png"))
    finally:
        feed.stop()
        sink.close()
