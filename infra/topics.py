"""Every mallwatt Kafka topic, declared once, and the settings every topic gets.

Partitions, retention and compaction per topic (TOPICS, changelog_specs); replication
factor and min.insync.replicas per cluster size (cluster_replication), for these topics,
the worker's changelogs, faust's own topics (pipelines/worker.py) and Kafka's internal
ones (infra/broker.py).

    python -m infra.topics            # provision on bootstrap_servers()
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DAY_MS = 24 * 60 * 60 * 1000
INFINITE = -1


def default_partitions() -> int:
    """MALLWATT_PARTITIONS or 8. Must match the `partitions` given to account_shard()."""
    return int(os.environ.get("MALLWATT_PARTITIONS") or 8)


def cluster_replication(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of every topic on a cluster of `brokers`.

    Three replicas from three brokers up, and writes (acks=all) need two in sync: one broker
    can fail, or be restarted, without stopping writes or losing an acknowledged record. On
    fewer brokers every broker holds every partition, and one less than that must be in sync
    (a single broker: 1 and 1). MALLWATT_REPLICATION_FACTOR / MALLWATT_MIN_INSYNC_REPLICAS
    override (an external cluster with its own policy)."""
    if brokers < 1:
        raise ValueError(f"cluster_replication: a cluster has at least one broker, got {brokers}")
    rf = int(os.environ.get("MALLWATT_REPLICATION_FACTOR") or min(3, brokers))
    min_isr = int(os.environ.get("MALLWATT_MIN_INSYNC_REPLICAS") or max(1, rf - 1))
    if not 1 <= rf <= brokers:
        raise ValueError(f"MALLWATT_REPLICATION_FACTOR={rf}: must be 1..{brokers} (brokers in the cluster)")
    if not 1 <= min_isr <= rf:
        raise ValueError(f"MALLWATT_MIN_INSYNC_REPLICAS={min_isr}: must be 1..{rf} (the replication factor)")
    return rf, min_isr


