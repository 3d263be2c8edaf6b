"""Collector end to end: simulated meters (Modbus TCP on loopback) -> spool -> real broker."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from collectors.poller import PollerConfig
from collectors.run import Collector
from collectors.sim_portfolio import mall_simulator
from infra import broker
from infra import topics as T
from infra.topics import provision_topics
from pipelines.context import landlord_account
from pipelines.generate import generate
from pipelines.portfolio import Portfolio, parse_portfolio
from pipelines.signing import relay_signer
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


def _wait_for_leaders(bootstrap: str, seconds: float = 60.0) -> None:
    """New topics answer "not leader" for a moment after creation."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    deadline = time.monotonic() + seconds
    try:
        for topic in (T.READINGS, T.COLLECTOR_EVENTS):
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            for part in parts:
                while True:
                    try:
                        c.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
                        break
                    except KafkaException:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.3)
    finally:
        c.close()


@pytest.fixture
def private_broker(tmp_path: Path) -> Any:
    """A broker of our own (tmp data dir, ephemeral ports) that a test may stop and
    restart; the shared dev broker is never touched."""
    config = broker.BrokerConfig(data_dir=tmp_path / "kafka", port=free_port(),
                                 controller_port=free_port(), external=None)
    broker.start(config, timeout=90)
    try:
        provision_topics(config.bootstrap)
        _wait_for_leaders(config.bootstrap)
        yield config
    finally:
        broker.stop(config)


OUTAGE_S = 30.0


@pytest.mark.timeout(240)
def test_broker_outage_loses_nothing_and_duplicates_nothing(private_broker: Any,
                                                           tmp_path: Path) -> None:
    """The broker process is really stopped for 30 s and restarted on the same data dir:
    the collector keeps polling (0.2 s interval, so hundreds of readings pile up on the
    spool), then delivers every batch exactly once, in seq order per shard."""
    bootstrap = private_broker.bootstrap
    p, mall_id = portfolio(4)
    tail = TopicTail(bootstrap, T.READINGS)
    cid = f"test-{uuid.uuid4().hex[:8]}"

    async def body() -> tuple[dict[str, Any], dict[str, Any], float]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        stats: dict[str, Any] = {}
        try:
            col = Collector(p, mall_id, bootstrap=bootstrap, collector_id=cid,
                            spool_dir=tmp_path / "spool", clock=sim.now_ms,
                            poll_interval_s=0.2, poller_config=FAST, commands=False,
                            producer_overrides={"message.timeout.ms": 3000})
            col.drainer.retry_max_s = 2.0
            stop = asyncio.Event()
            task = asyncio.create_task(col.run(stop, stats=stats))
            await asyncio.sleep(3.0)
            assert stats["acked"] > 0 and stats["kafka_ok"]
            before = stats["readings"]
            await asyncio.to_thread(broker.stop, private_broker)  # SIGTERM, wait for exit
            down_at = time.monotonic()
            await asyncio.sleep(OUTAGE_S)
            during = dict(stats)
            await asyncio.to_thread(broker.start, private_broker, 90)
            outage = time.monotonic() - down_at
            during["readings_during"] = during["readings"] - before
            for _ in range(600):
                await asyncio.sleep(0.1)
                if stats["kafka_ok"] and stats["spool_depth"] <= 2:
                    break
            await asyncio.sleep(1.0)
            stop.set()
            return during, await task, outage
        finally:
            await sim.stop()

    during, final, outage = asyncio.run(body())
    assert outage >= OUTAGE_S
    assert not during["kafka_ok"] and during["send_failures"] > 0
    assert during["readings_during"] > 300  # ~14 readings/s kept coming in
    assert during["spool_depth"] > 30  # the backlog waited on disk
    assert final["delivered_all"] and final["spool_depth"] == 0
    got = ours(tail.read(until=lambda ms: len(ms) >= final["batches"], seconds=30), cid)
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
    # every row is one poll: the per-meter reading counts add up to what was polled
    # (not (circuit, ts) uniqueness: the simulator's clock ticks, so two polls within one
    # tick legitimately share a timestamp and identical registers)
    rows = [row for _, rec in got for row in batch_to_frame(rec).iter_rows(named=True)]
    assert len(rows) == final["polls_ok"]


