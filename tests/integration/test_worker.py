"""The billing worker on the real broker: trip, reconnect on top-up, dead letters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Producer
from kafka_tail import TopicTail
from operators import power_commands, register, signed

from infra import topics as T
from pipelines.generate import generate
from pipelines.money_input import produce_payment, produce_posting
from pipelines.portfolio import dump_portfolio, parse_portfolio
from schemas import codec, readings
from schemas.keys import account_shard, shard_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00: peak hour, 136 fen/kWh


def topup(producer: Producer, account: str, shard: int, payment_id: str, amount: int, ts: int) -> None:
    # `shard` is the account's; the payment goes to its claim's partition (money_input)
    produce_payment(producer, signed({"payment_id": payment_id, "account_id": account, "kind": "TOPUP",
                                      "amount_minor": amount, "ts_ms": ts}))
    producer.flush(10)


@pytest.fixture
def worker(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[dict, Path]]:
    prefix = f"W{uuid.uuid4().hex[:6]}"
    data = generate(1, 4, seed=2, mall_prefix=prefix)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant["opening_balance_minor"] = 0  # the stream posts openings: balances here come from top-ups
    register(data)  # the operators whose signed power orders and money the worker accepts
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


def test_trip_then_topup_reconnects_and_bad_input_goes_to_dead_letter(
        kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:
    data, _ = worker
    mall = parse_portfolio(data).malls[0]
    merchant = mall.merchants[0]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    circuit = meter.circuits[0].id
    shard = account_shard(merchant.id, T.default_partitions())
    commands = TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    dead = TopicTail(kafka_bootstrap, T.DEADLETTER, "DeadLetter")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def pay(payment_id: str, amount: int, ts: int) -> None:
        topup(producer, merchant.id, shard, payment_id, amount, ts)

    pay(f"{merchant.id}-open", 300, T0 - 1000)
    ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["kind"] == "topup", timeout=90)

    # 1 kWh per 15 min at 136 fen: 300 -> 164 -> 28 -> -108, the third interval trips.
    n = 4
    frame = pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter.id] * n,
                          "account_id": [merchant.id] * n, "ts_ms": [T0 + i * 900_000 for i in range(n)],
                          "import_kwh": [100.0 + i for i in range(n)]})
    batch = readings.frame_to_batch(frame, batch_id=f"{merchant.id}/1", collector_id="test", mall_id=mall.id,
                                    shard=shard, seq=1, collected_at_ms=T0)
    producer.produce(T.READINGS, key=shard_key(shard), partition=shard, value=codec.encode("ReadingBatch", batch))
    producer.produce(T.READINGS, key=shard_key(shard), partition=shard, value=b"\x01not avro at all")
    producer.flush(10)

    trip = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "TRIP")
    assert trip["reason"] == "credit" and trip["gateway_id"] == meter.gateway
    last = ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["ts_ms"] == T0 + 3 * 900_000)
    assert last["balance_after_minor"] == 300 - 3 * 136

    letter = dead.wait_for(lambda d: d["source_topic"] == T.READINGS and d["value"] == b"\x01not avro at all")
    assert letter["stage"] == "decode" and "ReadingBatch" in letter["reason"]

    # the worker kept going after the bad message: a top-up reconnects the meter
    pay(f"{merchant.id}-rescue", 5000, T0 + 4 * 900_000)
    reconnect = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "RECONNECT")
    assert reconnect["reason"] == "topup"
    # a duplicate delivery of the same payment id never credits twice
    pay(f"{merchant.id}-rescue", 5000, T0 + 4 * 900_000)
    pay(f"{merchant.id}-marker", 1, T0 + 5 * 900_000)
    marker = ledger.wait_for(lambda e: e["source_id"] == f"{merchant.id}-marker")
    assert marker["balance_after_minor"] == 300 - 3 * 136 + 5000 + 1


def test_operator_trip_survives_a_topup(kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:
    data, _ = worker
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0]
    merchant = mall.merchants[1]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    shard = account_shard(merchant.id, T.default_partitions())
    commands = TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    alerts = TopicTail(kafka_bootstrap, T.ALERTS, "Alert")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def operator(action: str, order: str) -> None:
        for cmd in power_commands(portfolio, action, "ACCOUNT", merchant.id, "inspection", T0, order):
            producer.produce(T.OPERATOR_COMMANDS, key=cmd["account_id"].encode(), partition=shard,
                             value=codec.encode("OperatorCommand", cmd))
        producer.flush(10)

    operator("POWER_OFF", f"{merchant.id}-off")
    trip = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "TRIP", timeout=90)
    assert trip["reason"] == "operator" and trip["requested_by"] == "operator:tester"
    audit = alerts.wait_for(lambda a: a["meter_id"] == meter.id and a["kind"] == "operator_power")
    assert audit["details"]["holds"] == "operator"

    topup(producer, merchant.id, shard, f"{merchant.id}-pay", 9000, T0 + 1)
    ledger.wait_for(lambda e: e["source_id"] == f"{merchant.id}-pay")
    operator("POWER_ON", f"{merchant.id}-on")
    back = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "RECONNECT")
    assert back["reason"] == "operator"
    # the top-up in between never produced a reconnect of its own
    assert [c["action"] for c in commands.seen if c["meter_id"] == meter.id] == ["TRIP", "RECONNECT"]
    # a shared-cost posting reaches the wallet through its own topic, once
    posting = {"entry_id": f"{merchant.id}:shr:P1:2026-07", "account_id": merchant.id, "mall_id": mall.id,
               "kind": "shared_cost", "amount_minor": -123, "ts_ms": T0 + 2, "source_id": "P1|area|2026-07|999",
               "rate": "0.123123"}
    for _ in range(2):
        produce_posting(producer, signed(posting))
    producer.flush(10)
    entry = ledger.wait_for(lambda e: e["entry_id"] == posting["entry_id"])
    assert entry["kind"] == "shared_cost" and entry["balance_after_minor"] == 9000 - 123


def test_power_orders_are_authorised_by_the_worker(kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:
    """A forged order goes to the dead letters with its reason; a mall-wide power off without a
    second operator's approval switches nothing; with it, every merchant meter trips and the
    life-safety circuits (here the elevators) are never switched, even by a hand-made command."""
    data, _ = worker
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0]
    commands = TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")
    dead = TopicTail(kafka_bootstrap, T.DEADLETTER, "DeadLetter")
    alerts = TopicTail(kafka_bootstrap, T.ALERTS, "Alert")
    audit = TopicTail(kafka_bootstrap, T.AUDIT, "AuditEvent")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def send(cmds: list[dict]) -> None:
        for cmd in cmds:
            producer.produce(T.OPERATOR_COMMANDS, key=cmd["account_id"].encode(),
                             partition=account_shard(cmd["account_id"], T.default_partitions()),
                             value=codec.encode("OperatorCommand", cmd))
        assert producer.flush(10) == 0

    merchant = mall.merchants[3]
    forged = power_commands(portfolio, "POWER_OFF", "ACCOUNT", merchant.id, "inspection", T0, "forged-1")
    for cmd in forged:
        cmd["reason"] = "changed after signing"
    send(forged)
    letter = dead.wait_for(lambda d: "bad_signature" in d["reason"], timeout=90)
    assert "unauthorized (bad_signature)" in letter["reason"], letter

    unapproved = power_commands(portfolio, "POWER_OFF", "MALL", mall.id, "fire drill", T0, "mall-1")
    send(unapproved)
    refused = dead.wait_for(lambda d: "needs_approval" in d["reason"], timeout=60)
    assert "unauthorized (needs_approval)" in refused["reason"]
    with pytest.raises(AssertionError):  # nothing was switched by the forged or the unapproved order
        commands.wait_for(lambda c: c["reason"] == "operator", timeout=5)
    approved = power_commands(portfolio, "POWER_OFF", "MALL", mall.id, "fire drill", T0, "mall-2", approved=True)
    elevator = next(m for m in mall.meters if m.circuits[0].purpose.value == "elevator")
    assert elevator.id not in {c["meter_id"] for c in approved}  # the CLI leaves life-safety out
    hand_made = {**approved[0], "command_id": f"mall-2:{elevator.id}", "meter_id": elevator.id,
                 "account_id": f"{mall.id}-LANDLORD"}
    send(approved + [hand_made])
    merchant_meters = {m.id for m in mall.meters if m.account}
    for meter in merchant_meters:
        trip = commands.wait_for(lambda c, m=meter: c["meter_id"] == m and c["action"] == "TRIP"
                                 and c["reason"] == "operator", timeout=90)
        assert trip["requested_by"] == "operator:tester+approver"
    safety = dead.wait_for(lambda d: "life_safety" in d["reason"], timeout=60)
    assert elevator.id in safety["reason"]
    alert = alerts.wait_for(lambda a: a["kind"] == "operator_power" and a["details"].get("order_id") == "mall-2")
    assert alert["details"]["principals"] == "tester+approver"
    # the audit trail: executed orders under the verified principals, refusals with their reason;
    # the forged order is booked as unverified, never under the name it claims
    executed = audit.wait_for(lambda e: e["action"] == "power.order" and "mall-2" in e["detail"])
    assert executed["principal"] == "tester+approver" and executed["result"] == "accepted"
    forged_audit = audit.wait_for(lambda e: e["action"] == "power.refused" and e["result"] == "bad_signature")
    assert forged_audit["principal"] == "unverified:tester"
    unapproved_audit = audit.wait_for(lambda e: e["action"] == "power.refused" and e["result"] == "needs_approval")
    assert unapproved_audit["principal"] == "tester" and "mall-1" in unapproved_audit["detail"]
    assert not [c for c in commands.seen if c["meter_id"] == elevator.id]


def test_config_change_applies_live(kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:
    data, config = worker
    mall = parse_portfolio(data).malls[0]
    merchant = mall.merchants[2]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    shard = account_shard(merchant.id, T.default_partitions())
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def readings_at(seq: int, steps: list[int]) -> None:
        frame = pl.DataFrame({"circuit_id": [meter.circuits[0].id] * len(steps), "meter_id": [meter.id] * len(steps),
                              "account_id": [merchant.id] * len(steps),
                              "ts_ms": [T0 + i * 900_000 for i in steps], "import_kwh": [200.0 + i for i in steps]})
        batch = readings.frame_to_batch(frame, batch_id=f"{merchant.id}/{seq}", collector_id="test",
                                        mall_id=mall.id, shard=shard, seq=seq, collected_at_ms=T0)
        producer.produce(T.READINGS, key=shard_key(shard), partition=shard,
                         value=codec.encode("ReadingBatch", batch))
        producer.flush(10)

    readings_at(1, [0, 1])  # 1 kWh at the peak price: 136 fen
    first = ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["kind"] == "charge", timeout=90)
    assert first["amount_minor"] == -136
    # the merchant negotiates a surcharge: the running worker picks the edited file up
    data["malls"][0]["merchants"][2]["price_multiplier"] = 2.0
    time.sleep(1.1)  # a distinct mtime even on coarse file systems
    dump_portfolio(data, config)
    time.sleep(7)  # the reload timer runs every 5 s
    readings_at(2, [2])
    second = ledger.wait_for(lambda e: e["account_id"] == merchant.id and e["ts_ms"] == T0 + 2 * 900_000)
    assert second["amount_minor"] == -272


def test_overload_trips_after_the_debounce_and_a_spike_does_not(kafka_bootstrap: str,
                                                                worker: tuple[dict, Path]) -> None:
    from pipelines.context import build_context

    data, _ = worker
    portfolio = parse_portfolio(data)
    mall = portfolio.malls[0]
    merchant = mall.merchants[3]
    meter = next(m for m in mall.meters if m.account == merchant.id)
    shard = account_shard(merchant.id, T.default_partitions())
    limit = build_context(portfolio, T.default_partitions()).load_limits[merchant.id].max_power_w
    commands = TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")
    alerts = TopicTail(kafka_bootstrap, T.ALERTS, "Alert")
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    topup(producer, merchant.id, shard, f"{merchant.id}-big", 10**6, T0 - 1)  # the finance role's most
    ledger.wait_for(lambda e: e["source_id"] == f"{merchant.id}-big", timeout=90)

    def power(seq: int, start: int, watts: list[float]) -> None:
        n = len(watts)
        frame = pl.DataFrame({"circuit_id": [meter.circuits[0].id] * n, "meter_id": [meter.id] * n,
                              "account_id": [merchant.id] * n, "ts_ms": [T0 + (start + i) * 10_000 for i in range(n)],
                              "import_kwh": [50.0 + (start + i) * 0.01 for i in range(n)], "power_w": watts,
                              "power_factor": [0.9] * n, "relay": [0] * n}, schema_overrides={"relay": pl.UInt8})
        batch = readings.frame_to_batch(frame, batch_id=f"{merchant.id}/p{seq}", collector_id="test",
                                        mall_id=mall.id, shard=shard, seq=seq, collected_at_ms=T0)
        producer.produce(T.READINGS, key=shard_key(shard), partition=shard, value=codec.encode("ReadingBatch", batch))
        producer.flush(10)

    # readings 10 s apart: a kettle-like spike for 10 s is shorter than the 30 s debounce
    power(1, 0, [1000.0, limit + 5000.0, 1000.0])
    # then 60 s above the limit (from T0 + 30 s): one overload trip and its alarm
    power(2, 3, [limit + 5000.0] * 7)
    trip = commands.wait_for(lambda c: c["meter_id"] == meter.id and c["action"] == "TRIP")
    assert trip["reason"] == "overload" and trip["requested_by"] == "loadcontrol"
    # readings of a partition are billed in order, so the spike was billed before this trip:
    # it caused none, and the trip came a full debounce into the sustained overload
    assert [c["action"] for c in commands.seen if c["meter_id"] == meter.id] == ["TRIP"]
    assert trip["cause_ts_ms"] >= T0 + 60_000
    alarm = alerts.wait_for(lambda a: a["account_id"] == merchant.id and a["kind"] == "overload")
    assert alarm["severity"] == "CRITICAL"  # the alarm of an overload that tripped


def test_money_commands_are_authorised_by_the_claim_step(kafka_bootstrap: str, worker: tuple[dict, Path]) -> None:
    """An unsigned posting, a posting above the finance role's limit and an unsigned manual
    top-up go to the dead letters with their reason and an audit event, and move no money; a
    signed posting sent twice credits once, audited under its verified signer."""
    data, _ = worker
    mall = parse_portfolio(data).malls[0]
    account = mall.merchants[2].id
    ledger = TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch")
    dead = TopicTail(kafka_bootstrap, T.DEADLETTER, "DeadLetter")
    audit = TopicTail(kafka_bootstrap, T.AUDIT, "AuditEvent")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})

    def posting(entry: str, amount: int) -> dict:
        return {"entry_id": f"{account}:{entry}", "account_id": account, "mall_id": mall.id, "kind": "adjustment",
                "amount_minor": amount, "ts_ms": T0 + 10, "source_id": "ticket-16", "rate": None}

    produce_posting(producer, posting("unsigned", 5_000))
    produce_posting(producer, signed(posting("too-big", 150_000)))  # finance: max_adjustment_minor 100,000
    produce_payment(producer, {"payment_id": f"{account}-manual", "account_id": account, "kind": "TOPUP",
                               "amount_minor": 7_000, "ts_ms": T0 + 10, "provider": "cli"})
    assert producer.flush(10) == 0
    unsigned = dead.wait_for(lambda d: f"{account}:unsigned" in d["reason"], timeout=90)
    assert unsigned["reason"].startswith("unauthorized (unsigned)") and unsigned["source_topic"] == T.POSTINGS
    too_big = dead.wait_for(lambda d: f"{account}:too-big" in d["reason"])
    assert too_big["reason"].startswith("unauthorized (above_role_limit)") and "max_adjustment_minor" in too_big["reason"]
    manual = dead.wait_for(lambda d: f"{account}-manual" in d["reason"])
    assert manual["reason"].startswith("unauthorized (unsigned)") and manual["source_topic"] == T.PAYMENTS
    refused = audit.wait_for(lambda e: e["event_id"] == f"{account}:too-big:money:refused")
    assert (refused["principal"], refused["action"], refused["result"]) == ("finance-tester", "money.post.refused",
                                                                             "above_role_limit")
    assert audit.wait_for(lambda e: e["event_id"] == f"{account}:unsigned:money:refused")["principal"] == "anonymous"

    good = signed(posting("good", 2_500))
    for _ in range(2):
        produce_posting(producer, good)
    assert producer.flush(10) == 0
    entry = ledger.wait_for(lambda e: e["entry_id"] == good["entry_id"], timeout=90)
    assert entry["balance_after_minor"] == 2_500  # opening 0: nothing else moved this account
    accepted = audit.wait_for(lambda e: e["event_id"] == f"{good['entry_id']}:money:accepted")
    assert (accepted["principal"], accepted["action"]) == ("finance-tester", "money.post")
    # a marker after the re-send: the balance shows the signed posting once, the refused ones never
    marker = signed(posting("marker", 1))
    produce_posting(producer, marker)
    assert producer.flush(10) == 0
    assert ledger.wait_for(lambda e: e["entry_id"] == marker["entry_id"])["balance_after_minor"] == 2_501
    assert not [e for e in ledger.seen if e["account_id"] == account and e["entry_id"] != good["entry_id"]
                and e["entry_id"] != marker["entry_id"] and e["kind"] in ("adjustment", "topup")]
