"""Collector end to end: simulated meters (Modbus TCP on loopback) -> spool -> real broker."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from collectors.poller import PollerConfig
from collectors.run import Collector
from collectors.sim_portfolio import mall_simulator
from infra import topics as T
from pipelines.context import landlord_account
from pipelines.generate import generate
from pipelines.portfolio import Portfolio, parse_portfolio
from schemas import codec
from schemas.keys import account_shard, shard_key
from schemas.readings import batch_to_frame, reading_flags

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

START_MS = 1_783_000_000_000
FAST = PollerConfig(timeout_s=0.5, retries=1, retry_backoff_s=0.01, down_backoff_s=0.5,
                    down_backoff_max_s=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def portfolio(stalls: int = 6) -> tuple[Portfolio, str]:
    data = generate(1, stalls, seed=3, mall_prefix=f"T{uuid.uuid4().hex[:8]}")
    for gw in data["malls"][0]["gateways"]:
        gw["port"] = free_port()  # ephemeral: tests and the demo never collide
    p = parse_portfolio(data)
    return p, p.malls[0].id


class TopicTail:
    """Everything produced to a topic after construction (all partitions)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                           "enable.auto.commit": False})
        parts = self.c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = []
        for p in parts:
            _, hi = self.c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, hi))
        self.c.assign(tps)

    def read(self, until: Any = None, seconds: float = 10.0) -> list[Any]:
        out, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            m = self.c.poll(0.3)
            if m is None:
                if until is None and out:
                    break
                continue
            if m.error():
                continue
            out.append(m)
            if until is not None and until(out):
                break
        return out

    def close(self) -> None:
        self.c.close()


def ours(msgs: list[Any], collector_id: str) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for m in msgs:
        rec = codec.decode("ReadingBatch", m.value())
        if rec["collector_id"] == collector_id:
            out.append((m, rec))
    return out


async def run_for(col: Collector, seconds: float, stats: dict[str, Any]) -> asyncio.Task:
    stop = asyncio.Event()
    task = asyncio.create_task(col.run(stop, stats=stats))
    task.stop = stop  # type: ignore[attr-defined]
    return task


def test_readings_land_on_their_account_shard(kafka_bootstrap: str, tmp_path: Path) -> None:
    p, mall_id = portfolio()
    tail = TopicTail(kafka_bootstrap, T.READINGS)
    events = TopicTail(kafka_bootstrap, T.COLLECTOR_EVENTS)
    cid = f"test-{uuid.uuid4().hex[:8]}"

    async def body() -> dict[str, Any]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        sim.meters[p.malls[0].meters[0].id].inject_reset()  # a flagged reading on its way
        stats: dict[str, Any] = {}
        try:
            col = Collector(p, mall_id, bootstrap=kafka_bootstrap, collector_id=cid,
                            spool_dir=tmp_path / "spool", clock=sim.now_ms,
                            poll_interval_s=0.5, poller_config=FAST, commands=False)
            stop = asyncio.Event()
            task = asyncio.create_task(col.run(stop, stats=stats))
            await asyncio.sleep(3.0)
            sim.meters[p.malls[0].meters[0].id].inject_reset()
            await asyncio.sleep(1.5)
            stop.set()
            return await task
        finally:
            await sim.stop()

    final = asyncio.run(body())
    assert final["delivered_all"] and final["spool_depth"] == 0
    partitions = T.default_partitions()
    got = ours(tail.read(until=lambda ms: sum(1 for _ in ms) >= final["batches"], seconds=15),
               cid)
    tail.close()
    assert len(got) == final["batches"] > 0
    mall = p.malls[0]
    account_of = {m.id: m.account or landlord_account(mall_id) for m in mall.meters}
    circuit_of = {m.id: m.circuits[0].id for m in mall.meters}
    seqs: dict[int, list[int]] = {}
    rows = 0
    flags: list[str] = []
    for msg, rec in got:
        assert msg.partition() == rec["shard"]
        assert msg.key() == shard_key(rec["shard"])
        assert rec["batch_id"] == f"{cid}/{rec['shard']}/{rec['seq']}"
        frame = batch_to_frame(rec)
        for row in frame.iter_rows(named=True):
            assert row["account_id"] == account_of[row["meter_id"]]
            assert row["circuit_id"] == circuit_of[row["meter_id"]]
            assert account_shard(row["account_id"], partitions) == rec["shard"]
            if row["meter_id"] != mall.meters[0].id:  # the reset one reads ~0
                assert row["import_kwh"] > 0
        flags += [f for fs in reading_flags(rec).values() for f in fs]
        rows += frame.height
        seqs.setdefault(rec["shard"], []).append(rec["seq"])
    assert rows == final["readings"]
    assert {r for _, rec in got for r in rec["meter_id"]} == {m.id for m in mall.meters}
    for s in seqs.values():
        assert s == list(range(len(s)))  # each seq once, in order, from 0
    assert "counter_decreased" in flags
    kinds = [codec.decode("CollectorEvent", m.value()) for m in events.read(seconds=5)]
    events.close()
    assert [e["kind"] for e in kinds if e["collector_id"] == cid][0] == "started"
    assert "stopped" in [e["kind"] for e in kinds if e["collector_id"] == cid]


