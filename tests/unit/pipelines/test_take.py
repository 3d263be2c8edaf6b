"""take_steps on a faust agent (faust's test context: no broker): steps never exceed their
size, an idle step waits `within` for company, and messages that piled up while a step ran
are taken as soon as it ends instead of `within` later (what faust's take_events does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import faust
import pytest

from pipelines.take import bill_in_parts, take_steps, withhold

WITHIN = 0.4
SLOW_STEP = 0.3


def run_agent(puts: list[tuple[float, Any]], max_: int, *, step_s: float = 0.0, settle: float = 1.5,
              age: float | Callable[[Any], float] = 0.0, catchup: int | None = None, fill_s: float = 10.0,
              after_s: float = 5.0) -> tuple[float, list[tuple[float, list[Any]]]]:
    """Put each value at its offset (seconds), its Kafka timestamp `age` seconds in the past,
    into an agent that reads with take_steps and takes `step_s` per step; returns the start
    time and (time, values) of every step. Catch-up starts `after_s` behind (the tests' 5 s
    keeps their ages short; the default is take.CATCHUP_AFTER_S)."""
    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    steps: list[tuple[float, list[Any]]] = []

    @app.agent()
    async def agent(stream: Any) -> None:
        async for events in take_steps(stream, max_, WITHIN, catchup, catchup_after_s=after_s, catchup_fill_s=fill_s):
            steps.append((time.monotonic(), [event.value for event in events]))
            await asyncio.sleep(step_s)

    async def main() -> float:
        async with agent.test_context() as context:
            start = time.monotonic()
            for at, value in puts:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                await context.put(value, timestamp=time.time() - (age(value) if callable(age) else age))
            await asyncio.sleep(settle)
            return start

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main()), steps
    finally:
        loop.close()


def test_a_full_step_goes_at_once_and_what_came_during_it_follows_without_waiting() -> None:
    puts = [(0.0, v) for v in range(1, 6)] + [(0.05, v) for v in range(6, 9)]
    start, steps = run_agent(puts, 5, step_s=SLOW_STEP)
    assert [values for _, values in steps] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    first_at, second_at = steps[0][0] - start, steps[1][0] - start
    assert first_at < WITHIN / 2  # full: no wait
    # 6..8 waited through the slow step: taken when it ends, not WITHIN after it
    assert second_at - (first_at + SLOW_STEP) < WITHIN / 2


def test_an_idle_step_waits_within_for_more() -> None:
    start, steps = run_agent([(0.0, "a"), (0.1, "b")], 10)
    assert [values for _, values in steps] == [["a", "b"]]
    assert WITHIN * 0.8 <= steps[0][0] - start < WITHIN * 2


def test_every_value_once_in_order_over_many_steps() -> None:
    puts = [(i * 0.002, i) for i in range(200)]
    _, steps = run_agent(puts, 16, step_s=0.01)
    assert [v for _, values in steps for v in values] == list(range(200))
    assert max(len(values) for _, values in steps) <= 16


def test_behind_a_backlog_steps_fill_up() -> None:
    # messages produced long ago (a restart, a burst) arriving a few at a time: going at once
    # would bill tiny steps; the step waits to fill, as faust's take_events does
    puts = [(i * 0.01, i) for i in range(12)]
    _, steps = run_agent(puts, 12, age=5.0)
    assert [values for _, values in steps] == [list(range(12))]


def test_distinct_bills_a_message_once_per_step() -> None:
    """faust re-delivers the uncommitted tail after a rebalance (resume, then seek): a copy of
    a message in the same step is dropped, first copies keep their order, and messages that
    only share an offset (another partition or topic) are all kept."""
    from types import SimpleNamespace

    from pipelines.take import distinct

    def event(topic: str, partition: int, offset: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(topic=topic, partition=partition, offset=offset))

    a, b, c, d = event("r", 2, 53), event("r", 2, 54), event("r", 3, 53), event("p", 2, 53)
    step = [a, b, c, d, event("r", 2, 53), event("r", 2, 54)]
    assert distinct(step) == [a, b, c, d]
    assert distinct([a, b]) == [a, b]
    assert distinct([(0, 1), (0, 1), (1, 1)], lambda m: m) == [(0, 1), (1, 1)]


def _acked_after(body_raises: bool) -> list[bool]:
    """Put three values (one full step); the agent's step raises, or it goes on to wait for the
    next step; whether each event of the step was acked."""
    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    taken: list[Any] = []

    @app.agent()
    async def agent(stream: Any) -> None:
        steps = take_steps(stream, 3, WITHIN)
        try:
            async for events in steps:
                taken.extend(events)
                if body_raises:
                    raise RuntimeError("the step failed")
        except RuntimeError:
            await steps.aclose()

    async def main() -> list[bool]:
        async with agent.test_context() as context:
            for value in range(3):
                await context.put(value)
            await asyncio.sleep(0.3)
            return [event.message.acked for event in taken]

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_step_that_raised_leaves_its_events_unacked() -> None:
    # acked events are committed: a failed step's input must be delivered again after a restart
    assert _acked_after(body_raises=True) == [False, False, False]


def test_a_finished_step_is_acked_when_the_agent_asks_for_the_next() -> None:
    assert _acked_after(body_raises=False) == [True, True, True]


def test_withheld_events_are_not_acked_the_rest_are() -> None:
    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    taken: list[Any] = []

    @app.agent()
    async def agent(stream: Any) -> None:
        async for events in take_steps(stream, 4, WITHIN):
            taken.extend(events)
            # e.g. events of a partition that moved to another worker during a rebalance
            gone = withhold(events, lambda event: event.value % 2 == 0)
            assert [event.value for event in gone] == [1, 3]

    async def main() -> list[tuple[int, bool]]:
        async with agent.test_context() as context:
            for value in range(4):
                await context.put(value)
            await asyncio.sleep(0.3)
            return [(event.value, event.message.acked) for event in taken]

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [(0, True), (1, False), (2, True), (3, False)]
    finally:
        loop.close()


def test_behind_a_backlog_a_step_grows_to_its_catchup_size() -> None:
    """Behind a backlog a step may take more than its size (up to the catch-up size), so the
    per-account cost of a step is spread over several readings per account; live steps keep
    their size (test_every_value_once_in_order_over_many_steps)."""
    puts = [(i * 0.005, i) for i in range(40)]
    _, steps = run_agent(puts, 8, age=30.0, catchup=30)
    assert [v for _, values in steps for v in values] == list(range(40))
    assert max(len(values) for _, values in steps) == 30


def test_a_catchup_step_fills_while_the_backlog_keeps_coming() -> None:
    """A backlog delivered slower than a step's window (the fetcher is busy): the step keeps
    filling while messages come, up to its catch-up size, instead of going with what came in
    `within` (one poll cycle: the catch-up then ran at the live per-account rate); its fill
    time is bounded."""
    puts = [(i * 0.1, i) for i in range(24)]  # 4 per WITHIN
    _, steps = run_agent(puts, 2, age=30.0, catchup=16, settle=2.0)
    assert [v for _, values in steps for v in values] == list(range(24))
    # was 5 or so, what came in the first WITHIN; the first catch-up step takes 4x the live
    # size, the next one (the first billed fast) its ceiling
    assert [len(values) for _, values in steps] == [8, 16]
    _, bounded = run_agent(puts, 2, age=30.0, catchup=16, fill_s=0.7, settle=2.0)
    assert [v for _, values in bounded for v in values] == list(range(24))
    assert 4 <= len(bounded[0][1]) <= 10  # WITHIN + 0.7 s of puts, not the catch-up size


def test_a_catchup_step_stops_filling_at_live_input() -> None:
    """Two messages of a backlog, then live ones every 0.12 s: the catch-up step goes once it
    holds a live message; it does not fill on through the live stream (it took all five,
    until the input paused)."""
    puts = [(0.0, 0), (0.0, 1)] + [(0.12 * (i + 1), 2 + i) for i in range(3)]
    _, steps = run_agent(puts, 8, age=lambda v: 30.0 if v < 2 else 0.0, catchup=64, settle=1.0)
    assert [v for _, values in steps for v in values] == list(range(5))
    assert steps[0][1] == [0, 1, 2]


@pytest.mark.parametrize("live_size", [16, 2])
def test_a_catchup_step_fills_until_the_input_is_nearly_live(live_size: int) -> None:
    """A backlog, then messages 2 s old (under the 5 s that starts a catch-up), then live ones:
    the step fills through the 2 s old ones and goes at the first live one. Ending it at the
    first message under 5 s old kept a worker 5 s behind for good (350,000 merchants). With a
    live size of 2 the step holds more than its live size once the 2 s old messages come, and
    used to count as full there while the fill went on to 1 s: at 350,000 merchants steps of
    256 messages still stopped 2-7 s behind."""
    puts = [(0.0, 0), (0.0, 1)] + [(0.12 * (i + 1), 2 + i) for i in range(5)]
    ages = {0: 30.0, 1: 30.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: 0.0, 6: 0.0}
    _, steps = run_agent(puts, live_size, age=lambda v: ages[v], catchup=64, settle=1.0)
    assert [v for _, values in steps for v in values] == list(range(7))
    assert steps[0][1] == [0, 1, 2, 3, 4, 5]


def test_a_live_worker_a_little_behind_keeps_its_step_size() -> None:
    # messages a second old: the last step ran long, not a backlog; growing the step to the
    # catch-up size here held a 350,000-merchant worker's event loop for tens of seconds
    puts = [(i * 0.005, i) for i in range(40)]
    _, steps = run_agent(puts, 8, age=1.0, catchup=30)
    assert [v for _, values in steps for v in values] == list(range(40))
    assert max(len(values) for _, values in steps) == 8


def test_by_default_a_worker_less_than_two_cycles_behind_keeps_its_step_size() -> None:
    """Less than CATCHUP_AFTER_S (120 s) behind, a step holds at most one poll cycle at the
    longest cadence: one reading per account, dearer per message in a big step than in live
    ones. A worker 30 s behind takes live-size steps back to back; 150 s behind, it grows them."""
    from pipelines.take import CATCHUP_AFTER_S

    assert CATCHUP_AFTER_S == 120.0
    puts = [(i * 0.005, i) for i in range(40)]
    _, steps = run_agent(puts, 8, age=30.0, catchup=30, after_s=CATCHUP_AFTER_S)
    assert [v for _, values in steps for v in values] == list(range(40))
    assert max(len(values) for _, values in steps) == 8
    _, deep = run_agent(puts, 8, age=150.0, catchup=30, after_s=CATCHUP_AFTER_S)
    assert max(len(values) for _, values in deep) == 30


def test_the_workers_counting_wrapper_takes_what_take_steps_takes() -> None:
    """The worker reads through pipelines.worker_metrics.take_steps (counts each step): it must
    pass the catch-up sizes on (a wrapper without them crashed the readings agent)."""
    from inspect import signature

    from pipelines import take, worker_metrics

    assert signature(worker_metrics.take_steps).parameters.keys() == signature(take.take_steps).parameters.keys()


def test_the_catchup_size_follows_the_billing_time() -> None:
    """CatchupSize: steps that bill slowly shrink the next catch-up step towards what fits in
    its time (never below the live size), fast ones let it grow (at most 4x per step, up to
    the ceiling); steps below the live size change nothing."""
    from pipelines.take import CatchupSize

    size = CatchupSize(256, 16384, step_s=20.0)
    assert size.current == 1024
    size.observe(1024, 2.0)  # 10x faster than the budget: grows 4x, not 10x
    assert size.current == 4096
    size.observe(4096, 80.0)  # 4x slower than the budget: what fits in 20 s
    assert size.current == 1024
    size.observe(100, 500.0)  # a small step: its fixed cost says nothing
    assert size.current == 1024
    size.observe(1024, 1000.0)  # very slow: the live size, no less
    assert size.current == 256
    for _ in range(5):
        size.observe(size.current, 0.5)
    assert size.current == 16384


def test_catchup_goes_on_across_steps_until_the_input_is_nearly_live() -> None:
    """A catch-up step that ends on its fill time with input still 2 s old: the next step is
    a catch-up step too (it grows past the live size), not a live one that left the worker
    2 s behind."""
    puts = [(0.0, 0), (0.0, 1)] + [(0.1 * (i + 1), 2 + i) for i in range(12)]
    ages = {v: (30.0 if v < 2 else 2.0 if v < 13 else 0.0) for v in range(14)}
    _, steps = run_agent(puts, 2, age=lambda v: ages[v], catchup=64, fill_s=0.5, settle=1.5)
    assert [v for _, values in steps for v in values] == list(range(14))
    assert len(steps[0][1]) < 13  # the fill time ended the first step ...
    assert len(steps[1][1]) > 2  # ... and the second one still filled past the live size
    assert steps[-1][1][-1] == 13


def _parts_run(moved_after: int | None) -> tuple[list[str], list[str], set[int]]:
    """Bill four parts (partitions 0, 0, 1, 2) while another task runs; the partitions move
    away once `moved_after` parts are billed. Returns the order of events, the parts billed
    and the partitions left."""
    parts = [(frozenset({0}), "p0a"), (frozenset({0}), "p0b"), (frozenset({1}), "p1"), (frozenset({2}), "p2")]
    order: list[str] = []
    billed: list[str] = []

    def bill(part: str) -> None:
        billed.append(part)
        order.append(part)

    def still_mine(partitions: frozenset[int]) -> bool:
        return moved_after is None or len(billed) < moved_after

    async def main() -> set[int]:
        async def other() -> None:  # a timer or a top-up agent of the same event loop
            for _ in range(3):
                order.append("other")
                await asyncio.sleep(0)
        task = asyncio.ensure_future(other())
        left = await bill_in_parts(parts, bill, still_mine)
        await task
        return left
    return order, billed, asyncio.run(main())


def test_parts_are_billed_in_order_and_the_event_loop_runs_between_them() -> None:
    order, billed, left = _parts_run(None)
    assert billed == ["p0a", "p0b", "p1", "p2"] and left == set()
    # the other task ran between parts, not only before or after the step
    assert order.index("other") < order.index("p2") and order[0] == "p0a"


def test_a_step_stops_at_a_part_whose_partition_moved_and_names_what_is_left() -> None:
    order, billed, left = _parts_run(moved_after=1)
    assert billed == ["p0a"]
    assert left == {0, 1, 2}  # partition 0 is half billed: its messages are not acked either
    _, billed, left = _parts_run(moved_after=3)
    assert billed == ["p0a", "p0b", "p1"] and left == {2}
    # moved before the first part (while the worker read the step's envelopes): nothing billed
    _, billed, left = _parts_run(moved_after=0)
    assert billed == [] and left == {0, 1, 2}


def _run(coro: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


def test_what_arrives_during_a_step_fills_the_next_steps_buffer() -> None:
    """While a step is billed, arriving events move into the next step's buffer (up to its
    size), so the next step is ready when this one ends: a catch-up step at 350,000
    merchants filled for 3-8 s after each minute of billing, and only with what 10 s of
    fetching brought. Events beyond the next step's size stay in the buffer for the step
    after, and the buffer holds their partition back from the fetcher (faust's flow control)
    instead of stopping the stream: a stopped stream let the agent's queue fill, and faust's
    one fetch loop then waited to put into it, so every other topic (top-ups) waited for the
    whole step (60-80 s at 350,000 merchants)."""
    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    steps: list[list[int]] = []
    first_ended: list[float] = []
    put_done: dict[int, float] = {}
    flow: list[tuple[str, float]] = []
    app.consumer.on_buffer_full = lambda tp: flow.append(("hold", time.monotonic()))
    app.consumer.on_buffer_drop = lambda tp: flow.append(("release", time.monotonic()))

    @app.agent()
    async def agent(stream: Any) -> None:
        async for events in take_steps(stream, 4, WITHIN):
            steps.append([event.value for event in events])
            if len(steps) == 1:
                await asyncio.sleep(0.5)  # 4..9 are put meanwhile
                first_ended.append(time.monotonic())

    async def main() -> None:
        async with agent.test_context() as context:
            for value in range(4):
                await context.put(value)
            await asyncio.sleep(0.1)
            for value in range(4, 10):
                await context.put(value)  # returns once the agent's stream took the event
                put_done[value] = time.monotonic()
            await asyncio.sleep(1.0)

    _run(main())
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # 4..7 went into the next step's buffer during the first step (before session 10 the
    # stream stopped at 4 until the step ended); since session 11 8 and 9 go in too, and
    # the partition is held from the fetcher until the step ends
    assert put_done[9] < first_ended[0], (put_done, first_ended)
    holds = [at for what, at in flow if what == "hold"]
    releases = [at for what, at in flow if what == "release"]
    assert max(holds) < first_ended[0] <= releases[-1], (flow, first_ended)
    assert not [r for r in releases if max(holds) < r < first_ended[0]], flow  # held to the step's end


def test_a_buffer_filled_during_a_step_is_cut_to_what_the_sizer_allows() -> None:
    """Behind a backlog the next buffer may fill to what the sizer could allow next
    (CatchupSize.ahead); once the step was observed the step takes what it does allow and
    the rest goes on to the step after, every event once and in order. (The step sizes are
    what the old code gave too: this pins the cut, not the fill; the fill is the test above.)"""
    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    steps: list[list[int]] = []

    @app.agent()
    async def agent(stream: Any) -> None:
        # a step of 8 taking 0.2 s with 0.05 s allowed: the sizer falls back to its floor (2)
        async for events in take_steps(stream, 2, WITHIN, 16, catchup_after_s=5.0, catchup_step_s=0.05,
                                       catchup_fill_s=1.0):
            steps.append([event.value for event in events])
            await asyncio.sleep(0.2)

    async def main() -> None:
        async with agent.test_context() as context:
            for value in range(20):
                await context.put(value, timestamp=time.time() - 30)
            await asyncio.sleep(3.0)

    _run(main())
    assert [v for step in steps for v in step] == list(range(20))
    assert len(steps[0]) == 8  # 4x the live size
    assert len(steps[1]) == 2  # the sizer's 2, whatever the buffer held meanwhile


def _drain(sizer: Any, shaped: bool, backlog_msgs: int = 40_000, owned: int = 350_000,
           per_msg: int = 88) -> tuple[float, list[tuple[int, float]]]:
    """Catch-up of a backlog in offset order at 350,000 merchants (4,000 messages per poll
    cycle), each step costing what session 9 measured on the live worker: 154 us per account
    billed, 8.6 us per reading (a one-cycle step 57 s, a four-cycle step 66 s)."""
    left, total, steps = backlog_msgs, 0.0, []
    while left > 0:
        n = min(left, sizer.current)
        accounts, readings = min(owned, per_msg * n), per_msg * n
        seconds = 154e-6 * accounts + 8.6e-6 * readings
        if shaped:
            sizer.note_shape(accounts, readings, owned)
        sizer.observe(n, seconds)
        left -= n
        total += seconds
        steps.append((n, seconds))
    return total, steps


def test_a_shaped_sizer_takes_steps_of_several_cycles_where_the_per_message_one_stays_near_one() -> None:
    """Told each step's accounts and readings, the sizer learns that a message past the
    portfolio's first cycle costs only its readings, and grows steps to several cycles within
    their time; estimating per message, it kept them near one cycle (each account billed once
    per reading: catch-up at 1.6x the offered rate in session 10)."""
    from pipelines.take import CatchupSize

    per_message, _ = _drain(CatchupSize(256, 32768, step_s=90.0), shaped=False)
    shaped, steps = _drain(CatchupSize(256, 32768, step_s=90.0, growth=16), shaped=True)
    assert shaped < 0.6 * per_message, (shaped, per_message, steps)
    assert max(n for n, _ in steps) > 3 * 4_000  # a step of more than three poll cycles
    assert all(seconds <= 90.0 * 1.05 for _, seconds in steps), steps  # and none over its time


def test_the_step_cost_fit_recovers_per_account_and_per_reading_costs() -> None:
    """Two steps of different readings per account pin both costs; one step alone uses the
    prior split, which over-rates readings (the estimate errs long, the step small)."""
    from pipelines.take import StepCost

    cost = StepCost()
    cost.observe(350_000, 350_000, 154e-6 * 350_000 + 8.6e-6 * 350_000)
    assert cost.per_reading_s == pytest.approx(0.2 * cost.per_account_s)
    cost.observe(350_000, 1_400_000, 154e-6 * 350_000 + 8.6e-6 * 1_400_000)
    assert cost.per_account_s == pytest.approx(154e-6, rel=1e-6)
    assert cost.per_reading_s == pytest.approx(8.6e-6, rel=1e-6)
    # within 90 s: every owned account, and readings for the rest of the budget
    n = cost.messages_within(90.0, 4_000, 350_000, 352_000, 350_000)
    assert n == int((90.0 - 154e-6 * 350_000) / (8.6e-6 * 88))
    # a budget below one cycle: fewer messages, accounts still growing with them
    n = cost.messages_within(10.0, 1_000, 88_000, 88_000, 350_000)
    assert n == int(10.0 / (88 * (154e-6 + 8.6e-6)))


def test_holding_gives_faust_its_own_partition_type() -> None:
    """A message may carry aiokafka's TopicPartition; faust's flow control asserts its own TP
    on every fetch, so holding one as it came crashed the fetcher (chaos run, session 11)."""
    from aiokafka import TopicPartition
    from faust.types import TP

    from pipelines.take import Holding

    app = faust.App(f"take-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    consumer = app.consumer
    consumer._active_partitions = {TP("t", 0), TP("t", 1)}
    consumer.held_by_steps = set()
    holding = Holding(app)
    holding.hold(TopicPartition("t", 0))
    assert consumer._get_active_partitions() == {TP("t", 1)}  # faust's assert holds
    assert consumer._buffered_partitions == {TP("t", 0)} and consumer.held_by_steps == {TP("t", 0)}
    holding.release()
    assert consumer._get_active_partitions() == {TP("t", 0), TP("t", 1)}
    assert not consumer._buffered_partitions and not consumer.held_by_steps