def test_trip_command_opens_the_relay_and_is_confirmed(kafka_bootstrap: str,
                                                       tmp_path: Path) -> None:
    """Commands produced before a new collector id starts are still executed (lookback,
    no start-up race); the trip opens the relay and the energy register stops; an expired
    command is answered FAILED without touching its relay; after a restart, a redelivered
    command id is neither executed nor published again (persistent command log)."""
    p, mall_id = portfolio(6)
    outcomes = TopicTail(kafka_bootstrap, T.RELAY_OUTCOMES)
    cid = f"test-{uuid.uuid4().hex[:8]}"
    mall = p.malls[0]
    relays = [m for m in mall.meters if m.account and m.model == "acrel_ddsy1352"]
    meter, old_meter, forged_meter = relays[0], relays[1], relays[2]
    other_mall_cmd = f"other-{uuid.uuid4()}"
    command_id = f"cmd-{uuid.uuid4()}"
    expired_id = f"old-{uuid.uuid4()}"
    unsigned_id, forged_id = f"unsigned-{uuid.uuid4()}", f"forged-{uuid.uuid4()}"
    ids = (command_id, other_mall_cmd, expired_id, unsigned_id, forged_id)
    signer = relay_signer()  # the worker's key (var/keys), which the collector trusts by default

    def record(cmd_id: str, mall: str, m: Any, issued_at_ms: int) -> dict[str, Any]:
        return {"command_id": cmd_id, "action": "TRIP", "reason": "credit", "mall_id": mall,
                "gateway_id": m.gateway, "meter_id": m.id, "account_id": m.account,
                "issued_at_ms": issued_at_ms, "cause_ts_ms": None, "requested_by": "test"}

    def command(cmd_id: str, mall: str, m: Any, issued_at_ms: int) -> bytes:
        return codec.encode("RelayCommand", signer.sign(record(cmd_id, mall, m, issued_at_ms)))

    def produce(*msgs: tuple[str, bytes]) -> None:
        prod = Producer({"bootstrap.servers": kafka_bootstrap})
        for key, value in msgs:
            prod.produce(T.RELAY_COMMANDS, key=key.encode(), value=value)
        assert prod.flush(10) == 0

    async def wait_for(stats: dict[str, Any], key: str, n: int, seconds: float = 20) -> None:
        for _ in range(int(seconds * 10)):
            await asyncio.sleep(0.1)
            if stats.get(key, 0) >= n:
                return
        raise AssertionError(f"{key} never reached {n}: {stats}")

    async def body() -> dict[str, Any]:
        sim = mall_simulator(p, mall_id, speed=60, start_ms=START_MS)
        await sim.start()
        out: dict[str, Any] = {}
        try:
            now = sim.now_ms()
            # produced BEFORE the collector (a new collector id) exists
            # a forged command: signed for another meter, then pointed at this one
            forged = {**signer.sign(record(forged_id, mall_id, meter, now)), "meter_id": forged_meter.id,
                      "gateway_id": forged_meter.gateway}
            produce((meter.gateway, command(other_mall_cmd, "ELSEWHERE", meter, now)),
                    (meter.gateway, command(command_id, mall_id, meter, now)),
                    (old_meter.gateway, command(expired_id, mall_id, old_meter,
                                                now - 3_600_000)),
                    (forged_meter.gateway, codec.encode("RelayCommand", record(unsigned_id, mall_id, forged_meter,
                                                                                now))),
                    (forged_meter.gateway, codec.encode("RelayCommand", forged)))

            def collector() -> Collector:
                return Collector(p, mall_id, bootstrap=kafka_bootstrap, collector_id=cid,
                                 spool_dir=tmp_path / "spool", clock=sim.now_ms,
                                 poll_interval_s=0.5, poller_config=FAST,
                                 command_max_age_s=600.0)

            stats: dict[str, Any] = {}
            stop = asyncio.Event()
            task = asyncio.create_task(collector().run(stop, stats=stats))
            await wait_for(stats, "commands_executed", 4)
            kwh = sim.meters[meter.id].import_kwh
            await asyncio.sleep(1.0)  # a simulated minute at full load
            out["closed"] = sim.meters[meter.id].relay_closed
            out["kwh_delta"] = sim.meters[meter.id].import_kwh - kwh
            out["old_closed"] = sim.meters[old_meter.id].relay_closed
            out["forged_closed"] = sim.meters[forged_meter.id].relay_closed
            stop.set()
            out["first"] = await task
            # restart; the relay was closed by hand meanwhile; the same command id comes
            # again (a producer retry, a replay): it must not trip the relay again
            sim.meters[meter.id].relay_closed = True
            produce((meter.gateway, command(command_id, mall_id, meter, sim.now_ms())))
            stats2: dict[str, Any] = {}
            stop2 = asyncio.Event()
            task2 = asyncio.create_task(collector().run(stop2, stats=stats2))
            await wait_for(stats2, "commands_repeated", 1)
            out["closed_after_repeat"] = sim.meters[meter.id].relay_closed
            stop2.set()
            out["second"] = await task2
            return out
        finally:
            await sim.stop()

    out = asyncio.run(body())
    assert out["closed"] is False and out["kwh_delta"] == 0.0  # open relay: counter stops
    assert out["old_closed"] is True  # the expired command never touched its relay
    assert out["forged_closed"] is True  # neither the unsigned nor the forged command touched it
    first, second = out["first"], out["second"]
    assert first["commands_executed"] == 4 and first["commands_expired"] == 1 and first["commands_refused"] == 2
    assert first["commands_ignored"] >= 1
    assert second["commands_executed"] == 0 and second["commands_repeated"] == 1
    assert out["closed_after_repeat"] is True
    msgs = outcomes.read(until=lambda ms: {codec.decode("RelayOutcome", m.value())[
        "command_id"] for m in ms} >= {command_id, expired_id, unsigned_id, forged_id}, seconds=15)
    msgs += outcomes.read(seconds=3)  # a second outcome for the same id would show here
    outcomes.close()
    mine = [(m, codec.decode("RelayOutcome", m.value())) for m in msgs]
    mine = [(m, o) for m, o in mine if o["command_id"] in ids]
    by_id = {o["command_id"]: (m, o) for m, o in mine}
    assert len(mine) == 4 and set(by_id) == {command_id, expired_id, unsigned_id, forged_id}
    m, o = by_id[command_id]
    assert (o["status"], o["relay_after"], o["meter_id"], o["gateway_id"]) == (
        "CONFIRMED", "OPEN", meter.id, meter.gateway)
    assert m.key() == meter.gateway.encode()
    _, e = by_id[expired_id]
    assert (e["status"], e["attempts"]) == ("FAILED", 0) and "expired" in e["detail"]
    assert by_id[unsigned_id][1]["status"] == "FAILED" and "refused: unsigned" in by_id[unsigned_id][1]["detail"]
    assert by_id[forged_id][1]["status"] == "FAILED" and "refused: bad_signature" in by_id[forged_id][1]["detail"]
