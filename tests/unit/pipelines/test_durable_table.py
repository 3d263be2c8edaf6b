"""DurableTable's faust adaptations without a broker (faust's test context): a table write
goes to the changelog writer on the current event's partition, `written()` waits for it and
raises a failed write, and a rebalance waits for the writer's queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import pytest

from pipelines import durable_table
from pipelines.durable_table import DurableTable


class FakeWriter:
    """Records writes; `deliver` is the broker's ack of every write so far (or a failure)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, bytes, bytes]] = []
        self.delivered = 0
        self.handed = 0
        self.error: Exception | None = None
        self.flushed = 0

    def produce(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        self.writes.append((topic, partition, key, value))

    def deliver(self, error: Exception | None = None) -> None:
        if error:
            self.error = error
        else:
            self.delivered = len(self.writes)

    def mark(self) -> int:
        return len(self.writes)

    async def wait(self, mark: int) -> None:
        while True:
            if self.error:
                raise self.error
            if self.delivered >= mark:
                return
            await asyncio.sleep(0.001)

    def acked(self) -> dict[tuple[str, int], tuple[list[tuple[bytes, bytes]], int]]:
        out: dict[tuple[str, int], tuple[list[tuple[bytes, bytes]], int]] = {}
        if self.error:
            return out
        for i in range(self.handed, self.delivered):
            topic, partition, key, value = self.writes[i]
            out.setdefault((topic, partition), ([], i))[0].append((key, value))
        self.handed = self.delivered
        return out

    async def flush(self, timeout_s: float = 30.0) -> int:
        self.flushed += 1
        return 0


def run(body: Any) -> Any:
    app = faust.App(f"durable-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False, Table=DurableTable)
    table = app.Table("t", default=None, key_type=bytes, value_type=bytes, partitions=4)
    writer = FakeWriter()
    table._writer = writer
    table._changelog_writer = lambda: writer  # type: ignore[method-assign]
    topic = app.topic("in", key_type=bytes, value_type=bytes, partitions=4)
    result: dict[str, Any] = {}

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        async for event in stream.events():
            result.update(await body(table, writer, event))

    async def main() -> None:
        async with agent.test_context() as context:
            await context.put(b"v", key=b"k", partition=3)
            await asyncio.sleep(0.2)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return result


def test_a_write_goes_to_the_current_events_partition_and_written_waits_for_its_ack() -> None:
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        table[b"acct-1"] = b"state"
        waiting = asyncio.ensure_future(table.written())
        await asyncio.sleep(0.01)
        before = waiting.done()
        writer.deliver()
        await waiting
        return {"writes": writer.writes, "before": before, "partition": event.message.partition}

    out = run(body)
    [(topic, partition, key, value)] = out["writes"]
    assert topic.endswith("-t-changelog") and partition == out["partition"] == 3
    assert (key, value) == (b"acct-1", b"state") and out["before"] is False


def test_a_refused_write_raises_from_written() -> None:
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        table[b"acct-1"] = b"state"
        writer.deliver(RuntimeError("refused"))
        try:
            await table.written()
        except RuntimeError as exc:
            return {"error": str(exc)}
        return {"error": None}

    assert run(body)["error"] == "refused"


def test_a_rebalance_flushes_the_writer_first_and_marks_cached_values_stale() -> None:
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        before = table.generation
        await table.on_rebalance(set(), set(), set())
        return {"flushed": writer.flushed, "generations": (before, table.generation)}

    out = run(body)
    assert out["flushed"] == 1 and out["generations"] == (0, 1)


def test_values_read_while_recovery_replays_the_changelog_are_stale_after_it() -> None:
    """The chaos proof's money finding: faust replays a partition the worker kept over a
    rebalance from where its last recovery ended, so an account's value in the local store went
    back to an old state (hwm 2) while the replay ran. A timer of the worker (scan_due, which
    loads every account it owns) read it then and cached it under the rebalance's generation;
    after recovery the readings step billed 2,000 accounts from such old states (entries with
    another interval_start, balances off). A read during the
    replay must be stale once recovery completes, and a value the broker acknowledged during
    the replay must win over the replay's older records."""
    from faust.types import TP

    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        table[b"acct"] = b"hwm7"
        writer.deliver()
        await table.written()
        await table.on_rebalance(set(), set(), set())
        table.data[b"acct"] = b"hwm2"  # the replay reached an old record of the account
        read = (table.generation, table.data[b"acct"])  # what a timer's load cached then
        table[b"other"] = b"new"  # a write during the replay, acknowledged ...
        writer.deliver()
        await table.written()
        table.data[b"other"] = b"old"  # ... then the replay applied an older record of it
        table.data[b"acct"] = b"hwm7"  # the replay caught up
        active = {TP(table.changelog_topic.get_topic_name(), 3)}
        await table.on_recovery_completed(active, set())
        return {"read": read, "generation": table.generation, "acct": table.data[b"acct"],
                "other": table.data.get(b"other")}

    out = run(body)
    assert out["read"] == (1, b"hwm2") and out["generation"] != 1  # the cached hwm2 is stale now
    assert out["acct"] == b"hwm7" and out["other"] == b"new"


def test_the_local_store_gets_a_value_only_once_the_broker_has_it() -> None:
    """A restart from a RocksDB store must never find a value the changelog lacks."""
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        table[b"acct-1"] = b"new"
        before = table.data.get(b"acct-1")
        writer.deliver()
        await table.written()
        return {"before": before, "after": table.data.get(b"acct-1")}

    assert run(body) == {"before": None, "after": b"new"}


def test_written_waits_for_every_earlier_write_whoever_else_waits() -> None:
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        table[b"a"] = b"1"
        first = asyncio.ensure_future(table.written())  # e.g. a background ack
        await asyncio.sleep(0)
        table[b"b"] = b"2"
        second = asyncio.ensure_future(table.written())
        await asyncio.sleep(0.01)
        waiting = (first.done(), second.done())
        writer.deliver()
        await asyncio.gather(first, second)
        return {"waiting": waiting}

    assert run(body)["waiting"] == (False, False)


def test_the_faust_version_is_one_this_module_was_written_for() -> None:
    assert faust.__version__.startswith(durable_table.FAUST_VERSIONS)
    with pytest.raises(TypeError):  # outside a stream there is no current event: no partition to write
        app = faust.App(f"durable-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False, Table=DurableTable)
        app.Table("t2", default=None, key_type=bytes, value_type=bytes, partitions=4).partition_for_key(b"k")


class _Msg:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._t, self._p, self._o = topic, partition, offset

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


def test_the_writer_hands_out_values_only_as_far_as_the_broker_acknowledged_them() -> None:
    """Counts per partition (deliveries of a partition arrive in order), no future per write;
    a failed write stops every later hand-out and is raised to waiters."""
    writer = durable_table.ChangelogWriter("127.0.0.1:1", {"log_level": 0})  # never connects: deliveries are simulated
    for i in range(3):
        writer.produce("cl", 0, b"k%d" % i, b"v%d" % i)
    writer.produce("cl", 1, b"x", b"y")
    mark = writer.mark()
    assert not writer.done(mark) and writer.acked() == {}
    writer._on_delivery(None, _Msg("cl", 0, 10))
    writer._on_delivery(None, _Msg("cl", 0, 11))
    assert writer.acked() == {("cl", 0): ([(b"k0", b"v0"), (b"k1", b"v1")], 11)}
    assert writer.acked() == {}  # handed out once
    writer._on_delivery(None, _Msg("cl", 1, 5))
    assert not writer.done(mark)
    writer._on_delivery(None, _Msg("cl", 0, 12))
    assert writer.done(mark)
    assert writer.acked() == {("cl", 0): ([(b"k2", b"v2")], 12), ("cl", 1): ([(b"x", b"y")], 5)}
    writer.produce("cl", 0, b"k3", b"v3")
    writer.produce("cl", 0, b"k4", b"v4")
    writer._on_delivery("MSG_TIMED_OUT", _Msg("cl", 0, -1))
    writer._on_delivery(None, _Msg("cl", 0, 13))
    assert writer.acked() == {}  # memory is ahead of the changelog: nothing reaches the local store

    async def wait() -> None:
        await writer.wait(writer.mark())

    with pytest.raises(RuntimeError, match="cl\\[0\\] failed"):
        asyncio.run(wait())


def test_a_read_by_partition_looks_in_that_partitions_database_only(tmp_path: Any) -> None:
    """DurableTable.get_in on faust's real RocksDB store: one read in the key's partition
    database (faust probed every partition's database for a key outside its small index)."""
    from pipelines.durable_table import store_many

    app = faust.App(f"durable-rocks-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="rocksdb://",
                    datadir=str(tmp_path), web_enabled=False, Table=DurableTable)
    table = app.Table("t", default=None, key_type=bytes, value_type=bytes, partitions=4)
    store = table.data
    store_many(store, 2, [(b"acct-1", b"state")])
    store._key_index.clear()  # as after a restart: the index knows no key
    probed: list[int] = []
    opened = store._db_for_partition

    def db_for(partition: int) -> Any:
        probed.append(partition)
        return opened(partition)

    store._db_for_partition = db_for
    assert table.get_in(b"acct-1", 2) == b"state" and probed == [2]
    assert store._key_index[b"acct-1"] == 2
    assert table.get_in(b"acct-1", 1) is None and table.get_in(b"nobody", 2) is None
    # the memory store (tests, the demo) reads as before
    memory = faust.App(f"durable-mem-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                       web_enabled=False, Table=DurableTable).Table("m", default=None, key_type=bytes,
                                                                     value_type=bytes, partitions=4)
    store_many(memory.data, 1, [(b"acct-2", b"v")])
    assert memory.get_in(b"acct-2", 1) == b"v" and memory.get_in(b"none", 1) is None
