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
    """Records writes; resolves their futures when `deliver` is called (a broker's ack)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, bytes, bytes]] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.flushed = 0

    def produce(self, topic: str, partition: int, key: bytes, value: bytes, on_stored: Any = None) -> Any:
        self.writes.append((topic, partition, key, value))
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def deliver(self, error: Exception | None = None) -> None:
        for i, future in enumerate(self.futures):
            if not future.done():
                future.set_exception(error) if error else future.set_result((0, i))

    async def wait(self, futures: list[asyncio.Future[Any]]) -> None:
        await asyncio.gather(*futures)

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


def test_a_rebalance_flushes_the_writer_first() -> None:
    async def body(table: Any, writer: FakeWriter, event: Any) -> dict[str, Any]:
        await table.on_rebalance(set(), set(), set())
        return {"flushed": writer.flushed}

    assert run(body)["flushed"] == 1


def test_the_faust_version_is_one_this_module_was_written_for() -> None:
    assert faust.__version__.startswith(durable_table.FAUST_VERSIONS)
    with pytest.raises(TypeError):  # outside a stream there is no current event: no partition to write
        app = faust.App(f"durable-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False, Table=DurableTable)
        app.Table("t2", default=None, key_type=bytes, value_type=bytes, partitions=4).partition_for_key(b"k")