def test_broker_outage_loses_nothing_and_duplicates_nothing(kafka_bootstrap: str,
                                                           tmp_path: Path) -> None:
    p, mall_id = portfolio(4)
    tail = TopicTail(kafka_bootstrap, T.READINGS)
    cid = f"test-{uuid.uuid4().hex[:8]}"
    network = {"addr": kafka_bootstrap}

    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        stats: dict[str, Any] = {}
        try:
            col = Collector(p, mall_id, bootstrap=lambda: network["addr"], collector_id=cid,
                            spool_dir=tmp_path / "spool", clock=sim.now_ms,
                            poll_interval_s=0.5, poller_config=FAST, commands=False,
                            producer_overrides={"message.timeout.ms": 3000})
            col.drainer.retry_max_s = 2.0
            stop = asyncio.Event()
            task = asyncio.create_task(col.run(stop, stats=stats))
            await asyncio.sleep(3.0)
            assert stats["acked"] > 0 and stats["kafka_ok"]
            # the link to Kafka goes away: nothing answers at this address
            network["addr"] = "127.0.0.1:1"
            col.drainer.reset_producer()
            await asyncio.sleep(12.0)
            during = dict(stats)
            network["addr"] = kafka_bootstrap
            col.drainer.reset_producer()
            for _ in range(200):
                await asyncio.sleep(0.1)
                if stats["kafka_ok"] and stats["spool_depth"] <= 2:
                    break
            await asyncio.sleep(1.0)
            stop.set()
            return during, await task
        finally:
            await sim.stop()

    during, final = asyncio.run(body())
    assert not during["kafka_ok"] and during["send_failures"] > 0
    assert during["spool_depth"] > 10  # the backlog waited on disk
    assert final["delivered_all"] and final["spool_depth"] == 0
    got = ours(tail.read(until=lambda ms: len(ms) >= final["batches"], seconds=20), cid)
    extra = ours(tail.read(seconds=3), cid)  # anything sent twice would show up here
    tail.close()
    got += extra
    seqs: dict[int, list[int]] = {}
    for msg, rec in got:
        assert msg.partition() == rec["shard"]
        seqs.setdefault(rec["shard"], []).append(rec["seq"])
    for shard, s in seqs.items():
        assert s == list(range(len(s))), (shard, s)  # every seq exactly once, in order
    assert sum(len(s) for s in seqs.values()) == final["batches"]
    assert sum(len(rec["circuit_id"]) for _, rec in got) == final["readings"]


def test_trip_command_opens_the_relay_and_is_confirmed(kafka_bootstrap: str,
                                                       tmp_path: Path) -> None:
    p, mall_id = portfolio(4)
    outcomes = TopicTail(kafka_bootstrap, T.RELAY_OUTCOMES)
    cid = f"test-{uuid.uuid4().hex[:8]}"
    mall = p.malls[0]
    meter = next(m for m in mall.meters if m.account and m.model == "acrel_ddsy1352")
    other_mall_cmd = f"other-{uuid.uuid4()}"
    command_id = f"cmd-{uuid.uuid4()}"

    def command(cmd_id: str, mall: str) -> bytes:
        return codec.encode("RelayCommand", {
            "command_id": cmd_id, "action": "TRIP", "reason": "credit", "mall_id": mall,
            "gateway_id": meter.gateway, "meter_id": meter.id, "account_id": meter.account,
            "issued_at_ms": START_MS, "cause_ts_ms": None, "requested_by": "test"})

    async def body() -> tuple[bool, dict[str, Any]]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        stats: dict[str, Any] = {}
        try:
            col = Collector(p, mall_id, bootstrap=kafka_bootstrap, collector_id=cid,
                            spool_dir=tmp_path / "spool", clock=sim.now_ms,
                            poll_interval_s=0.5, poller_config=FAST)
            stop = asyncio.Event()
            task = asyncio.create_task(col.run(stop, stats=stats))
            assert col.executor is not None
            for _ in range(150):
                await asyncio.sleep(0.1)
                if col.executor.assigned:
                    break
            await asyncio.sleep(1.5)  # the group's "latest" offsets are resolved
            prod = Producer({"bootstrap.servers": kafka_bootstrap})
            for cmd_id, m in ((other_mall_cmd, "ELSEWHERE"), (command_id, mall_id)):
                prod.produce(T.RELAY_COMMANDS, key=meter.gateway.encode(),
                             value=command(cmd_id, m))
            prod.flush(10)
            for _ in range(150):
                await asyncio.sleep(0.1)
                if stats.get("commands_executed"):
                    break
            await asyncio.sleep(0.5)
            closed = sim.meters[meter.id].relay_closed
            stop.set()
            return closed, await task
        finally:
            await sim.stop()

    closed, final = asyncio.run(body())
    assert closed is False
    assert final["commands_executed"] == 1 and final["commands_ignored"] >= 1
    msgs = outcomes.read(until=lambda ms: any(
        codec.decode("RelayOutcome", m.value())["command_id"] == command_id for m in ms),
        seconds=15)
    outcomes.close()
    mine = [codec.decode("RelayOutcome", m.value()) for m in msgs]
    mine = [o for o in mine if o["command_id"] in (command_id, other_mall_cmd)]
    assert len(mine) == 1
    o = mine[0]
    assert (o["status"], o["relay_after"], o["meter_id"], o["gateway_id"]) == (
        "CONFIRMED", "OPEN", meter.id, meter.gateway)
    assert [m.key() for m in msgs if codec.decode("RelayOutcome", m.value())["command_id"]
            == command_id] == [meter.gateway.encode()]