def replication_of(bootstrap: str, timeout: float = 30.0, admin: Any = None) -> tuple[int, int]:
    """cluster_replication() for the cluster at `bootstrap`. Its size is the brokers that answer,
    or the cluster's default.replication.factor if larger: with a broker down, a topic created
    meanwhile (a worker restarting) must still get the cluster's replication, not one less."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    from infra.kafka_security import kafka_config

    admin = admin or AdminClient(kafka_config(bootstrap))
    brokers = admin.list_topics(timeout=timeout).brokers
    default_rf = 1
    if brokers:
        resource = ConfigResource(ConfigResource.Type.BROKER, str(min(brokers)))
        try:
            configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result()
        except KafkaException as exc:  # a principal without DescribeConfigs on the cluster (the worker's)
            log.info("broker settings not readable (%s); counting the brokers that answer", exc)
            configs = {}
        entry = configs.get("default.replication.factor")
        default_rf = int(entry.value) if entry is not None and entry.value else 1
    return cluster_replication(max(len(brokers), default_rf))


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str  # what the message key is, and why it is that
    value: str  # Avro schema name in schemas/ (see schemas.codec)
    retention_ms: int = 7 * DAY_MS  # -1 keeps data forever
    cleanup_policy: str = "delete"
    partitions: int = field(default_factory=default_partitions)
    extra_configs: tuple[tuple[str, str], ...] = ()  # e.g. the changelogs' compaction settings

    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy,
                **dict(self.extra_configs)}


def claims_changelog_configs(horizon_days: int) -> dict[str, str]:
    """The claims table's changelog: compacted, and deleted after the claim horizon, so the
    store of payment and posting ids stays bounded (pipelines.core.claims)."""
    window_ms = int(float(os.environ.get("MALLWATT_FORWARD_WINDOW_S", 600)) * 1000)
    return {"cleanup.policy": "compact,delete", "retention.ms": str(horizon_days * DAY_MS),
            "min.compaction.lag.ms": str(window_ms), "segment.ms": str(max(window_ms // 4, 60_000))}


def changelog_specs(app_id: str, horizon_days: int, partitions: int | None = None) -> list[TopicSpec]:
    """The worker's table changelogs, created before faust starts: faust checks a table's
    changelog partitions on the first write, and a changelog it had just created was sometimes
    not yet in its metadata (PartitionsMismatch crashed the agent)."""
    count = partitions or default_partitions()
    state, claims = state_changelog_configs(), claims_changelog_configs(horizon_days)
    return [
        TopicSpec(f"{app_id}-accounts-changelog", key="account id", value="state value (pipelines/envelope.py)",
                  retention_ms=INFINITE, cleanup_policy=state.pop("cleanup.policy"), partitions=count,
                  extra_configs=tuple(state.items())),
        TopicSpec(f"{app_id}-claims-changelog", key="claim key", value="claim (pipelines/claiming.py)",
                  retention_ms=int(claims.pop("retention.ms")), cleanup_policy=claims.pop("cleanup.policy"),
                  partitions=count, extra_configs=tuple(claims.items())),
    ]


def state_changelog_configs() -> dict[str, str]:
    """Settings of the worker's state changelog (faust creates the topic with these).

    Compacted, one live record per account, so a worker restored from it reads about one
    record per account plus the recent tail, whatever the history. Records younger than the
    forwarding window are never compacted: the forwarder publishes every record's outbox
    (ledger, alerts, relay commands) within that window, so an output is never compacted away
    before it was published (the forwarder normally trails by milliseconds; its lag is a
    metric). Small segments let the cleaner reach records soon after the window.
    """
    window_ms = int(float(os.environ.get("MALLWATT_FORWARD_WINDOW_S", 600)) * 1000)
    return {"cleanup.policy": "compact", "min.compaction.lag.ms": str(window_ms),
            "segment.ms": str(max(window_ms // 4, 60_000)), "min.cleanable.dirty.ratio": "0.2",
            "max.message.bytes": str(1024 * 1024)}


READINGS = "mallwatt.readings"
PAYMENTS = "mallwatt.payments"
LEDGER = "mallwatt.ledger"
INTERVALS = "mallwatt.intervals"
ALERTS = "mallwatt.alerts"
RELAY_COMMANDS = "mallwatt.relay-commands"
RELAY_OUTCOMES = "mallwatt.relay-outcomes"
COLLECTOR_EVENTS = "mallwatt.collector-events"
OPERATOR_COMMANDS = "mallwatt.operator-commands"
DEADLETTER = "mallwatt.deadletter"
POSTINGS = "mallwatt.postings"
PAYMENTS_ACCEPTED = "mallwatt.payments-accepted"
POSTINGS_ACCEPTED = "mallwatt.postings-accepted"
ALERT_PREFERENCES = "mallwatt.alert-preferences"
AUDIT = "mallwatt.audit"

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        READINGS,
        key="account shard id (schemas.keys.shard_key(account_shard(account, N))): all "
        "readings of an account land in one partition, the one that owns its money",
        value="reading_batch",
    ),
    TopicSpec(
        PAYMENTS,
        key="claim key (pipelines.core.claims.claim_key: the payment id, a reversal's "
        "reversed id), produced to partition claim_partition(): every use of an id meets "
        "its first use in one partition, so an id credits once across the portfolio",
        value="payment",
        retention_ms=INFINITE,  # money input: replay and reconciliation need every payment
    ),
    TopicSpec(
        LEDGER,
        key="account id: the balance is the ordered sum of an account's entries",
        value="ledger_entry",
        retention_ms=INFINITE,
    ),
    TopicSpec(
        INTERVALS,
        key="p<state changelog partition> (the account shard): every interval fact of a "
        "circuit is in one partition, in order; the warehouse deduplicates on (circuit, end)",
        value="interval_batch",
        retention_ms=INFINITE,  # billed energy facts: the warehouse can be rebuilt from them
    ),
    TopicSpec(
        AUDIT,
        key="principal: one principal's actions stay in order",
        value="audit_event",
        retention_ms=INFINITE,  # the audit trail is kept; the warehouse holds it for queries
    ),
    TopicSpec(
        ALERTS,
        key="account id: alert hysteresis per account stays ordered",
        value="alert",
    ),
    TopicSpec(
        RELAY_COMMANDS,
        key="gateway id: one collector owns a gateway and sees its commands in order",
        value="relay_command",
    ),
    TopicSpec(
        RELAY_OUTCOMES,
        key="gateway id, produced to partition account_shard(account of the meter): the worker "
        "that owns the meter's relay state reads it, in the order the gateway executed them",
        value="relay_outcome",
    ),
    TopicSpec(
        COLLECTOR_EVENTS,
        key="collector id: a collector's lifecycle events stay ordered",
        value="collector_event",
    ),
    TopicSpec(
        OPERATOR_COMMANDS,
        key="account id of the meter, produced to partition account_shard(account): the "
        "worker that owns the account's relay holds applies it, in order with its readings",
        value="operator_command",
    ),
    TopicSpec(
        DEADLETTER,
        key="source topic name: failures group by where they came from",
        value="dead_letter",
        retention_ms=30 * DAY_MS,
    ),
    TopicSpec(
        POSTINGS,
        key="claim key (\"post:\" + entry id), produced to partition claim_partition(): "
        "common-area shares, adjustments and opening balances, each entry id claimed once",
        value="ledger_posting",
        retention_ms=INFINITE,  # money input, like payments
    ),
    TopicSpec(
        PAYMENTS_ACCEPTED,
        key="account id, partition account_shard(account): payments that won their claim, "
        "for the worker that owns the account's wallet (written by the forwarder)",
        value="payment",
        retention_ms=INFINITE,
    ),
    TopicSpec(
        POSTINGS_ACCEPTED,
        key="account id, partition account_shard(account): postings that won their claim",
        value="ledger_posting",
        retention_ms=INFINITE,
    ),
    TopicSpec(
        ALERT_PREFERENCES,
        key="account id: the newest record per account is the merchant's choice (written by the portal)",
        value="alert_preferences",
        retention_ms=INFINITE,
        cleanup_policy="compact",  # one live record per account, kept as long as the account
    ),
)


def topic(name: str) -> TopicSpec:
    for spec in TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown topic {name!r}; declared: {[t.name for t in TOPICS]}")


class TopicMismatchWarning(UserWarning):
    """An existing topic differs from its declaration (never fixed automatically)."""


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, TopicMismatchWarning, stacklevel=3)


def provision_topics(
    bootstrap: str,
    topics: Iterable[TopicSpec] = TOPICS,
    *,
    replication_factor: int | None = None,  # None: replication_of() the cluster
    timeout: float = 30.0,
) -> list[str]:
    """Create the missing topics; return the names created (empty when all exist).

    Each topic gets its spec's configs plus the cluster's replication factor and
    min.insync.replicas (cluster_replication). Existing topics are left alone. A
    partition-count, replication or config difference is reported as a
    TopicMismatchWarning: adding partitions would move accounts to other partitions, so it
    has to be a deliberate migration, not a side effect.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

    specs = list(topics)
    from infra.kafka_security import kafka_config

    admin = AdminClient(kafka_config(bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    rf, min_isr = replication_of(bootstrap, timeout, admin)
    if replication_factor is not None:  # a caller's own choice (-1: the broker's default)
        rf, min_isr = replication_factor, max(1, replication_factor - 1) if replication_factor > 0 else min_isr

    def configs(spec: TopicSpec) -> dict[str, str]:
        return {"min.insync.replicas": str(min_isr), **spec.configs()}

    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, rf, config=configs(s))
                for s in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                # Someone else created it between list and create: that is success.
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    present = [s for s in specs if s.name in existing]
    for spec in present:
        actual = len(existing[spec.name].partitions)
        if actual != spec.partitions:
            _warn(f"topic {spec.name} has {actual} partitions, declared {spec.partitions}")
        replicas = {len(p.replicas) for p in existing[spec.name].partitions.values()}
        if rf > 0 and replicas != {rf}:
            _warn(f"topic {spec.name} has {sorted(replicas)} replicas per partition, the cluster's policy is {rf}")
    if present:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in present]
        results = admin.describe_configs(resources, request_timeout=timeout)
        by_name = {s.name: s for s in present}
        for res, fut in results.items():
            actual_cfg = fut.result()
            for key, want in configs(by_name[res.name]).items():
                got = actual_cfg[key].value if key in actual_cfg else None
                if got != want:
                    _warn(f"topic {res.name} has {key}={got}, declared {want}")
    return sorted(created)


