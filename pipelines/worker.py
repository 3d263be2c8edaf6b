"""The billing stream worker: faust agents around the pure billing core.

readings (ReadingBatch, partition = account shard) ----\
                                                        +--> accounts table (state + outbox)
payments (Payment, partition = account shard) ---------/          | changelog
                                                                  v
                                      forwarder --> ledger, alerts, relay-commands

The agents only decode, route and store; pricing and wallet rules are in pipelines.billing
and pipelines.core. A message that cannot be processed goes to the dead-letter topic with
its reason and the agent keeps going.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import _current_event

from infra import topics as T
from infra.broker import bootstrap_servers
from infra.home import data_dir
from infra.kafka_security import KafkaSettings
from pipelines import batching, billing, claiming, faust_consumer, powerloop, worker_metrics
from pipelines.audit import config_audit, refused_order_audit
from pipelines.core.claims import CLAIM_HORIZON_DAYS
from pipelines.deadletter import dead_letter_record
from pipelines.durable_table import DurableTable
from pipelines.envelope import Envelope
from pipelines.faults import fault_point
from pipelines.faust_tuning import faster_compression, idempotent_producer, shorten_fetch_wait
from pipelines.forwarder import CLAIMS_TABLE, TABLE_NAME, Forwarder, changelog_topics
from pipelines.gc_policy import StepCollector
from pipelines.portfolio import ConfigError
from pipelines.take import CATCHUP_STEP_S, CatchupSize, bill_in_parts, distinct, withhold
from pipelines.worker_metrics import take_steps  # pipelines.take's, counted per step
from schemas import codec
from schemas.keys import account_shard
from schemas.readings import checked_batch

log = logging.getLogger("mallwatt.worker")

APP_ID = os.environ.get("MALLWATT_APP_ID", "mallwatt-billing")
#: The agents' input topics: plain, non-compacted topics written by idempotent producers
#: without transactions, so their offsets have no gaps (pipelines/faust_consumer.py).
INPUT_TOPICS = (T.READINGS, T.RELAY_OUTCOMES, T.PAYMENTS, T.POSTINGS, T.PAYMENTS_ACCEPTED, T.POSTINGS_ACCEPTED,
                T.OPERATOR_COMMANDS)
#: Reading messages per billing step at most, and how long a step waits to fill up.
BATCH_MESSAGES = int(os.environ.get("MALLWATT_BATCH_MESSAGES", 256))
BATCH_WITHIN_S = float(os.environ.get("MALLWATT_BATCH_WITHIN_MS", 50)) / 1000
#: Behind a backlog a readings step may grow to this many messages or bytes of input (the
#: per-account cost of a step is then spread over several readings per account; each
#: account's rounds stay bounded by MALLWATT_ROWS_PER_ACCOUNT). At 350,000 merchants a cycle
#: is about 4,000 messages of 8.4 kB: the bounds allow a 10-minute backlog (10 cycles) in one
#: step, so every account is billed once for all of it (7.5x the offered rate, against 4.9-5.3x
#: with 32,768 messages / 256 MB and growth 16, which took three steps: docs/stream.md, session
#: 12). Memory: the bytes bound, and the step decoded, for its duration, plus the next step's
#: buffer filling meanwhile (up to the same bounds: pipelines/take.py); the 350,000-merchant
#: worker peaked at 6.4 GB RSS in that step (3.1 GB in the steady phase before).
CATCHUP_MESSAGES = int(os.environ.get("MALLWATT_CATCHUP_MESSAGES", 65536))
CATCHUP_BYTES = int(os.environ.get("MALLWATT_CATCHUP_BYTES", 512 * 1024 * 1024))
#: How much larger than the last a catch-up step may be (take.CatchupSize): after the first
#: step (4x the live size, a probe of the cost) the next may take the rest of the backlog
#: within its time budget (MALLWATT_CATCHUP_STEP_S).
CATCHUP_GROWTH = max(2, int(os.environ.get("MALLWATT_CATCHUP_GROWTH", 40)))
#: Log every reading step's size, input age and cost (for tuning; off by default).
LOG_STEPS = bool(os.environ.get("MALLWATT_LOG_STEPS"))
#: How often a worker forgets claims past the horizon (pipelines.core.claims).
CLAIM_SWEEP_S = float(os.environ.get("MALLWATT_CLAIM_SWEEP_S", 3600))
#: How often the timer runs engine.tick and the relay retries over the accounts due (seconds),
#: and how often it re-scans the table for accounts with timer work (after a rebalance).
TICK_S = float(os.environ.get("MALLWATT_TICK_S", 1.0))
TICK_SCAN_S = float(os.environ.get("MALLWATT_TICK_SCAN_S", 30.0))
#: Accounts one tick may update (the rest wait for the next tick).
TICK_MAX_ACCOUNTS = int(os.environ.get("MALLWATT_TICK_MAX_ACCOUNTS", 2000))


class _Partition:
    """Stands in for the current event when the timer writes the table: faust takes a write's
    changelog partition from the event (the account's partition)."""

    def __init__(self, topic: str, partition: int) -> None:
        self.message = type("M", (), {"topic": topic, "partition": partition})()


def build_app(config_path: str, *, bootstrap: str | None = None, store: str | None = None,
              holder: billing.ContextHolder | None = None) -> faust.App:
    shorten_fetch_wait()
    faster_compression()
    idempotent_producer()
    partitions = T.default_partitions()
    # one directory per named worker: with MALLWATT_STORE=rocksdb:// a restarted worker finds
    # its own local state there (two workers of one host must not share it)
    name = os.environ.get("MALLWATT_WORKER_NAME", "")
    datadir = Path(os.environ.get("MALLWATT_FAUST_DIR", str(data_dir("faust", APP_ID, name))))
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        APP_ID,
        broker=f"kafka://{bootstrap or bootstrap_servers()}",
        broker_credentials=KafkaSettings.from_env(bootstrap or bootstrap_servers()).faust_credentials(),
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
        Table=DurableTable,  # agents wait for their changelog writes (pipelines/durable_table.py)
        # a worker killed without goodbye holds its partitions until this expires
        broker_session_timeout=float(os.environ.get("MALLWATT_SESSION_TIMEOUT_S", 10)),
        broker_heartbeat_interval=1.0,
        # the topics faust creates itself (its leader topic) replicate like every other one
        topic_replication_factor=T.replication_of(bootstrap or bootstrap_servers())[0],
    )
    # the agents' input topics: delivered strictly in offset order, committed without gaps
    faust_consumer.install(app, INPUT_TOPICS)
    holder = holder or billing.ContextHolder(config_path, partitions)
    # one key per account (pipelines/envelope.py); compacted after the forwarding window
    states = cast(DurableTable, app.Table(TABLE_NAME, default=None, partitions=partitions,
                                          key_type=bytes, value_type=bytes,
                                          extra_topic_configs=T.state_changelog_configs()))
    # payment and posting ids, keyed by claim key; forgotten after the claim horizon
    claims = cast(DurableTable, app.Table(CLAIMS_TABLE, default=None, partitions=partitions,
                                          key_type=bytes, value_type=bytes,
                                          extra_topic_configs=T.claims_changelog_configs(CLAIM_HORIZON_DAYS)))
    readings_topic = app.topic(T.READINGS, key_type=bytes, value_type=bytes, partitions=partitions)
    outcomes_topic = app.topic(T.RELAY_OUTCOMES, key_type=bytes, value_type=bytes, partitions=partitions)
    payments_topic = app.topic(T.PAYMENTS, key_type=bytes, value_type=bytes, partitions=partitions)
    accepted_payments_topic = app.topic(T.PAYMENTS_ACCEPTED, key_type=bytes, value_type=bytes,
                                        partitions=partitions)
    accepted_postings_topic = app.topic(T.POSTINGS_ACCEPTED, key_type=bytes, value_type=bytes,
                                        partitions=partitions)
    operator_topic = app.topic(T.OPERATOR_COMMANDS, key_type=bytes, value_type=bytes, partitions=partitions)
    postings_topic = app.topic(T.POSTINGS, key_type=bytes, value_type=bytes, partitions=partitions)
    dlq_topic = app.topic(T.DEADLETTER, key_type=bytes, value_type=bytes)
    audit_topic = app.topic(T.AUDIT, key_type=bytes, value_type=bytes)

    async def send_audit(record: dict[str, Any]) -> None:
        await audit_topic.send(key=record["principal"].encode(), value=codec.encode("AuditEvent", record))

    async def send_dead_letter(event: Any, stage: str, reason: str) -> Any:
        """Send a dead letter; returns its delivery future (await it before acking the event)."""
        msg = event.message
        log.warning("dead letter %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, reason)
        worker_metrics.dead_letter(stage, reason)
        record = dead_letter_record(msg.topic, msg.partition, msg.offset, stage, reason,
                                    msg.key, msg.value, int(time.time() * 1000))
        return await dlq_topic.send(key=msg.topic.encode(), value=codec.encode("DeadLetter", record))

    async def to_dead_letter(event: Any, stage: str, reason: str) -> None:
        await (await send_dead_letter(event, stage, reason))  # delivered before the event is acked

    # The last envelope stored or loaded per account, with the table's rebalance generation:
    # the authoritative newest state of the accounts this worker owns (the table's local store
    # lags by the broker's ack), and a rebalance or recovery makes every entry stale.
    parsed: dict[str, tuple[int, Envelope]] = worker_metrics.ParsedEnvelopes()  # indexes relay rows for the gauges
    # Accounts with timer work (a relay chain due, a trip waiting for a friendly period to end)
    # -> when; kept as envelopes are stored or parsed, and by a periodic scan after a rebalance.
    due: dict[str, int] = {}
    # The stream's time for the timer: the newest Kafka message timestamp of any input seen,
    # never ahead of this host's clock by more than the time guard's skew (a producer whose
    # clock runs years ahead must not fire every retry and deferred trip at once).
    clock_ms = [0]

    def note_due(key: str, env: Envelope) -> None:
        when = powerloop.next_due(env, holder.current())
        if when is None:
            due.pop(key, None)
        else:
            due[key] = when

    def advance_clock(timestamps: list[Any]) -> int | None:
        """Move the stream clock to the newest message timestamp; returns the step's now."""
        stamps = [t for t in (batching.message_ts_ms(ts) for ts in timestamps) if t is not None]
        if not stamps:
            return None
        cap = int(time.time() * 1000) + holder.current().time_bounds.max_future_skew_ms
        now = min(max(stamps), cap)
        clock_ms[0] = max(clock_ms[0], now)
        return now
    collector = StepCollector(entries=lambda: len(parsed))  # blocks per cached envelope (gc_policy)
    worker_metrics.install(app, states, parsed, holder)  # lag, state size, relay backlog; readiness

    def store(key: str, env: Envelope) -> None:
        states[key.encode()] = env.to_bytes()
        parsed[key] = (states.generation, env)
        note_due(key, env)

    def load(key: str) -> Envelope:
        # Our own newest value: the table's local store gets it only once the broker has it
        # (pipelines/durable_table.py). Values of before a rebalance are read again.
        hit = parsed.get(key)
        if hit is not None and hit[0] == states.generation:
            return hit[1]
        # from its partition's database (DurableTable.get_in): one read, not one per partition
        env = Envelope.from_bytes(states.get_in(key.encode(), account_shard(key, partitions)), outbox=False)
        parsed[key] = (states.generation, env)
        note_due(key, env)
        return env

    def store_all(changed: dict[str, Envelope], events: list[Any], ctx: Any) -> None:
        """Write a step's changed accounts, each to its account's partition (DurableTable.put:
        no faust event context per write)."""
        generation = states.generation
        for key, env in changed.items():
            states.put(key.encode(), env.to_bytes(), ctx.partition_of_key(key))
            parsed[key] = (generation, env)
            note_due(key, env)
            fault_point("mid_step")  # chaos proof: part of the step written, part not

    def withhold_unowned(events: list[Any]) -> None:
        """Take out of a step the events of partitions this worker does not own now. A step's
        events may have been buffered before a rebalance: billing them while it runs, or after
        it moved their partition away, writes from a state the new owner also bills from (the
        chaos proof saw 19 account records written twice from one state). Withheld events are
        never acked: the owner gets them again (pipelines.take.withhold)."""
        mine = set() if app.rebalancing else app.consumer.assignment()
        gone = withhold(events, lambda event: event.message.tp in mine)
        if gone:
            redeliver_withheld(gone)
            log.info("%s message(s) of partitions not owned now left to their owner: %s", len(gone),
                     sorted({(e.message.topic, e.message.partition) for e in gone})[:8])

    def withhold_out_of_order(events: list[Any]) -> None:
        """Take out of a step the messages that would be billed ahead of an earlier message of
        their partition (pipelines.strict_offsets: `superseded`, a later seek delivers them
        again; `admit`, they skip a message faust dropped after its delivery, which is then
        delivered again). Billed first, they moved their accounts' high-water marks past the
        earlier one, which was skipped as applied. Never acked: the copy that comes again is
        billed, in order."""
        consumer = app.consumer
        if not hasattr(consumer, "superseded"):  # not the strict consumer
            return
        gone = withhold(events, lambda event: not consumer.superseded(event.message))
        if gone:
            log.info("%s message(s) delivered before their partition was sought back left for their next "
                     "delivery: %s", len(gone), sorted({(e.message.topic, e.message.partition, e.message.offset)
                                                      for e in gone})[:8])
        held, again = consumer.admit([event.message for event in events])
        if held:
            held_ids = {id(events[i]) for i in held}
            withhold(events, lambda event: id(event) not in held_ids)
            log.warning("input skipped ahead of a dropped message; delivered again from %s (%s message(s) held back)",
                        {f"{tp.topic}[{tp.partition}]": offset for tp, offset in again.items()}, len(held))
            in_background(consumer.redeliver(again))

    def in_background(work: Any) -> None:
        """Run `work` (a coroutine) as a task kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        pending_acks.add(task)
        task.add_done_callback(pending_acks.discard)

    def redeliver_withheld(gone: list[Any]) -> None:
        """Withheld events of a partition this worker keeps (a rebalance ran) come again."""
        first: dict[Any, int] = {}
        for event in gone:
            tp = event.message.tp
            first[tp] = min(first.get(tp, event.message.offset), event.message.offset)
        if hasattr(app.consumer, "redeliver"):
            in_background(app.consumer.redeliver(first))

    async def bill_batch(events: list[Any], decode: Any, bill: Any, *, wait_written: bool = True) -> None:
        """Decode each message (a bad one goes to the dead letters) and bill the rest in one
        step. If the step fails, bill the messages one by one so only the bad one is refused.
        With `wait_written`, return only once the step's state writes are acknowledged."""
        decoded: list[tuple[Any, Any]] = []
        letters: list[Any] = []  # delivery futures, awaited together: one round trip per step
        withhold_out_of_order(events)  # not dead-lettered either: the copy that comes again is judged
        for event in distinct(events):  # faust may deliver a message twice in one step; acked all the same
            try:
                decoded.append((event, decode(event.message.value)))
            except (codec.DecodeError, ValueError, KeyError) as exc:
                letters.append(await send_dead_letter(event, "decode", str(exc)))
        # ownership and order are checked after the last await before the synchronous bill below
        withhold_out_of_order(events)
        withhold_unowned(events)
        kept = {id(event) for event in events}
        decoded = [(event, value) for event, value in decoded if id(event) in kept]
        if not decoded:
            await asyncio.gather(*letters)
            return
        try:
            if inspect.iscoroutinefunction(bill):  # bills in parts, awaits between them (bill_readings)
                refused = await bill(decoded, holder.current(), events)
            else:
                with collector.step():  # the cycle collector stays off the state (pipelines/gc_policy.py)
                    refused = bill(decoded, holder.current())  # synchronous: no other agent interleaves
        except Exception as exc:
            if len(decoded) > 1:
                log.warning("billing step of %s messages failed (%s); retrying one by one", len(decoded), exc)
                for event, _ in decoded:
                    alone = [event]
                    await bill_batch(alone, decode, bill, wait_written=wait_written)
                    if not alone:  # withheld (its partition moved meanwhile): not acked either
                        events.remove(event)
                await asyncio.gather(*letters)
                return
            msg = decoded[0][0].message
            log.exception("%s[%s]@%s failed", msg.topic, msg.partition, msg.offset)
            letters.append(await send_dead_letter(decoded[0][0], "billing", f"{type(exc).__name__}: {exc}"))
            await asyncio.gather(*letters)
            return
        if wait_written:
            await written()
        for event, reason in refused:
            letters.append(await send_dead_letter(event, "routing", reason))
        await asyncio.gather(*letters)

    async def written() -> None:
        """Wait for this agent's changelog writes before its events are acked (and so before
        their offsets can be committed). A write the broker refused leaves memory ahead of
        the changelog: stop the worker, so a restart recovers the table from the changelog."""
        try:
            await states.written()
            await claims.written()
            fault_point("after_state_write_before_commit")  # chaos proof: stored, offsets not committed
        except Exception as exc:
            log.critical("a state write was not stored (%s); stopping the worker", exc)
            await app.crash(exc)
            raise

    def decode_readings(value: bytes) -> Any:
        return checked_batch(codec.decode("ReadingBatch", value))  # framed with the step's others

    async def bill_readings(decoded: list[tuple[Any, Any]], ctx: Any, step_events: list[Any]
                            ) -> list[tuple[Any, str]]:
        """Bill a step's readings part by part (batching.parts), letting the event loop run
        between parts: a catch-up step of several cycles is a minute of billing at 350,000
        merchants. Each part is loaded, billed and written with no await in between (no other
        agent touches its accounts meanwhile); before each part after the first, the step
        stops at a part whose partition this worker no longer owns, or after any rebalance,
        and leaves those partitions' messages unacked to their owner (withheld from `step_events`,
        the list take_steps acks)."""
        advance_clock([e.message.timestamp for e, _ in decoded])
        events = [e for e, _ in decoded]
        frame = batching.messages_frame([(e.message.partition, e.message.offset, f,
                                          batching.message_ts_ms(e.message.timestamp)) for e, f in decoded])
        routed = batching.route_readings(frame, ctx)
        by_position = {(e.message.partition, e.message.offset): e for e in events}
        reasons: dict[tuple[int, int], list[str]] = {}
        for part, offset, reason in routed.rejected:
            reasons.setdefault((part, offset), []).append(reason)
        refused = [(by_position[pos], "; ".join(r)) for pos, r in reasons.items()]
        generation = states.generation

        def still_mine(partitions: frozenset[int]) -> bool:
            return not app.rebalancing and states.generation == generation and partitions <= owned_partitions()

        def bill_part(part: batching.Routed) -> None:
            with collector.step():  # the cycle collector stays off the state (pipelines/gc_policy.py)
                envs = {key: load(key) for key in part.buckets}
                for changed in batching.apply_readings_many(envs, part, ctx):  # rounds, in order
                    store_all(changed, events, ctx)

        if len(events) > BATCH_MESSAGES:  # a catch-up step: its shape sizes the next one
            per_shard = ctx.accounts_per_shard
            catchup_sizer.note_shape(len(routed.buckets), frame.height,
                                     sum(per_shard.get(p, 0) for p in owned_partitions()))
        await load_in_slices(routed.buckets)  # near_relay_keys then reads only cached envelopes
        split = batching.parts(routed, first=batching.near_relay_keys(routed.buckets, load, ctx.rating))
        left = await bill_in_parts(split, bill_part, still_mine)
        if left:
            leave_to_owner(step_events, left)
            refused = [(e, r) for e, r in refused if e.message.partition not in left]
        return refused

    async def load_in_slices(keys: list[str]) -> None:
        """Read the step's envelopes that are not cached (after a restart or a rebalance: all
        of them, 350,000 in a catch-up step) in slices of batching.PART_ACCOUNTS, with the
        cycle collector off during each and the event loop free between them. Read with the
        collector on, the new objects (about 14 per envelope) set off collections that walked
        the growing heap again and again: 51 against 22 us per account in a cold 350,000-account
        step (`python -m bench.worker_step --cold`). In one go, they held the loop for half a
        minute (top-ups and the stall check waited)."""
        generation = states.generation
        cold = [key for key in keys if (hit := parsed.get(key)) is None or hit[0] != generation]
        for start in range(0, len(cold), batching.PART_ACCOUNTS):
            if start:
                await asyncio.sleep(0)
            with collector.step():
                for key in cold[start:start + batching.PART_ACCOUNTS]:
                    load(key)

    def owned_partitions() -> set[int]:
        """The readings partitions this worker is assigned now."""
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == T.READINGS}

    def leave_to_owner(events: list[Any], partitions: set[int]) -> None:
        """Take the events of `partitions` out of a step that stopped between parts (never
        acked: redelivered to this worker or their new owner; accounts billed in an earlier
        part skip them by their high-water marks)."""
        gone = withhold(events, lambda event: event.message.partition not in partitions)
        if gone:
            redeliver_withheld(gone)
        log.info("readings step stopped between parts (a rebalance); %s message(s) of partitions %s left to "
                 "their owner", len(gone), sorted(partitions))

    def bill_payments(decoded: list[tuple[Any, Any]], ctx: Any) -> list[tuple[Any, str]]:
        """Accepted payments (they won their claim); each account's mark is the claimed input's
        partition and offset, so a re-published accepted payment is a no-op."""
        refused: list[tuple[Any, str]] = []
        good: list[tuple[int, int, dict[str, Any]]] = []
        for event, payment in decoded:
            account, problem = payment_account(payment, ctx)
            # time was checked at the claim, against the time the payment itself was produced
            problem = owner_problem(event, account, problem, ctx)
            position = claiming.accepted_position(payment, T.PAYMENTS_ACCEPTED)
            if problem is None and position is None:
                problem = "accepted payment without claim_partition/claim_offset (not from the claims table)"
            if problem:
                refused.append((event, problem))
            else:
                good.append((payment["claim_partition"], payment["claim_offset"], payment))
        keys = {ctx.bucket_of(p["account_id"]) for _, _, p in good}
        envs = {key: load(key) for key in keys}
        now = advance_clock([e.message.timestamp for e, _ in decoded])
        for changed in batching.apply_payments_many(envs, good, ctx, now_ms=now):
            store_all(changed, [e for e, _ in decoded], ctx)
        return refused

    def owner_problem(event: Any, account: str, problem: str | None, ctx: Any) -> str | None:
        owner = account_shard(account, ctx.partitions) if account else None
        if problem is None and owner != event.message.partition:
            problem = f"account {account!r} belongs to partition {owner}, not {event.message.partition}"
        return problem

    # sizes the readings agent's catch-up steps from each step's accounts and readings (take.CatchupSize)
    catchup_sizer = CatchupSize(BATCH_MESSAGES, CATCHUP_MESSAGES, CATCHUP_STEP_S, growth=CATCHUP_GROWTH)
    pending_acks: set[asyncio.Future[None]] = set()  # keeps the background tasks referenced (in_background)

    @app.agent(readings_topic)
    async def on_readings(stream: faust.Stream) -> None:
        # Many messages per step: the core, the state (de)serialisation and every changelog
        # write are paid once per bucket and step instead of once per message. take_steps
        # acks (and so commits) the events only after the step that consumed them.
        #
        # The step's events must not be acked before its state writes are acknowledged (see
        # written()), but waiting for that here would hold the next step back by a broker
        # round trip. So each event gets one extra reference: take_steps' own ack after
        # this body only drops that, and the real ack follows once the writes are stored.
        async for events in take_steps(stream, BATCH_MESSAGES, BATCH_WITHIN_S, CATCHUP_MESSAGES, CATCHUP_BYTES,
                                       sizer=catchup_sizer):
            started, started_cpu = time.time(), time.thread_time()
            for event in events:
                event.message.incref()
            await bill_batch(events, decode_readings, bill_readings, wait_written=False)
            in_background(ack_when_written(stream, events))
            if LOG_STEPS:  # how far behind the input a step runs, and its cost
                ages = [(started - e.message.timestamp) * 1000 for e in events]
                # wall time and this thread's CPU: a step that takes much longer than its CPU
                # waited for the machine (other processes on the cores), not for its own work
                log.warning("reading step: %s messages, %.0f-%.0f ms old, %.0f ms (%.0f ms CPU)", len(events),
                            min(ages), max(ages), (time.time() - started) * 1000,
                            (time.thread_time() - started_cpu) * 1000)

    async def ack_when_written(stream: faust.Stream, events: list[Any]) -> None:
        await written()
        for event in events:
            await stream.ack(event)

    @app.agent(accepted_payments_topic)
    async def on_payments(stream: faust.Stream) -> None:
        async for events in take_steps(stream, BATCH_MESSAGES, BATCH_WITHIN_S):
            await bill_batch(events, lambda value: codec.decode("Payment", value), bill_payments)

    # Claims written and not yet acknowledged (the table's local store gets them on the ack):
    # a second use of an id in the same step must meet the first.
    unacked_claims: dict[str, bytes] = {}

    def load_claim(key: str) -> Any:
        raw = unacked_claims.get(key)
        return claiming.decode_claim(raw if raw is not None else claims.get_in(key.encode(),
                                                                               account_shard(key, partitions)))

    newest_claim_ms = [0]  # the newest payment/posting time claimed here: the horizon's "now"

    def claim_keys() -> Any:
        """The local store's keys for one sweep pass. RocksDB iterates a consistent view, so
        deleting behind the iterator is safe; the in-memory store (small portfolios) is a dict,
        which must not change under its iterator: its pass walks a copy of the keys."""
        store = claims.data  # faust's local store of the table
        return iter(store.keys()) if store.__class__.__module__.endswith("rocksdb") else iter(list(store.keys()))

    def forget_claim(key: Any) -> None:
        claims.data.pop(key, None)

    sweeper = claiming.ClaimSweeper(claim_keys, lambda key: claims.data.get(key), forget_claim,
                                    pass_interval_s=CLAIM_SWEEP_S)

    @app.timer(interval=5.0)
    async def report_stalled_input() -> None:
        """An agent that stops taking its input stops every input's commits: say which."""
        report = getattr(app.consumer, "stall_report", lambda now: None)(time.monotonic())
        if report:
            log.warning("input stalled: %s", report)
            await app.consumer.unstick()

    @app.timer(interval=1.0)
    async def forget_expired_claims() -> None:
        """Forget claims past the horizon, a bounded slice a second (claiming.ClaimSweeper)."""
        sweeper.tick(newest_claim_ms[0], claims.generation, time.monotonic())

    async def claim_records(stream: faust.Stream, schema: str) -> None:
        """Payments or postings against their claims, in input order; an accepted one goes on
        (through the claim's outbox) to the account's wallet."""
        async for events in take_steps(stream, BATCH_MESSAGES, BATCH_WITHIN_S):
            withhold_out_of_order(events)  # the first claim wins: claimed out of order, another copy could
            withhold_unowned(events)
            letters: list[Any] = []
            todo = distinct(events)  # a second copy of a message is acked with the step, not claimed
            for index, event in enumerate(todo):
                if app.rebalancing:  # began at a dead letter's await: the rest waits for the owner
                    # by position: a copy of a withheld message must not be acked either
                    rest = {(e.message.tp, e.message.offset) for e in todo[index:]}
                    redeliver_withheld(withhold(events, lambda e, rest=rest: (e.message.tp, e.message.offset) not in rest))  # type: ignore[misc]
                    break
                msg = event.message
                try:
                    record = codec.decode(schema, msg.value)
                except codec.DecodeError as exc:
                    letters.append(await send_dead_letter(event, "decode", str(exc)))
                    continue
                ctx = holder.current()
                problem = claiming.record_problem(record, msg.topic, msg.partition, ctx) or batching.time_problem(
                    record.get("ts_ms"), batching.message_ts_ms(msg.timestamp), ctx)
                if problem is not None:
                    if problem.startswith("unauthorized"):  # a refused money command is audited too
                        await send_audit(claiming.refused_money_audit(record, ctx, problem))
                    letters.append(await send_dead_letter(event, "routing", problem))
                    continue
                try:
                    key = claiming.claim_key(record, claiming.NAMESPACES[msg.topic])
                    result = claiming.claim_step(load_claim(key), record, msg.topic, msg.partition, msg.offset,
                                                 ctx)
                except Exception as exc:  # one bad message must not stop the agent
                    log.exception("%s at %s@%s failed", schema, msg.topic, msg.offset)
                    letters.append(await send_dead_letter(event, "claim", f"{type(exc).__name__}: {exc}"))
                    continue
                newest_claim_ms[0] = max(newest_claim_ms[0], int(record["ts_ms"]))
                if result.value is not None:
                    token = _current_event.set(weakref.ref(event))  # the changelog partition of the write
                    try:
                        claims[key.encode()] = result.value
                        unacked_claims[key] = result.value
                    except Exception as exc:  # the table itself is broken: restart, never drop input
                        log.critical("claims table write failed (%s); stopping the worker", exc)
                        await app.crash(exc)
                        raise
                    finally:
                        _current_event.reset(token)
            await written()
            unacked_claims.clear()  # acknowledged: in the local store now
            await asyncio.gather(*letters)

    @app.agent(payments_topic)
    async def on_payment_claims(stream: faust.Stream) -> None:
        await claim_records(stream, "Payment")

    @app.agent(postings_topic)
    async def on_posting_claims(stream: faust.Stream) -> None:
        await claim_records(stream, "LedgerPosting")

    async def per_account(stream: faust.Stream, schema: str, account_of: Any, apply: Any) -> None:
        """Messages that each move one account: decode, check ownership, apply once."""
        async for event in stream.events():
            msg = event.message
            source, offset = batching.source_of(msg.topic, msg.partition), msg.offset
            try:
                record = codec.decode(schema, msg.value)
            except codec.DecodeError as exc:
                await to_dead_letter(event, "decode", str(exc))
                continue
            ctx = holder.current()
            account, problem = account_of(record, ctx)
            problem = owner_problem(event, account, problem, ctx)
            if problem is None and msg.topic == T.POSTINGS_ACCEPTED:  # time was checked at the claim
                position = claiming.accepted_position(record, msg.topic)
                if position is None:
                    problem = "accepted posting without claim_partition/claim_offset (not from the claims table)"
                else:
                    source, offset = position  # the claimed input's position: a re-publish is a no-op
            elif problem is None:
                problem = batching.time_problem(record.get("ts_ms"), batching.message_ts_ms(msg.timestamp), ctx)
            if problem is not None:
                if schema == "OperatorCommand" and problem.startswith("unauthorized"):
                    await send_audit(refused_order_audit(record, ctx, problem))
                await to_dead_letter(event, "routing", problem)
                continue
            key = ctx.bucket_of(account)
            env = load(key)
            if env.applied(source, offset):
                continue
            now = advance_clock([msg.timestamp])
            try:
                store(key, apply(env, record, ctx, source, offset, now_ms=now))
            except Exception as exc:  # one bad message must not stop the agent
                log.exception("%s at %s@%s failed", schema, source, msg.offset)
                await to_dead_letter(event, "billing", f"{type(exc).__name__}: {exc}")
                continue
            await written()

    def payment_account(payment: dict[str, Any], ctx: Any) -> tuple[str, str | None]:
        account = payment["account_id"]
        return account, None if account in ctx.accounts else f"unknown account {account!r}"

    def operator_account(command: dict[str, Any], ctx: Any) -> tuple[str, str | None]:
        route = ctx.meter_route.get(command["meter_id"])
        if route is None or route.account_id != command["account_id"]:
            return command["account_id"], (f"meter {command['meter_id']!r} is not a meter of account "
                                           f"{command['account_id']!r} in the current config")
        # signatures, permissions, approval, life-safety (pipelines.core.authority): a refusal
        # goes to the dead letters with its reason
        return route.account_id, ctx.operator_decision(command).problem()

    @app.agent(accepted_postings_topic)
    async def on_postings(stream: faust.Stream) -> None:
        await per_account(stream, "LedgerPosting", payment_account, billing.apply_posting)

    @app.agent(operator_topic)
    async def on_operator(stream: faust.Stream) -> None:
        await per_account(stream, "OperatorCommand", operator_account, billing.apply_operator)

    @app.timer(interval=5.0)
    async def reload_config() -> None:
        # re-read and rebuild in a thread; billing keeps the last context until the new one is ready
        error_before = holder.last_error
        changed = await holder.reload_in_background()
        if changed or (holder.last_error and holder.last_error != error_before):
            await send_audit(config_audit(holder, changed, int(time.time() * 1000)))

    def outcome_account(outcome: dict[str, Any], ctx: Any) -> tuple[str, str | None]:
        route = ctx.meter_route.get(outcome["meter_id"])
        if route is None:
            return "", f"relay outcome for meter {outcome['meter_id']!r}, not in the current config"
        return route.account_id, None

    def apply_outcomes(decoded: list[tuple[Any, Any]], ctx: Any) -> list[tuple[Any, str]]:
        """Relay outcomes of a step, per account in topic order; each account's mark is the
        outcome's own partition and offset (outcomes are produced to the account's shard)."""
        refused: list[tuple[Any, str]] = []
        per_account: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
        now = advance_clock([e.message.timestamp for e, _ in decoded]) or clock_ms[0]
        worker_metrics.relay_outcomes(decoded)
        for event, outcome in decoded:
            account, problem = outcome_account(outcome, ctx)
            problem = owner_problem(event, account, problem, ctx)
            if problem:
                refused.append((event, problem))
            else:
                per_account.setdefault(account, []).append((event.message.partition, event.message.offset, outcome))
        changed: dict[str, Envelope] = {}
        for account, rows in per_account.items():
            key = ctx.bucket_of(account)
            env = load(key)
            source = batching.source_of(T.RELAY_OUTCOMES, rows[0][0])
            fresh = [o for _, offset, o in rows if not env.applied(source, offset)]
            if fresh:
                changed[key] = billing.apply_outcomes(env, account, fresh, ctx, source, rows[-1][1], now)
        store_all(changed, [e for e, _ in decoded], ctx)
        return refused

    @app.agent(outcomes_topic)
    async def on_relay_outcomes(stream: faust.Stream) -> None:
        async for events in take_steps(stream, BATCH_MESSAGES, BATCH_WITHIN_S):
            await bill_batch(events, lambda value: codec.decode("RelayOutcome", value), apply_outcomes)

    def active_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == T.READINGS}

    @app.timer(interval=TICK_S)
    async def power_timer() -> None:
        """engine.tick and the relay retries of the accounts due, at the stream clock (explicit
        time: the newest input timestamp seen, see clock_ms). Each account's change and its
        outputs are one changelog record, as for any input."""
        now = clock_ms[0]
        if not now or not due or app.rebalancing:  # recovering: the table may hold older values
            return
        ctx = holder.current()
        mine = active_partitions()
        todo = sorted((when, key) for key, when in due.items() if when <= now)[:TICK_MAX_ACCOUNTS]
        wrote = False
        for _, key in todo:
            partition = ctx.partition_of_key(key)
            if partition not in mine:
                due.pop(key, None)  # moved to another worker with its partition
                continue
            try:
                new = billing.tick(load(key), ctx, now)
            except Exception:  # one account's failure must not stop the timer
                log.exception("timer step of %s failed", key)
                due.pop(key, None)
                continue
            if new is None:  # a trip still inside its friendly period: look again when it can end
                env = load(key)
                if powerloop.next_due(env, ctx) is not None:
                    due[key] = billing.next_timer_ms(env, ctx, now)
                continue
            holder_event = _Partition(T.READINGS, partition)
            token = _current_event.set(weakref.ref(holder_event))  # type: ignore[arg-type]
            try:
                store(key, new)
            finally:
                _current_event.reset(token)
            wrote = True
        if wrote:
            await written()

    scanned = [-1]  # the table generation a scan last completed in

    @app.timer(interval=TICK_SCAN_S)
    async def scan_due() -> None:
        """Find accounts with timer work among the states this worker owns (after a start or a
        rebalance they are in the table but not yet in `due`), in slices so billing never waits.
        Not while a rebalance's recovery replays the changelog (values go back in time meanwhile).
        Once per table generation: afterwards every write notes its own timer work, and a scan
        of 350,000 keys costs about a second of the event loop."""
        generation = states.generation
        if app.rebalancing or scanned[0] == generation:
            return
        ctx = holder.current()
        mine = active_partitions()
        keys = [k for k in list(states.data.keys()) if ctx.partition_of_key(k.decode()) in mine]
        for start in range(0, len(keys), 5_000):
            with collector.step():  # new envelopes: the cycle collector off, as in load_in_slices
                for raw_key in keys[start:start + 5_000]:
                    try:
                        load(raw_key.decode())
                    except Exception as exc:  # an unreadable value is reported, not fatal for the timer
                        log.error("state of %r unreadable for the timer: %s", raw_key, exc)
            await asyncio.sleep(0)
        if states.generation == generation and not app.rebalancing:
            scanned[0] = generation

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt worker",
        description="Run the billing stream worker: prices readings, deducts wallets, applies "
        "top-ups and emits ledger entries, alerts and relay commands. Run more than one to "
        "share the partitions; state moves with its partitions on a rebalance.")
    parser.add_argument("--config", default=os.environ.get("MALLWATT_CONFIG", str(data_dir("portfolio.yaml"))),
                        help="portfolio config: a YAML file or a roster directory (docs/roster.md); edits are "
                        "picked up live, without stopping billing (default %(default)s)")
    parser.add_argument("--loglevel", default=os.environ.get("MALLWATT_LOGLEVEL", "warning"),
                        help="faust log level (default %(default)s; MALLWATT_LOGLEVEL)")
    parser.add_argument("--no-forwarder", action="store_true",
                        help="do not publish outputs from the changelog in this process")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz (default "
                        "MALLWATT_WORKER_METRICS_PORT or 9464; negative: off; docs/operations.md)")
    args = parser.parse_args(argv)
    from pipelines.logsetup import configure, quiet_spinner

    # one handler for every line (JSON with --log-json / MALLWATT_LOG_FORMAT=json); faust keeps it
    configure("worker", level=args.loglevel.upper())
    # aiokafka builds a debug record for every message it sends unless told otherwise
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        holder = billing.ContextHolder(args.config, T.default_partitions())  # fail fast on a bad config
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    # the changelogs exist (with their compaction settings) before faust's first table write
    T.provision_topics(bootstrap_servers(), T.changelog_specs(APP_ID, CLAIM_HORIZON_DAYS))
    T.wait_until_served(bootstrap_servers(), [t.name for t in T.changelog_specs(APP_ID, CLAIM_HORIZON_DAYS)])
    try:  # the strict consumer needs gap-free input offsets (pipelines/faust_consumer.py)
        T.check_input_topics(bootstrap_servers(), INPUT_TOPICS)
    except T.InputTopicError as exc:
        print(exc, file=sys.stderr)
        return 2
    app = build_app(args.config, holder=holder)
    forwarder = None
    if not args.no_forwarder:
        forwarder = Forwarder(bootstrap_servers(), changelog_topics(APP_ID), group=f"{APP_ID}-forwarder")
        forwarder.start()
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True, override_logging=False)
    quiet_spinner(worker)
    server = worker_metrics.serve_worker(app, args.metrics_port)
    try:
        worker.execute_from_commandline()
    finally:
        if forwarder:
            forwarder.stop()
        if server:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
