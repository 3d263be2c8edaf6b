"""A real collector (simulated meters, real broker) scraped over HTTP: its series exist and
move, /readyz follows the poller, and a stopped gateway shows as down."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_collect_publish import FAST, START_MS, portfolio

from collectors.run import Collector
from collectors.sim_portfolio import mall_simulator
from pipelines import metrics as M

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def scrape(url: str, cid: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("collector") == cid:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "collector"))
                out[(s.name, labels)] = s.value
    return out


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_collector_series_move_and_a_lost_gateway_is_down(kafka_bootstrap: str, tmp_path: Path) -> None:
    p, mall_id = portfolio()
    cid = f"test-{uuid.uuid4().hex[:8]}"
    ok = (("result", "ok"),)

    async def body() -> tuple[dict, dict, dict, list[int]]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        col = Collector(p, mall_id, bootstrap=kafka_bootstrap, collector_id=cid,
                        spool_dir=tmp_path / "spool", clock=sim.now_ms, poll_interval_s=0.5,
                        poller_config=FAST, commands=False)
        server = M.serve(0, host="127.0.0.1", ready=col.readiness)
        assert server is not None
        codes = [status(server.url + "/readyz")]  # before run: not ready
        stop = asyncio.Event()
        task = asyncio.create_task(col.run(stop))
        try:
            await asyncio.sleep(2.5)
            codes.append(await asyncio.to_thread(status, server.url + "/readyz"))
            first = await asyncio.to_thread(scrape, server.url, cid)
            await asyncio.sleep(2.0)
            second = await asyncio.to_thread(scrape, server.url, cid)
            await sim.stop()  # every gateway goes away
            await asyncio.sleep(4.0)
            third = await asyncio.to_thread(scrape, server.url, cid)
        finally:
            stop.set()
            await task
            server.close()
        return first, second, third, codes

    first, second, third, codes = asyncio.run(body())
    assert codes == [503, 200]
    assert second[("mallwatt_collector_polls_total", ok)] > first[("mallwatt_collector_polls_total", ok)] > 0
    assert second[("mallwatt_collector_readings_total", ())] > first[("mallwatt_collector_readings_total", ())]
    assert second[("mallwatt_collector_spool_acked_records_total", ())] > 0
    gateways = len(p.malls[0].gateways)
    assert second[("mallwatt_collector_gateways", (("state", "up"),))] == gateways
    assert third[("mallwatt_collector_gateways", (("state", "down"),))] >= 1
    assert third[("mallwatt_collector_polls_total", (("result", "failed"),))] > 0
    assert third[("mallwatt_collector_events_total", (("kind", "gateway_down"),))] >= 1
