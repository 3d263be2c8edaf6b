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
stream event).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import faust
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
    """confluent-kafka producer for table changelogs; futures resolve on the event loop."""

    def __init__(self, bootstrap: str, extra: dict[str, Any] | None = None) -> None:
        from confluent_kafka import Producer

        from infra.kafka_security import secured

        self._producer = Producer(secured({
            "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, "compression.type": "lz4", "batch.size": 1_048_576,
            "queue.buffering.max.kbytes": 262_144, **(extra or {})}))

    def produce(self, topic: str, partition: int, key: bytes, value: bytes | None,
                on_stored: Any = None) -> asyncio.Future[Any]:
        """Queue one write; the future gets (partition, offset) once the broker has it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def delivered(err: Any, msg: Any) -> None:  # runs inside poll(), on the loop's thread
            if future.done():
                return
            if err is not None:
                future.set_exception(RuntimeError(f"changelog write to {topic}[{partition}] failed: {err}"))
            else:
                future.set_result((msg.partition(), msg.offset()))
                if on_stored is not None:
                    on_stored(msg.partition(), msg.offset())

        while True:
            try:
                self._producer.produce(topic, key=key, value=value, partition=partition, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.01)
        return future

    async def wait(self, futures: list[asyncio.Future[Any]]) -> None:
        """Until every future is resolved (delivery reports are served while waiting)."""
        started = time.monotonic()
        warned = False
        while not all(f.done() for f in futures):
            self._producer.poll(0)
            if not all(f.done() for f in futures):
                await asyncio.sleep(0.001)
                if not warned and time.monotonic() - started > SLOW_WRITE_S:
                    warned = True  # the agent (and its input's commits) waits meanwhile
                    log.warning("changelog writes unacknowledged for %.0f s: %s of %s pending, %s queued",
                                time.monotonic() - started, sum(not f.done() for f in futures), len(futures),
                                len(self._producer))
        for f in futures:
            f.result()  # raises a failed write

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
        self._unacknowledged: list[Any] = []
        self._writer: ChangelogWriter | None = None
        self.generation = 0  # +1 on every rebalance and recovery: values cached by callers may be stale
        self._stored_offsets: dict[TP, int] = {}  # newest changelog offset in the local store
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
            fut: Any = self.send_changelog(partition, key, value)
        else:
            topic = self.changelog_topic.get_topic_name()
            fut = writer.produce(topic, partition, key, value, self._stored_at(topic, key, value))
        self._unacknowledged.append(fut)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def _stored_at(self, topic: str, key: bytes, value: bytes) -> Any:
        def stored(partition: int, offset: int) -> None:
            store_locally(self.data, partition, key, value)
            if self._recovering:  # the replay may put an older record of this key over it
                self._acked_in_recovery[key] = (partition, value)
            tp = TP(topic, partition)
            self._stored_offsets[tp] = max(offset, self._stored_offsets.get(tp, -1))
        return stored

    def _persist_offsets(self) -> None:
        """What faust's own send callback does per write, once per partition and wait: RocksDB
        keeps the newest offset it holds, to resume after a restart (an offset lagging its
        values only means re-reading a few changelog records)."""
        for tp, offset in self._stored_offsets.items():
            self.data.set_persisted_offset(tp, offset)
        self._stored_offsets.clear()

    async def written(self) -> None:
        """Wait until the broker has acknowledged every write made so far (raises if one failed)."""
        # Every caller waits for every write made before it called, whoever else is waiting:
        # the readings agent acks in the background while other agents wait for theirs.
        pending = list(self._unacknowledged)
        if not pending:
            return
        try:
            if self._writer is not None:
                await self._writer.wait([f for f in pending if isinstance(f, asyncio.Future)])
            others = [f for f in pending if not isinstance(f, asyncio.Future)]
            if others:
                await asyncio.gather(*others)
        finally:
            self._unacknowledged = [f for f in self._unacknowledged if not f.done()]
            self._persist_offsets()

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        # every write made here is in the log before a new owner recovers the partitions
        if self._writer is not None:
            remaining = await self._writer.flush(30.0)
            if remaining:
                raise RuntimeError(f"{remaining} changelog write(s) not stored before a rebalance")
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
            await self._writer.flush(30.0)  # every write made so far is acknowledged and stored
        await super().on_recovery_completed(active_tps, standby_tps)
        mine = {tp.partition for tp in active_tps}
        for key, (partition, value) in self._acked_in_recovery.items():
            if partition in mine:
                store_locally(self.data, partition, key, value)
        self._acked_in_recovery.clear()
        self._recovering = False
        self.generation += 1


def store_locally(store: Any, partition: int, key: bytes, value: bytes) -> None:
    """Put an acknowledged value into the table's local store: the RocksDB store picks its
    partition database from the current stream event, and a delivery report has none."""
    if hasattr(store, "_db_for_partition"):  # faust.stores.rocksdb.Store
        store._db_for_partition(partition).put(key, value)
        store._key_index[key] = partition
    else:  # the memory store
        store[key] = value
