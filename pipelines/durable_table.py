"""A faust Table whose writes the agent can wait for, written through librdkafka.

Why waiting: faust commits an input offset once the event is acked and `producer.flush()`
returns, but that flush gives up on a message that takes longer than 0.1 s to leave its
buffer (faust/transport/producer.py, flush_atmost), so under load an offset can be committed
before the state change it caused is in the changelog; a kill -9 then loses the change. The
billing agents therefore wait for their own changelog writes to be acknowledged by the
broker before they let their events be acked: a committed offset always has its state
change (and the outputs in its outbox) durable.

Why librdkafka: a billing step writes one value per account it touched, so at portfolio
scale a step writes tens of thousands of values. faust's changelog send (aiokafka, pure
Python, plus faust's FutureMessage bookkeeping) costs tens of microseconds of the worker's
core per value; confluent-kafka's produce costs about 3 us and batches in its own thread.
The writer is idempotent with acks=all, so a partition's writes stay in order, exactly as
with faust's producer. On a rebalance the writer is flushed before partitions move, so a
new owner recovers every write this worker made.

Why the local store is written after the broker's ack: with faust's RocksDB store a
restarted worker resumes from its local state and reads the changelog only from the offset
it stored. faust writes the local store before the changelog, so a kill -9 between the two
left a local value the changelog never got: the restarted worker skipped the input as
applied (its mark is in that value), and the change and its outputs were never published.
Here a value reaches the local store only once it is in the changelog. Until then the
caller reads its own newest values from its own cache (`generation` says when a rebalance
or the end of its recovery made that cache stale: see on_recovery_completed).

faust internals used here (faust-streaming 0.15.x, checked by FAUST_VERSIONS and tested in
tests/unit/pipelines/test_durable_table.py): Table.__setitem__/on_key_set (the write hook),
Collection.partition_for_key (the current event's partition), _maybe_set_key_ttl,
_sensor_on_set, on_rebalance, on_recovery_completed, data.set_persisted_offset (RocksDB's
restart offsets), and the RocksDB store's _db_for_partition/_key_index (a write outside a
stream event, and `get_in`: a read by partition).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP

log = logging.getLogger("mallwatt.changelog")

#: faust versions whose Table internals this module was written against.
FAUST_VERSIONS = ("0.15.",)
if not faust.__version__.startswith(FAUST_VERSIONS):  # pragma: no cover - a pin bump must re-check
    raise ImportError(f"pipelines.durable_table adapts faust {FAUST_VERSIONS}, not {faust.__version__}: "
                      "re-check Table.on_key_set/partition_for_key/on_rebalance and update FAUST_VERSIONS")

#: A wait for changelog acknowledgements longer than this is logged (once per wait).
SLOW_WRITE_S = 10.0

#: "faust" keeps faust's own changelog producer (slower; for comparison runs).
WRITER = os.environ.get("MALLWATT_CHANGELOG_WRITER", "librdkafka")


class ChangelogWriter:
    """confluent-kafka producer for table changelogs, counted per partition.

    Why no future or closure per write: a step at portfolio scale writes tens of thousands of
    values, and a future, a delivery closure and a scan over every pending future per poll
    cost more of the worker's core than the produce itself. Deliveries of one partition are
    reported in order (idempotent producer, acks=all), so a count per (topic, partition) says
    which writes are stored: `mark()` snapshots what was produced, `wait(mark)` returns once
    every partition's delivered count reaches it, and `acked()` hands out the values the
    broker has, in order, for the local store. One shared delivery callback counts; any
    failed write is kept and raised to every waiter (the worker then stops)."""

    def __init__(self, bootstrap: str, extra: dict[str, Any] | None = None) -> None:
        from confluent_kafka import Producer

        from infra.kafka_security import secured

        self._producer = Producer(secured({
            "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, "compression.type": "lz4", "batch.size": 1_048_576,
            "queue.buffering.max.kbytes": 262_144, **(extra or {})}))
        self._produced: dict[tuple[str, int], int] = {}
        self._delivered: dict[tuple[str, int], int] = {}
        self._offsets: dict[tuple[str, int], int] = {}  # newest delivered offset
        self._pending: dict[tuple[str, int], deque[tuple[bytes, bytes | None]]] = {}  # not yet handed out
        self._handed: dict[tuple[str, int], int] = {}  # writes handed out by acked()
        self.error: Exception | None = None

    def _on_delivery(self, err: Any, msg: Any) -> None:  # runs inside poll(), on the loop's thread
        tp = (msg.topic(), msg.partition())
        if err is not None:
            if self.error is None:
                self.error = RuntimeError(f"changelog write to {tp[0]}[{tp[1]}] failed: {err}")
            return
        self._delivered[tp] = self._delivered.get(tp, 0) + 1
        self._offsets[tp] = msg.offset()

    def produce(self, topic: str, partition: int, key: bytes, value: bytes | None) -> None:
        """Queue one write (its value reaches `acked()` once the broker has it)."""
        tp = (topic, partition)
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, partition=partition,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.01)
        self._produced[tp] = self._produced.get(tp, 0) + 1
        pending = self._pending.get(tp)
        if pending is None:
            pending = self._pending[tp] = deque()
        pending.append((key, value))

    def mark(self) -> dict[tuple[str, int], int]:
        """What was produced so far, per partition (for `wait`)."""
        return dict(self._produced)

    def done(self, mark: dict[tuple[str, int], int]) -> bool:
        return all(self._delivered.get(tp, 0) >= n for tp, n in mark.items())

    async def wait(self, mark: dict[tuple[str, int], int]) -> None:
        """Until every write of `mark` is delivered (raises if any write failed)."""
        started = time.monotonic()
        warned = False
        while True:
            self._producer.poll(0)
            if self.error is not None:
                raise self.error
            if self.done(mark):
                return
            await asyncio.sleep(0.001)
            if not warned and time.monotonic() - started > SLOW_WRITE_S:
                warned = True  # the agent (and its input's commits) waits meanwhile
                pending = sum(max(0, n - self._delivered.get(tp, 0)) for tp, n in mark.items())
                log.warning("changelog writes unacknowledged for %.0f s: %s of %s pending, %s queued",
                            time.monotonic() - started, pending, sum(mark.values()), len(self._producer))

    def acked(self) -> dict[tuple[str, int], tuple[list[tuple[bytes, bytes | None]], int]]:
        """The writes the broker has stored and not handed out before, per partition in order,
        with the partition's newest stored offset. Nothing once a write failed: the caller's
        memory is then ahead of the changelog and it must stop, not store."""
        out: dict[tuple[str, int], tuple[list[tuple[bytes, bytes | None]], int]] = {}
        if self.error is not None:
            return out
        for tp, delivered in self._delivered.items():
            ready = delivered - self._handed.get(tp, 0)
            if ready <= 0:
                continue
            pending = self._pending[tp]
            out[tp] = ([pending.popleft() for _ in range(ready)], self._offsets[tp])
            self._handed[tp] = delivered
        return out

    async def flush(self, timeout_s: float = 30.0) -> int:
        """Until every queued write is delivered (delivery reports run on this thread); returns
        how many are still queued after `timeout_s`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (left := self._producer.flush(0)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        return left


class DurableTable(faust.Table):
    """faust.Table that remembers its changelog writes until `written()` is awaited."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unacknowledged: list[Any] = []  # faust's own send futures (MALLWATT_CHANGELOG_WRITER=faust)
        self._writer: ChangelogWriter | None = None
        self.generation = 0  # +1 on every rebalance and recovery: values cached by callers may be stale
        self._topic_name: str | None = None
        self._recovering = False  # from a rebalance until its recovery completed
        self._acked_in_recovery: dict[Any, tuple[int, Any]] = {}  # key -> (partition, value) acked meanwhile

    def __setitem__(self, key: Any, value: Any) -> None:
        # ManagedUserDict.__setitem__ is on_key_set, then the local store; with the writer the
        # local store is written when the broker acknowledges the changelog record (above)
        self.on_key_set(key, value)
        if self._changelog_writer() is None:
            self.data[key] = value

    def _changelog_writer(self) -> ChangelogWriter | None:
        if WRITER != "librdkafka":
            return None
        if self._writer is None:
            bootstrap = ",".join(f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker)
            self._writer = ChangelogWriter(bootstrap)
        return self._writer

    def on_key_set(self, key: Any, value: Any) -> None:
        # faust.Table.on_key_set, keeping the future of the changelog write
        partition = self.partition_for_key(key)
        assert partition is not None
        writer = self._changelog_writer()
        if writer is None:
            self._unacknowledged.append(self.send_changelog(partition, key, value))
        else:
            writer.produce(self.changelog_topic.get_topic_name(), partition, key, value)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        """`table[key] = value` for a caller that knows the key's partition, without a current
        stream event (a billing step writes thousands of accounts; setting faust's event
        context per write cost more than the write). With faust's own writer it falls back to
        that context."""
        writer = self._changelog_writer()
        if writer is None:
            token = _current_event.set(weakref.ref(_PartitionEvent(partition)))  # type: ignore[arg-type]
            try:
                self[key] = value
            finally:
                _current_event.reset(token)
            return
        writer.produce(self._topic_name or self._name_topic(), partition, key, value)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def get_in(self, key: bytes, partition: int) -> bytes | None:
        """The stored value of `key`, whose partition the caller knows (None: none stored).

        Why: faust's RocksDB store looks a key up in its partition's database only with a
        current stream event, or when the key is among the last 1,000 it indexed
        (`table_key_index_size`); a billing step has no event per account, so every other key
        was probed in each partition database in turn. After a restart or a lost session at
        350,000 accounts that was most of the worker's time (72 % of a py-spy sample)."""
        store = self.data
        if hasattr(store, "_db_for_partition") and getattr(store, "use_rocksdict", False):
            value = store._db_for_partition(partition).get(key)
            if value is not None:
                store._key_index[key] = partition
            return value
        return self.get(key)

    def _name_topic(self) -> str:
        self._topic_name = self.changelog_topic.get_topic_name()
        return self._topic_name

    def _store_acked(self) -> None:
        """Put what the broker has acknowledged into the local store, one batch per partition,
        and let RocksDB keep the newest offset it holds, to resume after a restart (what
        faust's own send callback does per write)."""
        if self._writer is None:
            return
        for (topic, partition), (writes, offset) in self._writer.acked().items():
            store_many(self.data, partition, writes)
            if self._recovering:  # the replay may put an older record of these keys over them
                for key, value in writes:
                    self._acked_in_recovery[key] = (partition, value)
            self.data.set_persisted_offset(TP(topic, partition), offset)

    async def written(self) -> None:
        """Wait until the broker has acknowledged every write made so far (raises if one failed)."""
        # Every caller waits for every write made before it called, whoever else is waiting:
        # the readings agent acks in the background while other agents wait for theirs.
        others = list(self._unacknowledged)
        try:
            if self._writer is not None:
                await self._writer.wait(self._writer.mark())
            if others:
                await asyncio.gather(*others)
        finally:
            self._unacknowledged = [f for f in self._unacknowledged if not f.done()]
            self._store_acked()

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        # every write made here is in the log before a new owner recovers the partitions
        if self._writer is not None:
            remaining = await self._writer.flush(30.0)
            if remaining:
                raise RuntimeError(f"{remaining} changelog write(s) not stored before a rebalance")
            self._store_acked()
        self.generation += 1
        self._recovering = True
        self._acked_in_recovery.clear()
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """faust replays a partition this worker kept over a rebalance from where its last
        recovery ended (with the memory store: its own writes since then), and a newly assigned
        one from its start: until the replay ends, a key's value in the local store goes back
        in time and forward again. Whatever a caller read meanwhile may be old, so `generation`
        moves (read again); a value the broker acknowledged meanwhile may have been overwritten
        by an older record of the replay, so it is put back."""
        if self._writer is not None:
            await self._writer.flush(30.0)  # every write made so far is acknowledged ...
            self._store_acked()  # ... and stored
        await super().on_recovery_completed(active_tps, standby_tps)
        mine = {tp.partition for tp in active_tps}
        by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key, (partition, value) in self._acked_in_recovery.items():
            if partition in mine:
                by_partition.setdefault(partition, []).append((key, value))
        for partition, writes in by_partition.items():
            store_many(self.data, partition, writes)
        self._acked_in_recovery.clear()
        self._recovering = False
        self.generation += 1


class _PartitionEvent:
    """Stands in for the current event: faust takes a write's partition from it."""

    def __init__(self, partition: int) -> None:
        self.message = type("M", (), {"partition": partition, "topic": ""})()


def store_many(store: Any, partition: int, writes: list[tuple[bytes, bytes | None]]) -> None:
    """Put acknowledged writes (in order; None deletes) into the table's local store: with
    RocksDB one WriteBatch per partition (its database is picked by partition: a delivery
    report has no current stream event)."""
    if hasattr(store, "_db_for_partition") and getattr(store, "use_rocksdict", False):  # faust's RocksDB store
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        index = store._key_index
        for key, value in writes:
            if value is None:
                batch.delete(key)
                index.pop(key, None)
            else:
                batch.put(key, value)
                index[key] = partition
        store._db_for_partition(partition).write(batch)
    else:  # the memory store (or python-rocksdb: one put per write)
        for key, value in writes:
            if hasattr(store, "_db_for_partition"):
                store_locally(store, partition, key, value)  # type: ignore[arg-type]
            elif value is None:
                store.pop(key, None)
            else:
                store[key] = value


def store_locally(store: Any, partition: int, key: bytes, value: bytes) -> None:
    """Put an acknowledged value into the table's local store: the RocksDB store picks its
    partition database from the current stream event, and a delivery report has none."""
    if hasattr(store, "_db_for_partition"):  # faust.stores.rocksdb.Store
        store._db_for_partition(partition).put(key, value)
        store._key_index[key] = partition
    else:  # the memory store
        store[key] = value
