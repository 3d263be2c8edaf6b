"""The strict consumer (pipelines/faust_consumer.py) without a broker: its offset rules, its
commit floor inside faust's commit path, its fetch loop driven by scripted fetches (the
race the chaos proof met: messages fetched before a seek arriving after it), and a check
that faust's own loop is still the one the rewrite follows."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from faust.types.tuples import Message

from pipelines import faust_consumer as fc
from pipelines.strict_offsets import StrictOffsets, Verdict

TP0 = TP("in", 0)


def test_delivers_in_order_from_the_sought_offset_and_drops_copies_and_early_messages() -> None:
    book = StrictOffsets()
    assert book.verdict(TP0, 7) is Verdict.UNPOSITIONED  # fetched before the seek: fetched again after it
    book.positioned(TP0, 10)
    assert book.verdict(TP0, 9) is Verdict.COPY
    assert book.verdict(TP0, 10) is Verdict.DELIVER
    book.delivered(TP0, 10)
    assert book.verdict(TP0, 10) is Verdict.COPY
    assert book.verdict(TP0, 11) is Verdict.DELIVER
    book.revoked([TP0])
    assert book.verdict(TP0, 11) is Verdict.UNPOSITIONED
    book.delivered(TP0, 11)  # its delivery ended after the revocation
    assert book.verdict(TP0, 12) is Verdict.UNPOSITIONED and TP0 not in book.floor


def test_a_jump_seeks_back_once_per_batch_and_only_a_lasting_one_is_taken_as_gone() -> None:
    book = StrictOffsets(max_gap_reseeks=2)
    book.positioned(TP0, 953)
    for _ in range(2):  # two batches showing the jump: each seeks back
        book.new_batch()
        assert book.verdict(TP0, 970) is Verdict.GAP
        assert book.verdict(TP0, 971) is Verdict.STALE  # same batch: sought back once, counted once
    book.new_batch()
    assert book.verdict(TP0, 970) is Verdict.GONE  # the consumer asks the broker before it skips
    book.skip_lost(TP0, 970)
    assert book.lost == [(TP0, 953, 969)]


def test_the_expected_message_ends_a_jump() -> None:
    book = StrictOffsets(max_gap_reseeks=1)
    book.positioned(TP0, 953)
    book.new_batch()
    assert book.verdict(TP0, 970) is Verdict.GAP
    book.new_batch()
    assert book.verdict(TP0, 953) is Verdict.DELIVER
    book.delivered(TP0, 953)
    book.new_batch()
    assert book.verdict(TP0, 970) is Verdict.GAP  # a new jump starts its own count
    assert book.lost == []


def test_commits_start_exactly_at_the_floor() -> None:
    book = StrictOffsets()
    book.positioned(TP0, 5)
    acked, index = [6, 7, 3], {6, 7, 3}
    # faust's own rule committed 8 here: it allows one unacked message at the head
    assert book.commit_offset(TP0, acked, index) is None
    assert acked == [6, 7] and index == {6, 7}  # the ack below the floor (a copy) is dropped
    acked.append(5)
    index.add(5)
    assert book.commit_offset(TP0, acked, index) == 8
    assert acked == [] and index == set()
    acked.extend([9, 10])
    assert book.commit_offset(TP0, acked, set(acked)) is None  # 8 is still unacked
    acked.append(8)
    assert book.commit_offset(TP0, acked, {8, 9, 10}) == 11


def test_an_unpositioned_partition_commits_nothing() -> None:
    assert StrictOffsets().commit_offset(TP0, [0, 1, 2], {0, 1, 2}) is None


def _consumer(strict: tuple[str, ...] = ("in",)) -> Any:
    app = faust.App(f"strict-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    fc.install(app, strict)
    return app.consumer


def test_install_makes_faust_commit_through_the_floor() -> None:
    consumer = _consumer()
    assert isinstance(consumer, fc.StrictConsumer)
    consumer._strict_offsets.positioned(TP0, 5)
    consumer._acked[TP0].extend([6, 7])
    consumer._acked_index[TP0].update([6, 7])
    assert consumer._filter_committable_offsets([TP0]) == {}  # faust's own rule: {TP0: 8}
    consumer._acked[TP0].append(5)
    consumer._acked_index[TP0].add(5)
    assert consumer._filter_committable_offsets([TP0]) == {TP0: 8}


def test_install_refuses_an_app_whose_consumer_exists() -> None:
    app = faust.App(f"strict-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1", web_enabled=False)
    assert app.consumer is not None
    with pytest.raises(RuntimeError):
        fc.install(app, ["in"])


def _drain(consumer: Any, batches: list[list[int]], *, suspended_at: int | None = None,
           seek_fails: bool = False, first_offset: int = 0, messages: list[Message] | None = None
           ) -> tuple[list[int], list[int]]:
    """Run the fetch loop over scripted batches of TP0 offsets; returns the offsets given to
    the stream and the offsets the loop sought back to (every message fetched: `messages`)."""
    delivered: list[int] = []
    sought: list[int] = []
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    left = list(batches)
    messages = [] if messages is None else messages

    async def getmany(timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        if not left:
            fetcher._stopped.set()
            return
        for offset in left.pop(0):
            message = Message(TP0.topic, TP0.partition, offset, 0.0, 0, None, None, b"", None, tp=TP0)
            messages.append(message)
            yield TP0, message

    async def callback(message: Any) -> None:
        if message.offset == suspended_at:  # a rebalance suspends the flow: never delivered
            consumer.suspend_flow.set()
            await asyncio.sleep(10)
        delivered.append(message.offset)

    async def seek(offsets: dict[TP, int]) -> None:
        if seek_fails:  # aiokafka's answer for a partition revoked meanwhile
            raise RuntimeError("IllegalStateError: No current assignment for partition")
        sought.extend(offsets.values())

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: first_offset for tp in tps}

    consumer.getmany = getmany
    consumer.callback = callback
    consumer._seek_in_thread = seek
    consumer.earliest_offsets = earliest_offsets
    consumer.loop.run_until_complete(asyncio.wait_for(consumer._drain_messages(fetcher), 10))  # its own loop
    return delivered, sought


def test_messages_fetched_before_the_seek_never_skip_or_reorder_the_partition() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 953)
    # a stale fetch from before the seek (970..972), then the seek's own fetch, then copies
    delivered, sought = _drain(consumer, [[970, 971, 972], [953, 954, 955, 956], [955, 956, 957]])
    assert delivered == [953, 954, 955, 956, 957]
    assert sought == [953]
    assert consumer._strict_offsets.lost == []


def test_a_message_the_suspended_flow_did_not_deliver_comes_again() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 0)
    delivered, _ = _drain(consumer, [[0, 1, 2]], suspended_at=1)
    assert 1 not in delivered
    # faust's loop records 1 as read here, and a later 2 as the end of a gap (acked unseen)
    assert consumer._strict_offsets.expected[TP0] == 1


def test_perform_seek_positions_every_input_partition_then_seeks_it_again() -> None:
    # messages fetched while the seek ran were dropped as early and the fetch position moved
    # past them: the partition is sought again to where its stream stands (chaos run 9 stalled
    # on "window 1 readings committed" without this)
    consumer = _consumer()
    tp1 = TP("in", 1)
    sought: list[dict[TP, int]] = []

    async def seek_to_committed() -> dict[TP, int | None]:
        return {TP0: 10, tp1: None}

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: 3 for tp in tps}

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer.seek_to_committed = seek_to_committed
    consumer.earliest_offsets = earliest_offsets
    consumer._seek_in_thread = seek
    consumer.assignment = lambda: {TP0, tp1, TP("not-an-input", 0)}
    consumer.loop.run_until_complete(consumer.perform_seek())
    assert consumer._strict_offsets.expected == {TP0: 10, tp1: 3}
    assert consumer._strict_offsets.floor == {TP0: 10, tp1: 3}
    assert sought == [{TP0: 10, tp1: 3}]


def test_copies_far_behind_the_stream_make_it_seek_ahead_once_per_batch() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 2000)
    delivered, sought = _drain(consumer, [[10, 11, 12], [1999, 2000]])
    assert sought == [2000] and delivered == [2000]


def test_a_failed_seek_back_never_ends_the_fetch_loop() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    delivered, _ = _drain(consumer, [[20, 21], [10, 11]], seek_fails=True)
    assert delivered == [10, 11]  # the loop went on and took the partition's next fetch


def test_offsets_are_given_up_only_when_the_broker_deleted_them() -> None:
    consumer = _consumer()
    consumer._strict_offsets = StrictOffsets(max_gap_reseeks=1)
    consumer._strict_offsets.positioned(TP0, 10)
    # the broker still has offset 10 (first offset 0): the jump is sought back, never skipped
    delivered, sought = _drain(consumer, [[20], [20], [20], [20]], first_offset=0)
    assert delivered == [] and sought == [10, 10, 10, 10] and consumer._strict_offsets.lost == []
    # retention deleted 10..14: after the reseeks the partition goes on, the range named
    consumer._strict_offsets.positioned(TP0, 10)
    delivered, _ = _drain(consumer, [[15], [15, 16]], first_offset=15)
    assert delivered == [15, 16] and consumer._strict_offsets.lost == [(TP0, 10, 14)]


def test_no_seek_while_a_rebalance_stops_the_flow() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    consumer.stop_flow()
    _, sought = _drain(consumer, [[20]])
    assert sought == []


def test_other_topics_keep_fausts_rules() -> None:
    consumer = _consumer(strict=("other",))
    consumer._read_offset[TP0] = 952
    consumer.app.topics.acks_enabled_for = lambda topic: True
    delivered, sought = _drain(consumer, [[970, 971]])
    assert delivered == [970, 971] and sought == []
    assert list(consumer._gap[TP0])  # faust's gap, as before


def test_faust_fetch_loop_is_the_one_the_rewrite_follows() -> None:
    # StrictConsumer._drain_messages is faust-streaming 0.15.x's loop with the strict branch
    # added: if faust's loop changes, re-read it, port the change and record the new digest
    source = inspect.getsource(FaustConsumer._drain_messages)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == FAUST_DRAIN_DIGEST, \
        "faust's Consumer._drain_messages changed: re-check pipelines/faust_consumer.py"
    for name in ("perform_seek", "_new_offset", "on_partitions_revoked", "_filter_committable_offsets"):
        assert callable(getattr(FaustConsumer, name))
    assert "self._new_offset(tp)" in inspect.getsource(FaustConsumer._filter_committable_offsets)
    assert fc.FAUST_VERSIONS == ("0.15.",) and faust.__version__.startswith(fc.FAUST_VERSIONS)


FAUST_DRAIN_DIGEST = "44a2500309e83c63"  # faust-streaming 0.15.x


def test_a_partition_with_messages_and_no_delivery_is_reported() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    consumer.highwater = lambda tp: 25
    now = consumer.positioned_at + 30
    report = consumer.stall_report(now)
    assert report is not None and "in[0] expected 10 highwater 25" in report
    consumer.last_delivered[TP0] = now - 1  # delivering again: quiet
    assert consumer.stall_report(now) is None
    consumer.highwater = lambda tp: 10  # caught up: nothing to say
    consumer.last_delivered.clear()
    assert consumer.stall_report(now) is None


def test_unstick_makes_a_quiet_partition_fetchable_and_seeks_it_to_its_stream() -> None:
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    consumer.highwater = lambda tp: 25
    consumer._active_partitions = set()  # faust took it out of its fetches (a full queue) ...
    consumer._buffered_partitions.add(TP0)  # ... and a rebalance cleared the queue
    sought: list[dict[TP, int]] = []

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer._seek_in_thread = seek
    consumer.assignment = lambda: {TP0}
    report = consumer.stall_report(consumer.positioned_at + 40)
    assert report is not None and "not fetched (faust: inactive) buffered" in report
    assert consumer.loop.run_until_complete(consumer.unstick()) == [TP0]
    assert TP0 in consumer._active_partitions and TP0 not in consumer._buffered_partitions
    assert sought == [{TP0: 10}]
    assert consumer.stall_report(time.monotonic() + 5) is None  # the kick gives it another 10 s
    assert consumer.loop.run_until_complete(consumer.unstick()) == []


def test_a_partition_no_fetch_answer_names_is_reported_and_kicked_after_10_s() -> None:
    """Its highwater stopped where its stream stands, so it looked caught up while top-ups
    waited on the broker (all eight payments partitions for 60 s at 350,000 merchants). A
    partition that faust's flow holds (buffered: its agent's queue is full) is not kicked."""
    consumer = _consumer()
    other = TP("in", 1)
    consumer._strict_offsets.positioned(TP0, 10)
    consumer._strict_offsets.positioned(other, 3)
    consumer.last_delivered[other] = consumer.positioned_at + 11  # delivering
    consumer.highwater = lambda tp: 10 if tp == TP0 else 3  # TP0's is stale: what was delivered
    consumer.assignment = lambda: {TP0, other}
    consumer._active_partitions = {TP0, other}  # fetchable by faust's books
    sought: list[dict[TP, int]] = []

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer._seek_in_thread = seek
    now = consumer.positioned_at + 12
    consumer.polled_ago_s = lambda tp: 1.0  # named in a fetch answer a second ago: caught up
    assert consumer.stall_report(now) is None
    consumer.polled_ago_s = lambda tp: 12.0  # none fetched: the fetch loop waits, not this partition
    assert consumer.stall_report(now) is None
    consumer.polled_ago_s = lambda tp: 12.0 if tp == TP0 else 1.0
    consumer.last_fetch_at = now - 12  # the fetch loop is still delivering one big batch
    assert consumer.stall_report(now) is None  # the fetcher keeps TP0's records for it
    consumer.last_fetch_at = now - 1  # the loop goes round
    consumer._buffered_partitions.add(TP0)  # held by faust's flow: its agent is busy
    assert consumer.stall_report(now) is None
    consumer._buffered_partitions.discard(TP0)
    report = consumer.stall_report(now)
    assert report is not None and "in[0] expected 10 highwater 10" in report
    assert "not in a fetch answer for 12 s" in report
    assert consumer.loop.run_until_complete(consumer.unstick()) == [TP0]  # at 12 s, not 30
    assert sought == [{TP0: 10}]


def test_a_partition_a_full_step_buffer_holds_is_not_reported() -> None:
    """pipelines.take.Holding holds a partition back from the fetcher while a long step runs
    (its buffer is full): quiet on purpose. Reported, it was sought every 30 s through a
    350,000-merchant catch-up (each seek fetched its messages again)."""
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    consumer.highwater = lambda tp: 25
    now = consumer.positioned_at + 40
    consumer.held_by_steps.add(TP0)
    assert consumer.stall_report(now) is None
    consumer.held_by_steps.discard(TP0)  # released: the usual rules again
    assert consumer.stall_report(now) is not None


def _delivered_through(last: int) -> tuple[Any, list[dict[TP, int]]]:
    """A consumer that owns TP0, positioned at 10 and delivered 10..`last`, recording seeks."""
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    for offset in range(10, last + 1):
        consumer._strict_offsets.delivered(TP0, offset)
    sought: list[dict[TP, int]] = []

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer._seek_in_thread = seek
    consumer.assignment = lambda: {TP0}
    return consumer, sought


def test_withheld_messages_of_a_kept_partition_are_delivered_again() -> None:
    # a step withheld 12.. (a rebalance ran while it was billed): without this the commits of
    # the partition stopped at 12 for good (chaos run 25)
    consumer, sought = _delivered_through(14)
    book = consumer._strict_offsets
    consumer.loop.run_until_complete(consumer.redeliver({TP0: 12, TP("in", 1): 3}))
    assert book.expected[TP0] == 12 and sought == [{TP0: 12}]
    assert book.verdict(TP0, 12) is Verdict.DELIVER


def test_a_commit_waiting_on_an_unacked_message_is_reported_then_delivered_again() -> None:
    consumer, sought = _delivered_through(14)
    book = consumer._strict_offsets
    consumer._acked[TP0].extend([11, 12, 13, 14])  # 10 was delivered and never acked
    consumer.highwater = lambda tp: 15
    consumer.last_delivered[TP0] = time.monotonic()
    start = time.monotonic()
    assert consumer.stall_report(start) is None  # just seen
    report = consumer.stall_report(start + 40)
    assert report is not None and "in[0] commit waits 40 s on offset 10 (acked from 11" in report
    consumer.loop.run_until_complete(consumer.unstick())
    assert sought == [{TP0: 10}] and book.expected[TP0] == 10


def _fetched_10_to_14() -> tuple[Any, list[Message]]:
    """A consumer that owns TP0, positioned at 10, whose fetch loop delivered 10..14."""
    consumer = _consumer()
    consumer._strict_offsets.positioned(TP0, 10)
    consumer.assignment = lambda: {TP0}
    fetched: list[Message] = []
    _drain(consumer, [[10, 11, 12, 13, 14]], messages=fetched)
    return consumer, fetched


def test_messages_delivered_before_a_seek_back_to_them_are_superseded() -> None:
    # A step withheld 12 (a rebalance between its parts) and the partition was sought back to
    # it while 13 and 14, delivered before the seek, waited in the agent's buffer. Billed ahead
    # of 12, they set the accounts' high-water marks past it and 12 was skipped: committed,
    # never billed (the chaos proof's top-ups on too high a balance). The copies delivered
    # again after the seek are the ones to bill.
    consumer, first = _fetched_10_to_14()
    assert not any(consumer.superseded(m) for m in first)
    sought: list[dict[TP, int]] = []

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer._seek_in_thread = seek
    consumer.loop.run_until_complete(consumer.redeliver({TP0: 12}))
    assert sought == [{TP0: 12}]
    assert [m.offset for m in first if consumer.superseded(m)] == [12, 13, 14]  # they come again
    again: list[Message] = []
    delivered, _ = _drain(consumer, [[12, 13, 14]], messages=again)
    assert delivered == [12, 13, 14] and not any(consumer.superseded(m) for m in again)
    # a rebalance that gives the partition back positions it at its committed offset: what was
    # delivered before, from there on, comes again too
    consumer._strict_offsets.positioned(TP0, 13)
    assert [m.offset for m in again if consumer.superseded(m)] == [13, 14]
    assert not consumer.superseded(Message("other", 0, 1, 0.0, 0, None, None, b"", None))  # never delivered here


def test_superseded_rules() -> None:
    book = StrictOffsets()
    assert not book.superseded(TP0, 5, 0)  # never sought
    book.positioned(TP0, 10)  # epoch 1
    assert book.epochs[TP0] == 1 and not book.superseded(TP0, 10, 1)
    assert book.superseded(TP0, 10, 0) and not book.superseded(TP0, 9, 0)  # below the seek: not again
    book.delivered(TP0, 10)
    book.delivered(TP0, 11)
    assert book.redeliver_from(TP0, 11) == 11 and book.expected[TP0] == 11  # epoch 2
    assert book.superseded(TP0, 11, 1) and book.superseded(TP0, 12, 1) and not book.superseded(TP0, 10, 1)
    assert not book.superseded(TP0, 11, 2)
    assert book.redeliver_from(TP0, 3) == 10  # never below the commit floor
    book.positioned(TP0, None)  # no committed offset: from the partition's start
    assert book.superseded(TP0, 0, 3)
    many = StrictOffsets()
    for _ in range(200):  # more seeks than kept: a delivery older than all of them counts as superseded
        many.positioned(TP0, 1000)
    assert many.superseded(TP0, 0, 1) and not many.superseded(TP0, 0, 199) and not many.superseded(TP0, 2000, 200)


def test_a_step_that_skips_ahead_of_a_dropped_message_is_held_back_and_delivered_again() -> None:
    # faust's stream drops a message it takes while the flow is stopped or from an older
    # consumer generation, unacked, after the consumer counted it delivered (the end of a
    # recovery). Seen: payments-accepted[3] 7790.. acked while 7732.. never reached the agent,
    # and chaos run 26. Billed first, the later messages' high-water marks skipped the dropped ones.
    consumer, fetched = _fetched_10_to_14()
    by_offset = {m.offset: m for m in fetched}
    assert consumer.admit([by_offset[10], by_offset[11]]) == (set(), {})
    held, again = consumer.admit([by_offset[11], by_offset[14], by_offset[12]])  # 12, 13 dropped by faust
    assert held == {1, 2} and again == {TP0: 12}  # a copy of 11 goes (the marks skip it); 14 and 12 wait
    sought: list[dict[TP, int]] = []

    async def seek(offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    consumer._seek_in_thread = seek
    consumer.loop.run_until_complete(consumer.redeliver(again))
    assert sought == [{TP0: 12}]
    again_fetched: list[Message] = []
    _drain(consumer, [[12, 13, 14]], messages=again_fetched)
    assert consumer.admit(again_fetched) == (set(), {})
    assert consumer.admit([by_offset[14]]) == (set(), {})  # an older epoch's copy: judged by `superseded`
    assert consumer.superseded(by_offset[14])


def test_admit_rules() -> None:
    book = StrictOffsets()
    other = TP("in", 1)
    assert book.admit([(TP0, 5, 0)]) == (set(), {})  # not positioned here: not judged
    book.positioned(TP0, 10)  # epoch 1
    assert book.admit([(TP0, 10, 1), (TP0, 11, 1), (TP0, 10, 1)]) == (set(), {})  # a copy below: the marks skip it
    assert book.admit([(TP0, 13, 1), (TP0, 12, 1)]) == ({0, 1}, {TP0: 12})  # 12 came only after 13: hold both
    assert book.admit([(TP0, 12, 1)]) == (set(), {})
    book.positioned(other, None)  # no committed offset: from the first message delivered
    assert book.admit([(other, 40, 1), (other, 41, 1)]) == (set(), {})
    assert book.admit([(other, 43, 1)]) == ({0}, {other: 42})
    book.skip_lost(other, 60)  # retention deleted 42..59: nothing to deliver again
    assert book.admit([(other, 60, 1)]) == (set(), {})
    book.positioned(TP0, 20)  # a rebalance: epoch 2 starts at the committed offset
    assert book.admit([(TP0, 25, 1)]) == (set(), {})  # an older epoch's message: not judged here
    assert book.admit([(TP0, 21, 2)]) == ({0}, {TP0: 20})