class InputTopicError(RuntimeError):
    """An input topic whose offsets can have gaps (pipelines/faust_consumer.py refuses them)."""


def check_input_topics(bootstrap: str, names: Iterable[str], *, timeout: float = 30.0,
                       admin: Any = None) -> list[str]:
    """Refuse input topics that are compacted: the worker's consumer delivers each input
    partition strictly in offset order and takes a jump in offsets as a fault to seek back
    from (pipelines/faust_consumer.py); a compacted topic has such gaps by design, so the
    worker would seek back forever. Raises InputTopicError naming the topic and its
    cleanup.policy. Returns the names it could not check (a principal without DescribeConfigs
    on them, e.g. the worker's least-privilege user): those are logged, not refused.
    (Transaction markers leave gaps too; no mallwatt producer is transactional.)"""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    from infra.kafka_security import kafka_config

    admin = admin or AdminClient(kafka_config(bootstrap))
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    unchecked: list[str] = []
    if not resources:
        return unchecked
    for res, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            configs = fut.result()
        except KafkaException as exc:
            log.warning("input topic %s: settings not readable (%s); its cleanup.policy is not checked",
                        res.name, exc)
            unchecked.append(res.name)
            continue
        entry = configs.get("cleanup.policy")
        policy = entry.value if entry is not None and entry.value else "delete"
        if "compact" in policy.split(","):
            raise InputTopicError(
                f"input topic {res.name} has cleanup.policy={policy}: the worker reads its inputs "
                "offset by offset and a compacted topic has gaps; recreate it with "
                "cleanup.policy=delete (infra/topics.py declares it so)")
    return unchecked


def wait_until_served(bootstrap: str, names: Iterable[str] | None = None, timeout: float = 60.0) -> None:
    """Wait until every partition of the topics answers offset queries (a broker that has just
    started answers metadata before it leads its partitions: NOT_LEADER_FOR_PARTITION)."""
    import time

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    wanted = list(names) if names is not None else [t.name for t in TOPICS]
    from infra.kafka_security import kafka_config

    consumer = Consumer(kafka_config(bootstrap, **{"group.id": "mallwatt-readiness"}))
    deadline = time.monotonic() + timeout
    try:
        for name in wanted:
            partitions = consumer.list_topics(name, timeout=timeout).topics[name].partitions
            for p in partitions:
                while True:
                    try:
                        consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5.0)
                        break
                    except KafkaException:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
    finally:
        consumer.close()


def main() -> int:
    from infra.broker import bootstrap_servers

    bootstrap = bootstrap_servers()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    created = provision_topics(bootstrap)
    print(f"{bootstrap}: created {created or 'nothing'}; {len(TOPICS)} topics declared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
