"""The local Kafka cluster's layout and the replication policy (infra/broker.py, infra/topics.py),
and that every producer of mallwatt writes with acks=all and idempotence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra import broker, stack
from infra.topics import cluster_replication

ROOT = Path(__file__).resolve().parents[3]


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLWATT_KAFKA", "MALLWATT_KAFKA_BROKERS", "MALLWATT_KAFKA_PORT", "MALLWATT_KAFKA_CONTROLLER_PORT",
                 "MALLWATT_KAFKA_DATA_DIR", "MALLWATT_REPLICATION_FACTOR", "MALLWATT_MIN_INSYNC_REPLICAS"):
        monkeypatch.delenv(name, raising=False)


def test_replication_policy_by_cluster_size(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster_replication(1) == (1, 1)
    assert cluster_replication(2) == (2, 1)
    assert cluster_replication(3) == (3, 2)
    assert cluster_replication(6) == (3, 2)
    monkeypatch.setenv("MALLWATT_REPLICATION_FACTOR", "4")
    with pytest.raises(ValueError, match="MALLWATT_REPLICATION_FACTOR=4"):
        cluster_replication(3)
    monkeypatch.setenv("MALLWATT_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("MALLWATT_MIN_INSYNC_REPLICAS", "3")
    assert cluster_replication(5) == (3, 3)


def test_cluster_nodes_have_their_own_dirs_and_ports(tmp_path: Path) -> None:
    config = broker.BrokerConfig(data_dir=tmp_path, port=30000, brokers=3)
    nodes = config.nodes()
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [(1, 30000, 30001), (2, 30002, 30003),
                                                                      (3, 30004, 30005)]
    assert [n.data_dir for n in nodes] == [tmp_path / f"node-{i}" for i in (1, 2, 3)]
    assert config.bootstrap == "127.0.0.1:30000,127.0.0.1:30002,127.0.0.1:30004"
    p2 = props(broker.server_properties(config, nodes[1]))
    assert p2["node.id"] == "2"
    assert p2["controller.quorum.voters"] == "1@127.0.0.1:30001,2@127.0.0.1:30003,3@127.0.0.1:30005"
    assert p2["listeners"] == "PLAINTEXT://127.0.0.1:30002,CONTROLLER://127.0.0.1:30003"
    assert p2["log.dirs"] == str(tmp_path / "node-2" / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "default.replication.factor"):
        assert p2[key] == "3", key
    assert p2["min.insync.replicas"] == p2["transaction.state.log.min.isr"] == "2"
    assert p2["unclean.leader.election.enable"] == "false"


def test_single_node_keeps_its_layout(tmp_path: Path) -> None:
    config = broker.BrokerConfig(data_dir=tmp_path, port=30000)
    assert config.nodes()[0].data_dir == tmp_path and config.properties_file == tmp_path / "server.properties"
    p = props(broker.server_properties(config))
    assert p["controller.quorum.voters"] == "1@127.0.0.1:30001"
    assert p["default.replication.factor"] == p["min.insync.replicas"] == "1"
    assert config.bootstrap == "127.0.0.1:30000"


def test_bad_clusters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(broker.BrokerError, match="ports overlap"):
        broker.BrokerConfig(data_dir=tmp_path, port=30000, controller_port=30002, brokers=3)
    with pytest.raises(broker.BrokerError, match="one node only"):
        broker.BrokerConfig(data_dir=tmp_path, port=30000, brokers=3, secure=True)
    with pytest.raises(broker.BrokerError, match="1..9"):
        broker.BrokerConfig(data_dir=tmp_path, brokers=0)


def test_down_and_status_find_the_nodes_of_the_last_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLWATT_KAFKA_DATA_DIR", str(tmp_path))
    assert broker.BrokerConfig.from_env().brokers == 1
    (tmp_path / broker.BROKERS_FILE).write_text("3\n")
    assert broker.BrokerConfig.from_env().brokers == 3
    assert broker.BrokerConfig.from_env(brokers=1).brokers == 1
    monkeypatch.setenv("MALLWATT_KAFKA_BROKERS", "2")
    assert broker.BrokerConfig.from_env().brokers == 2


def test_status_lists_a_missing_node_as_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MALLWATT_CHDB_PATH", str(tmp_path / "chdb"))
    monkeypatch.delenv("MALLWATT_CLICKHOUSE", raising=False)
    nodes = [{"node": 1, "bootstrap": "127.0.0.1:1", "pid": 11, "running": True},
             {"node": 2, "bootstrap": "127.0.0.1:3", "pid": None, "running": False}]
    monkeypatch.setattr(broker, "status", lambda config=None: broker.BrokerStatus(
        False, 11, "127.0.0.1:1,127.0.0.1:3", 14, False, None, nodes))
    result = stack.status()
    assert result["down"] == ["kafka node 2"] and result["kafka_node_1"] == "pid 11"


PRODUCER_CALL = re.compile(r"\bProducer\(")


def _call_text(source: str, start: int) -> str:
    depth = 0
    for i in range(start, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0 and source[i] == ")":
            return source[start:i + 1]
    return source[start:]


def test_every_producer_is_idempotent_with_acks_all() -> None:
    """librdkafka's enable.idempotence implies acks=all (and refuses anything else); faust's own
    producer is made idempotent in pipelines/faust_tuning.py."""
    calls = 0
    for folder in ("pipelines", "infra", "collectors"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text()
            for match in PRODUCER_CALL.finditer(source):
                if source[max(0, match.start() - 3):match.start()] in ("AIO",) or "import" in \
                        source[source.rfind("\n", 0, match.start()):match.start()]:
                    continue
                call = _call_text(source, match.end() - 1)
                calls += 1
                assert "enable.idempotence" in call or "PRODUCER_DEFAULTS" in call, f"{path}: {call[:200]}"
                assert not re.search(r"\"acks\":\s*(\"?[01]\"?)", call), f"{path}: acks below all: {call[:200]}"
    assert calls >= 10
    from collectors.publish import PRODUCER_DEFAULTS
    from pipelines.faust_tuning import _idempotent_extra

    assert PRODUCER_DEFAULTS["enable.idempotence"] is True and PRODUCER_DEFAULTS["acks"] == "all"

    class FakeProducer:
        app = type("App", (), {"in_transaction": False})()

    assert _idempotent_extra(FakeProducer()) == {"acks": "all", "enable_idempotence": True}


class _Future:
    def __init__(self, value: object) -> None:
        self.value = value

    def result(self) -> object:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class _Admin:
    """list_topics and describe_configs of a cluster with `live` brokers answering."""

    def __init__(self, live: int, configs: object) -> None:
        self.live, self.configs = live, configs

    def list_topics(self, timeout: float) -> object:
        return type("Md", (), {"brokers": {i: object() for i in range(1, self.live + 1)}, "topics": {}})()

    def describe_configs(self, resources: list[object], request_timeout: float) -> dict[object, _Future]:
        return {resources[0]: _Future(self.configs)}


def test_replication_counts_a_broker_that_is_down() -> None:
    from confluent_kafka import KafkaException

    from infra.topics import replication_of

    entry = type("Entry", (), {"value": "3"})()
    assert replication_of("x:1", admin=_Admin(2, {"default.replication.factor": entry})) == (3, 2)
    assert replication_of("x:1", admin=_Admin(3, {})) == (3, 2)
    # a principal that may not read the broker's settings: the brokers that answer
    assert replication_of("x:1", admin=_Admin(1, KafkaException("denied"))) == (1, 1)
