"""The billing stream worker: faust agents around the pure billing core.

readings (ReadingBatch, partition = account shard) ----\
                                                        +--> buckets table (state + outbox)
payments (Payment, partition = account shard) ---------/          | changelog
                                                                  v
                                      forwarder --> ledger, alerts, relay-commands

The agents only decode, route and store; pricing and wallet rules are in pipelines.billing
and pipelines.core. A message that cannot be processed goes to the dead-letter topic with
its reason and the agent keeps going.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import faust
from faust.streams import _current_event

from infra import topics as T
from infra.broker import bootstrap_servers
from pipelines import billing
from pipelines.deadletter import dead_letter_record
from pipelines.envelope import Envelope, bucket_key
from pipelines.forwarder import TABLE_NAME, Forwarder, changelog_topic
from pipelines.portfolio import ConfigError
from schemas import codec
from schemas.keys import account_shard
from schemas.readings import batch_to_frame

log = logging.getLogger("mallwatt.worker")

APP_ID = os.environ.get("MALLWATT_APP_ID", "mallwatt-billing")
#: Reading messages per billing step at most, and how long a step waits to fill up.
BATCH_MESSAGES = int(os.environ.get("MALLWATT_BATCH_MESSAGES", 256))
BATCH_WITHIN_S = float(os.environ.get("MALLWATT_BATCH_WITHIN_MS", 50)) / 1000
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_app(config_path: str, *, bootstrap: str | None = None, store: str | None = None,
              holder: billing.ContextHolder | None = None) -> faust.App:
    partitions = T.default_partitions()
    datadir = Path(os.environ.get("MALLWATT_FAUST_DIR", str(REPO_ROOT / "var" / "faust" / APP_ID)))
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        APP_ID,
        broker=f"kafka://{bootstrap or bootstrap_servers()}",
        store=store or os.environ.get("MALLWATT_STORE", "memory://"),
        topic_partitions=partitions,
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset=os.environ.get("MALLWATT_OFFSET_RESET", "earliest"),
        broker_commit_interval=1.0,
        web_enabled=False,
        # faust keeps table files here even with the memory store; never in the working directory
        datadir=str(datadir),
        # aiokafka keeps one produce request in flight per broker: without linger every changelog
        # write becomes its own round trip; 5 ms batches them at a small latency cost
        producer_linger=float(os.environ.get("MALLWATT_PRODUCER_LINGER_S", 0.005)),
        producer_max_batch_size=1_048_576,
        producer_compression_type="lz4",
        stream_wait_empty=False,
        # a worker killed without goodbye holds its partitions until this expires
        broker_session_timeout=float(os.environ.get("MALLWATT_SESSION_TIMEOUT_S", 10)),
        broker_heartbeat_interval=1.0,
    )
    holder = holder or billing.ContextHolder(config_path, partitions)
    buckets = app.Table(TABLE_NAME, default=None, partitions=partitions,
                        key_type=bytes, value_type=bytes,
                        # the forwarder reads every changelog record: keep them uncompacted for a day
                        extra_topic_configs={"min.compaction.lag.ms": str(24 * 3600 * 1000)})
    readings_topic = app.topic(T.READINGS, key_type=bytes, value_type=bytes, partitions=partitions)
    payments_topic = app.topic(T.PAYMENTS, key_type=bytes, value_type=bytes, partitions=partitions)
    operator_topic = app.topic(T.OPERATOR_COMMANDS, key_type=bytes, value_type=bytes, partitions=partitions)
    postings_topic = app.topic(T.POSTINGS, key_type=bytes, value_type=bytes, partitions=partitions)
    dlq_topic = app.topic(T.DEADLETTER, key_type=bytes, value_type=bytes)

    async def to_dead_letter(event: Any, stage: str, reason: str) -> None:
        msg = event.message
        log.warning("dead letter %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, reason)
        record = dead_letter_record(msg.topic, msg.partition, msg.offset, stage, reason,
                                    msg.key, msg.value, int(time.time() * 1000))
        await dlq_topic.send(key=msg.topic.encode(), value=codec.encode("DeadLetter", record))

    def store(key: str, env: Envelope) -> None:
        buckets[key.encode()] = env.to_bytes()

    def load(key: str) -> Envelope:
        return Envelope.from_bytes(buckets.get(key.encode()))

    @app.agent(readings_topic)
    async def on_readings(stream: faust.Stream) -> None:
        # Many messages per step: the core, the state (de)serialisation and every changelog
        # write are paid once per bucket and step instead of once per message. Events are
        # acked (and so committed) only after the step that consumed them.
        async for events in stream.take_events(BATCH_MESSAGES, within=BATCH_WITHIN_S):
            by_partition: dict[int, list[Any]] = {}
            for event in events:
                by_partition.setdefault(event.message.partition, []).append(event)
            for partition, batch in by_partition.items():
                await bill_readings(partition, batch)

    async def bill_readings(partition: int, events: list[Any]) -> None:
        """Readings of consecutive messages of one partition in one billing step. If the step
        fails, each message is retried alone so only the bad one goes to the dead letters."""
        decoded: list[tuple[int, Any]] = []
        for event in events:
            try:
                decoded.append((event.message.offset,
                                batch_to_frame(codec.decode("ReadingBatch", event.message.value))))
            except (codec.DecodeError, ValueError, KeyError) as exc:
                await to_dead_letter(event, "decode", str(exc))
        if not decoded:
            return
        by_offset = {event.message.offset: event for event in events}
        source = f"{T.READINGS}:{partition}"
        ctx = holder.current()
        try:
            rejected = bill_step(ctx, partition, source, decoded, by_offset[decoded[-1][0]])
        except Exception as exc:  # isolate the message that broke the step
            if len(decoded) > 1:
                log.warning("reading step of %s messages failed (%s); retrying one by one", len(decoded), exc)
                for one in decoded:
                    await bill_readings(partition, [by_offset[one[0]]])
                return
            log.exception("reading batch at %s@%s failed", source, decoded[0][0])
            await to_dead_letter(by_offset[decoded[0][0]], "billing", f"{type(exc).__name__}: {exc}")
            return
        for offset, reason in rejected:
            await to_dead_letter(by_offset[offset], "routing", reason)

    def bill_step(ctx: Any, partition: int, source: str, decoded: list[tuple[int, Any]],
                  event: Any) -> list[tuple[int, str]]:
        """Load, bill and store without an await in between: no other agent can interleave.
        `event` (the step's last) tells faust which changelog partition the writes belong to:
        outside `async for event in stream` faust has no current event of its own."""
        token = _current_event.set(weakref.ref(event))
        try:
            return _bill_step(ctx, partition, source, decoded)
        finally:
            _current_event.reset(token)

    def _bill_step(ctx: Any, partition: int, source: str, decoded: list[tuple[int, Any]]) -> list[tuple[int, str]]:
        routed = billing.route_readings(billing.messages_frame(decoded), ctx, partition)
        envs = {key: load(key) for key in routed.buckets}
        last_offset = decoded[-1][0]
        for key, env in billing.apply_readings_many(envs, routed, ctx, source, last_offset).items():
            store(key, env)
        reasons: dict[int, list[str]] = {}
        for offset, reason in routed.rejected:
            reasons.setdefault(offset, []).append(reason)
        return [(offset, "; ".join(r)) for offset, r in reasons.items()]

    async def per_account(stream: faust.Stream, schema: str, account_of: Any, apply: Any) -> None:
        """Messages that each move one account: decode, check ownership, apply once."""
        async for event in stream.events():
            msg = event.message
            source = f"{msg.topic}:{msg.partition}"
            try:
                record = codec.decode(schema, msg.value)
            except codec.DecodeError as exc:
                await to_dead_letter(event, "decode", str(exc))
                continue
            ctx = holder.current()
            account, problem = account_of(record, ctx)
            owner = account_shard(account, ctx.partitions) if account else None
            if problem is None and owner != msg.partition:
                problem = f"account {account!r} belongs to partition {owner}, not {msg.partition}"
            if problem is not None:
                await to_dead_letter(event, "routing", problem)
                continue
            key = bucket_key(account, ctx.partitions)
            env = load(key)
            if env.applied(source, msg.offset):
                continue
            try:
                store(key, apply(env, record, ctx, source, msg.offset))
            except Exception as exc:  # one bad message must not stop the agent
                log.exception("%s at %s@%s failed", schema, source, msg.offset)
                await to_dead_letter(event, "billing", f"{type(exc).__name__}: {exc}")

    def payment_account(payment: dict[str, Any], ctx: Any) -> tuple[str, str | None]:
        account = payment["account_id"]
        return account, None if account in ctx.accounts else f"unknown account {account!r}"

    def operator_account(command: dict[str, Any], ctx: Any) -> tuple[str, str | None]:
        route = ctx.meter_route.get(command["meter_id"])
        if route is None or route.account_id != command["account_id"]:
            return command["account_id"], (f"meter {command['meter_id']!r} is not a meter of account "
                                           f"{command['account_id']!r} in the current config")
        return route.account_id, None

    @app.agent(payments_topic)
    async def on_payments(stream: faust.Stream) -> None:
        await per_account(stream, "Payment", payment_account, billing.apply_payment)

    @app.agent(postings_topic)
    async def on_postings(stream: faust.Stream) -> None:
        await per_account(stream, "LedgerPosting", payment_account, billing.apply_posting)

    @app.agent(operator_topic)
    async def on_operator(stream: faust.Stream) -> None:
        await per_account(stream, "OperatorCommand", operator_account, billing.apply_operator)

    @app.timer(interval=5.0)
    async def reload_config() -> None:
        holder.reload_if_changed()

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt worker",
        description="Run the billing stream worker: prices readings, deducts wallets, applies "
        "top-ups and emits ledger entries, alerts and relay commands. Run more than one to "
        "share the partitions; state moves with its partitions on a rebalance.")
    parser.add_argument("--config", default=os.environ.get("MALLWATT_CONFIG", "var/portfolio.yaml"),
                        help="portfolio config (YAML); edits are picked up live (default %(default)s)")
    parser.add_argument("--loglevel", default="warning", help="faust log level (default %(default)s)")
    parser.add_argument("--no-forwarder", action="store_true",
                        help="do not publish outputs from the changelog in this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        holder = billing.ContextHolder(args.config, T.default_partitions())  # fail fast on a bad config
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    app = build_app(args.config, holder=holder)
    forwarder = None
    if not args.no_forwarder:
        forwarder = Forwarder(bootstrap_servers(), changelog_topic(APP_ID), group=f"{APP_ID}-forwarder")
        forwarder.start()
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if forwarder:
            forwarder.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
