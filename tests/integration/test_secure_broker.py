"""`stack up --secure` as a private broker: TLS with a local CA, SCRAM users per component, ACLs.

A client without credentials or with a wrong password is refused; each principal can do only
what docs/security.md's ACL table gives it; the billing worker runs on it with its own
credentials and bills a top-up; no password reaches the worker's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from ports import free_ports

from infra import broker
from infra import topics as T
from infra.kafka_security import KafkaSettings, apply_acls, credentials_file
from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portfolio import dump_portfolio
from schemas import codec
from schemas.ledger import batch_entries

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerConfig]:
    port, ctrl = free_ports(2)
    config = broker.BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka-secure"), port=port,
                                 controller_port=ctrl, secure=True)
    broker.start(config)
    try:
        with pytest.MonkeyPatch.context() as mp:  # this fixture acts as the admin, as `stack up` does
            mp.setenv("MALLWATT_KAFKA_CREDENTIALS", str(credentials_file(config.data_dir, "admin")))
            apply_acls(config.admin_settings())
            T.provision_topics(config.bootstrap)
            T.wait_until_served(config.bootstrap)
        yield config
    finally:
        broker.stop(config)


def _as(config: broker.BrokerConfig, principal: str) -> dict[str, Any]:
    env = {"MALLWATT_KAFKA_CREDENTIALS": str(credentials_file(config.data_dir, principal))}
    return KafkaSettings.from_env(config.bootstrap, env=env).client_config()


def _produce(conf: dict[str, Any], topic: str) -> str:
    """The delivery result of one message: "OK" or the broker's error name."""
    results: list[Any] = []
    producer = Producer({**conf, "message.timeout.ms": 6000, "socket.timeout.ms": 3000, "log_level": 0})
    producer.produce(topic, b"probe", on_delivery=lambda err, _msg: results.append(err))
    producer.flush(15)
    return "OK" if results and results[0] is None else (results[0].name() if results else "NO_RESULT")


def test_clients_without_valid_credentials_are_refused(secure: broker.BrokerConfig) -> None:
    assert _produce({"bootstrap.servers": secure.bootstrap}, T.READINGS) != "OK"  # plaintext to TLS
    wrong = {**_as(secure, "collector"), "sasl.password": "not-the-password"}
    assert _produce(wrong, T.READINGS) != "OK"
    no_ca = {k: v for k, v in _as(secure, "collector").items() if k != "ssl.ca.location"}
    assert _produce(no_ca, T.READINGS) != "OK"  # the broker's certificate is not trusted without the CA


def test_each_principal_gets_only_its_acls(secure: broker.BrokerConfig) -> None:
    denied = "TOPIC_AUTHORIZATION_FAILED"
    assert _produce(_as(secure, "collector"), T.READINGS) == "OK"
    assert _produce(_as(secure, "collector"), T.RELAY_OUTCOMES) == "OK"
    assert _produce(_as(secure, "collector"), T.PAYMENTS) == denied
    assert _produce(_as(secure, "collector"), T.RELAY_COMMANDS) == denied
    assert _produce(_as(secure, "gateway"), T.PAYMENTS) == "OK"
    assert _produce(_as(secure, "gateway"), T.READINGS) == denied
    assert _produce(_as(secure, "operator"), T.OPERATOR_COMMANDS) == "OK"
    assert _produce(_as(secure, "finance"), T.PAYMENTS) == "OK"  # manual top-ups (operator-signed)
    assert _produce(_as(secure, "finance"), T.RELAY_COMMANDS) == denied
    assert _produce(_as(secure, "finance"), T.OPERATOR_COMMANDS) == denied
    assert _produce(_as(secure, "operator"), T.RELAY_COMMANDS) == denied
    assert _produce(_as(secure, "analyst"), T.READINGS) == denied
    consumer = Consumer({**_as(secure, "analyst"), "group.id": "analyst-try", "log_level": 0})
    consumer.subscribe([T.READINGS])
    errors: list[int] = []
    deadline = time.monotonic() + 20
    while not errors and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error():
            errors.append(msg.error().code())
    consumer.close()
    assert errors and errors[0] in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED)


def test_worker_bills_a_topup_with_its_own_credentials(secure: broker.BrokerConfig, tmp_path: Path) -> None:
    prefix = f"S{uuid.uuid4().hex[:5]}"
    data = generate(1, 2, seed=3, mall_prefix=prefix)
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    account = data["malls"][0]["merchants"][0]["id"]
    worker_creds = credentials_file(secure.data_dir, "worker")
    env = {**os.environ, "MALLWATT_KAFKA": secure.bootstrap, "MALLWATT_KAFKA_CREDENTIALS": str(worker_creds)}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "worker", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ledger = Consumer({**_as(secure, "sink"), "group.id": f"mallwatt-sink-{prefix}",
                           "auto.offset.reset": "earliest", "log_level": 0})
        ledger.subscribe([T.LEDGER])
        gateway = Producer(_as(secure, "gateway"))
        # the gateway's path: a provider's payment (checked by its HMAC at the portal), not operator-signed
        produce_payment(gateway, {"payment_id": f"{prefix}-p1", "account_id": account, "kind": "TOPUP",
                                  "amount_minor": 1234, "ts_ms": 1_784_080_800_000, "provider": "sim"})
        assert gateway.flush(15) == 0
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while not found and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            msg = ledger.poll(0.5)
            if msg is None or msg.error():
                continue
            found += [e for e in batch_entries(codec.decode("LedgerBatch", msg.value()))
                      if e["account_id"] == account and e["kind"] == "topup"]
        ledger.close()
        assert found and found[0]["amount_minor"] == 1234, log_path.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    password = json.loads(worker_creds.read_text())["password"]
    assert password not in log_path.read_text(errors="replace")
