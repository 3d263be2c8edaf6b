"""faust's Kafka consumer with input offsets that never skip a message.

The chaos proof (tests/integration/test_chaos.py) lost 81 paid top-ups in one run: a
contiguous range of 16-17 offsets on five payment partitions was committed, yet never
claimed, credited or dead-lettered. It also met a "commit stall": a partition whose
committed offset stopped moving until the worker was restarted. Both come from how
faust-streaming 0.15.x follows offsets in `Consumer._drain_messages`:

1. **Undelivered messages move the read offset.** While a rebalance suspends the flow,
   `wait_first(callback(message), suspend_flow.wait())` returns without delivering the
   message, and the loop records its offset as read all the same.
2. **The streams resume before they seek.** Recovery resumes the input partitions, so the
   fetcher delivers from wherever aiokafka stood, and only then seeks them to the committed
   offsets (`Recovery._resume_streams`). Messages fetched before the seek still arrive after
   it, out of order.
3. **A jump in offsets is acked.** faust takes any message whose offset is more than one
   past the read offset as the end of a gap (meant for compacted topics and transaction
   markers) and acks the gap's offsets: they are committed though no agent ever saw them.
   A message below the read offset is dropped.

Together: after a rebalance, a stale message can land ahead of the read offset that the
seek set, so the offsets between are acked unseen (the lost payments); or a skipped message
is never delivered again and never acked (the stall). `_new_offset` also commits past one
unacked message at the head (it treats the committed offset as the last one processed).

On the worker's input topics (plain topics, idempotent non-transactional producers: their
offsets have no gaps) this consumer delivers a partition's messages strictly in offset
order, from the offset it sought to, each once: a copy below the expected offset is
dropped (it was delivered), a message before the partition's seek is dropped (the seek
fetches it again), and a jump makes it seek back to the expected offset (not while a
rebalance runs; a seek that fails is tried again and never ends the fetch loop). Only if
the jump persists and the broker's first offset is past the expected one (retention
deleted them) does it go on, with an error naming the lost range. An offset is committed only when every offset from the committed
one up to it was acked; nothing is ever acked for a message no agent was given.

faust internals used (faust-streaming 0.15.x, checked by FAUST_VERSIONS, tested in
tests/unit/pipelines/test_faust_consumer.py; its pure rules are pipelines/strict_offsets.py):
Consumer._drain_messages (rewritten here), _wait_next_records, _new_offset, perform_seek,
seek, on_partitions_revoked, _acked/_acked_index/_committed_offset/_read_offset,
_active_partitions/_buffered_partitions/_paused_partitions, suspend_flow, wait_first, and
Transport.Consumer (`install`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

from pipelines.strict_offsets import StrictOffsets, Verdict

#: faust versions whose consumer internals this module was written against.
FAUST_VERSIONS = ("0.15.",)
if not faust.__version__.startswith(FAUST_VERSIONS):  # pragma: no cover - a pin bump must re-check
    raise ImportError(f"pipelines.faust_consumer adapts faust {FAUST_VERSIONS}, not {faust.__version__}: "
                      "re-check Consumer._drain_messages/_new_offset/perform_seek and update FAUST_VERSIONS")

log = logging.getLogger("mallwatt.consumer")

#: A copy this far below the expected offset makes the partition seek ahead to it (dropping
#: thousands of copies one by one held a partition back).
MAX_COPIES_BEHIND = 500

class StrictConsumer(AIOKafkaConsumer):
    """The aiokafka driver's Consumer; the topics in `strict_topics` follow StrictOffsets."""

    strict_topics: frozenset[str] = frozenset()

    def on_init(self) -> None:
        super().on_init()
        self._strict_offsets = StrictOffsets()
        self.delivering: tuple[TP, int, float] | None = None  # (tp, offset, since): a stream's queue is full
        self.last_delivered: dict[TP, float] = {}  # monotonic time of each input's last delivery
        self.positioned_at = time.monotonic()
        self.last_fetch_at = time.monotonic()
        self.last_fetch_note = "none yet"
        self.loop_stage = "not started"  # what the fetch loop awaits now (for stall reports)
        self.stuck: dict[TP, float] = {}  # input partitions stall_report found quiet -> seconds
        self.unpolled: set[TP] = set()  # ... of them, those no fetch answer named lately
        # input partitions a full step buffer holds back on purpose (pipelines.take.Holding):
        # quiet while a long step runs, not stalled
        self.held_by_steps: set[TP] = set()
        self.stuck_commits: dict[TP, float] = {}  # ... whose commits wait on an unacked message -> seconds
        self.commit_blocked_since: dict[TP, float] = {}
        # the delivery epoch of each input message given to an agent (StrictOffsets.superseded)
        self._delivered_in: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def admit(self, messages: list[Any]) -> tuple[set[int], dict[TP, int]]:
        """The indexes of an agent's step `messages` that skip ahead of a message faust
        dropped after it was delivered, and the offsets to deliver again from
        (pipelines.strict_offsets.StrictOffsets.admit); the rest count as taken."""
        epochs = self._delivered_in
        items = [(m.tp, m.offset, epochs.get(m, -1)) for m in messages]
        return self._strict_offsets.admit(items)

    def superseded(self, message: Any) -> bool:
        """Whether an input message given to an agent was superseded by a later seek of its
        partition: it comes again, and the agent must leave this copy unbilled and unacked
        (pipelines.strict_offsets.StrictOffsets.superseded says why)."""
        epoch = self._delivered_in.get(message)
        return epoch is not None and self._strict_offsets.superseded(message.tp, message.offset, epoch)

    def stall_report(self, now: float, after_s: float = 10.0) -> str | None:
        """What holds an input, else None: the fetch loop waiting `after_s` to hand a message
        to the streams (an agent stopped taking its input), or partitions with messages on the
        broker and none delivered for `after_s` (with what the loop last did)."""
        queues = {name: agent.channel.queue.qsize() for name, agent in self.app.agents.items()
                  if hasattr(getattr(agent, "channel", None), "queue")}
        if self.delivering is not None and now - self.delivering[2] >= after_s:
            tp, offset, since = self.delivering
            return (f"fetch loop waiting {now - since:.0f} s to deliver {tp.topic}[{tp.partition}]@{offset}; "
                    f"agent queues {queues}; expected {self._strict_offsets.expected.get(tp)}")
        book = self._strict_offsets
        stuck = []
        self.stuck = {}
        self.unpolled = set()
        self.stuck_commits = {}
        polled = {tp: self.polled_ago_s(tp) for tp in book.expected}
        # a partition left out while the others are fetched and the fetch loop goes round;
        # when the loop is still delivering one big batch (350,000 opening top-ups: 40 s and
        # more), the fetcher holds the other partitions' records for it, and a seek would
        # only throw them away to fetch them again
        fetching = (now - self.last_fetch_at < after_s
                    and any(ago is not None and ago < after_s / 2 for ago in polled.values()))
        for tp, want in list(book.expected.items()):
            if tp in self.held_by_steps:
                continue
            try:
                highwater = self.highwater(tp)
            except Exception:  # not assigned any more
                continue
            quiet_s = now - self.last_delivered.get(tp, self.positioned_at)
            active = self._active_partitions is None or tp in self._active_partitions
            buffered = tp in self._buffered_partitions
            # a highwater of None: no fetch answer for the partition yet (aiokafka learns it from
            # every answer, an empty one too), so the partition is not being fetched at all
            waiting = want is not None and (highwater is None or highwater > want)
            # ... and a highwater that stopped moving: an active partition that no fetch answer
            # has named for `after_s` is not fetched either, and new messages stay unseen (at
            # 350,000 merchants all eight payments partitions went unfetched for 60 s, each with
            # top-ups waiting, while their highwater still equalled what was delivered)
            polled_s = polled.get(tp)
            unpolled = (fetching and want is not None and active and not buffered and polled_s is not None
                        and polled_s >= after_s)
            if (waiting or unpolled) and quiet_s >= after_s:
                acked = sorted(self._acked.get(tp, []))[:3]
                self.stuck[tp] = quiet_s
                if unpolled:
                    self.unpolled.add(tp)
                stuck.append(f"{tp.topic}[{tp.partition}] expected {want} highwater {highwater} floor "
                             f"{book.floor.get(tp)} acked {acked} quiet {quiet_s:.0f} s"
                             f"{f' not in a fetch answer for {polled_s:.0f} s' if unpolled else ''}"
                             f"{'' if active else ' not fetched (faust: inactive)'}"
                             f"{' buffered' if buffered else ''}")
        # delivered, not acked: later offsets are acked but the commit waits on the floor's message
        # (a delivered message that no agent acks stops the partition's commits for good)
        waiting: dict[TP, float] = {}
        for tp, floor in list(book.floor.items()):
            acked = self._acked.get(tp)
            if floor is not None and acked and min(acked) > floor:
                since = self.commit_blocked_since.get(tp, now)
                waiting[tp] = since
                if now - since >= after_s:
                    self.stuck_commits[tp] = now - since
                    stuck.append(f"{tp.topic}[{tp.partition}] commit waits {now - since:.0f} s on offset "
                                 f"{floor} (acked from {min(acked)}, expected {book.expected.get(tp)}, faust's "
                                 f"committed {self._committed_offset.get(tp)}, "
                                 f"{'in' if floor in self._acked_index.get(tp, ()) else 'not in'} its ack index)")
        self.commit_blocked_since = waiting
        if not stuck:
            return None
        paused = sorted(f"{tp.topic}[{tp.partition}]" for tp in self._paused_partitions if self._strict(tp))
        return (f"inputs not delivered: {'; '.join(stuck[:8])}; paused input partitions {paused[:8]}; "
                f"last fetch {now - self.last_fetch_at:.0f} s ago ({self.last_fetch_note}); fetch loop "
                f"{self.loop_stage}; flow {'on' if self.flow_active else 'off'}; agent queues {queues}")

    def polled_ago_s(self, tp: TP) -> float | None:
        """Seconds since a fetch answer last named `tp` (aiokafka's `last_poll_timestamp`, set
        by every answer, an empty one too), or None if unknown."""
        try:
            last_ms = self._thread._ensure_consumer().last_poll_timestamp(tp)
        except Exception:  # no consumer yet, or not assigned
            return None
        return None if not last_ms else max(0.0, time.time() - last_ms / 1000)

    async def redeliver(self, offsets: dict[TP, int]) -> None:
        """Deliver again, from `offsets`, messages that an agent was given and did not take
        (pipelines.take.withhold: it never acks them). Nothing else brings them back to a
        partition this worker keeps: its commits would stop at the first of them for good."""
        mine = self.assignment()
        book = self._strict_offsets
        again: dict[TP, int] = {}
        for tp, offset in offsets.items():
            want = book.expected.get(tp)
            if tp in mine and want is not None and offset < want:
                again[tp] = book.redeliver_from(tp, offset)  # what was delivered from there is superseded
        if not again:
            return
        try:
            await self._seek_in_thread(again)
        except Exception as exc:  # revoked meanwhile: the rebalance seeks them
            log.warning("input partitions %s could not be sought to deliver again (%s)", list(again), exc)

    async def unstick(self, after_s: float = 30.0, unpolled_after_s: float = 10.0) -> list[TP]:
        """Make the input partitions that stall_report found quiet for `after_s` fetchable
        again and seek them to where their streams stand. faust takes a partition out of its
        fetches while an agent's queue is full and puts it back when the agent next reads an
        emptied queue; a rebalance that clears the queues can leave it out. A partition that
        is fetchable by faust's books but no fetch answer named is kicked after
        `unpolled_after_s` already: nothing of faust's flow holds it, and a top-up waits in it.
        Not while a rebalance runs (its own seek follows)."""
        if not self.flow_active or self.app.rebalancing:
            return []
        blocked = {tp: cast(int, self._strict_offsets.floor[tp]) for tp, waited_s in self.stuck_commits.items()
                   if waited_s >= after_s and self._strict_offsets.floor.get(tp) is not None}
        if blocked:  # deliver again from the message the commits wait on
            log.warning("input partitions delivered again from the offset their commits wait on: %s",
                        {f"{tp.topic}[{tp.partition}]": offset for tp, offset in blocked.items()})
            await self.redeliver(blocked)
            for tp in blocked:
                self.commit_blocked_since[tp] = time.monotonic()
        mine = self.assignment()
        tps = [tp for tp, quiet_s in getattr(self, "stuck", {}).items()
               if (quiet_s >= after_s or (tp in self.unpolled and quiet_s >= unpolled_after_s))
               and tp in mine and self._strict_offsets.expected.get(tp) is not None]
        if not tps:
            return []
        if self._active_partitions is not None:
            self._active_partitions.update(tps)
        self._buffered_partitions.difference_update(tps)
        self.resume_partitions(tps)
        try:
            await self._seek_in_thread({tp: cast(int, self._strict_offsets.expected[tp]) for tp in tps})
        except Exception as exc:  # revoked meanwhile: the rebalance seeks them
            log.warning("input partitions %s could not be sought (%s)", tps, exc)
            return []
        for tp in tps:
            self.last_delivered[tp] = time.monotonic()  # give it another after_s before the next kick
        log.warning("input partitions made fetchable again and sought to their streams' offsets: %s",
                    [f"{tp.topic}[{tp.partition}]" for tp in tps])
        return tps

    async def _wait_next_records(self, timeout: float) -> Any:
        self.loop_stage = ("waiting for the consumer thread's fetch" if self.flow_active
                           else "waiting for the flow to resume")
        return await super()._wait_next_records(timeout)

    def _strict(self, tp: TP) -> bool:
        return tp.topic in self.strict_topics

    async def perform_seek(self) -> None:
        await super().perform_seek()
        mine = [tp for tp in self.assignment() if self._strict(tp)]
        # the committed offset of each input partition; aiokafka's seek_to_committed does not
        # seek one without a committed offset (or of 0): it starts where the reset policy says
        starts = {tp: self._committed_offset[tp] for tp in mine if self._committed_offset.get(tp)}
        fresh = [tp for tp in mine if tp not in starts]
        if fresh:
            latest = str(self.app.conf.consumer_auto_offset_reset) == "latest"
            found = await (self.highwaters(*fresh) if latest else self.earliest_offsets(*fresh))
            starts.update({tp: int(found[tp] or 0) for tp in fresh})
        for tp, offset in starts.items():
            self._strict_offsets.positioned(tp, offset)
        self.positioned_at = time.monotonic()
        # Messages that arrived while this ran were dropped as fetched before the seek, and the
        # consumer's fetch position moved past them: seek every input partition again to where
        # its stream stands, so they come again (one that was delivered meanwhile comes as a copy).
        await self._seek_in_thread({tp: cast(int, self._strict_offsets.expected[tp]) for tp in starts})
        log.info("input partitions positioned: %s", {f"{tp.topic}[{tp.partition}]": offset
                                                     for tp, offset in starts.items()})

    async def _seek_in_thread(self, offsets: dict[TP, int]) -> None:
        """Seek on the aiokafka consumer's own thread and wait for the new positions. faust's
        `_seek` calls the consumer from the event loop's thread; a seek made that way while
        the consumer thread fetched was seen to fetch nothing more for the partition."""
        await self._thread.seek_wait(offsets)

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        if self._strict(partition):
            self._strict_offsets.positioned(partition, offset)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._strict_offsets.revoked(revoked)
        await super().on_partitions_revoked(revoked)

    def _new_offset(self, tp: TP) -> int | None:
        if not self._strict(tp):
            return cast(int | None, super()._new_offset(tp))
        return self._strict_offsets.commit_offset(tp, self._acked[tp], self._acked_index[tp])

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - driven by the broker tests
        # faust's loop (faust/transport/consumer.py), with StrictOffsets for strict topics;
        # other topics keep faust's read offset and gap handling unchanged.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        offsets = self._strict_offsets
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                self.loop_stage = "fetching"
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                offsets.new_batch()
                if self.should_stop:
                    continue
                early: dict[TP, int] = {}  # messages fetched before their partition's seek, dropped
                behind: set[TP] = set()  # partitions sought ahead to their stream in this batch
                batch_size = 0
                async for tp, message in ait:
                    batch_size += 1
                    num_since_yield += 1
                    if num_since_yield > 100:
                        await asyncio.sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    if self._strict(tp):
                        self.loop_stage = "sorting a batch"
                        verdict = offsets.verdict(tp, offset)
                        if verdict is Verdict.GAP:
                            await self._seek_back(tp, offset, cast(int, offsets.expected[tp]))
                            continue
                        if verdict is Verdict.GONE and not await self._below_log_start(tp, offsets):
                            offsets.seek_failed(tp)  # the broker still has them: keep seeking back
                            await self._seek_back(tp, offset, cast(int, offsets.expected[tp]))
                            continue
                        if verdict is Verdict.GONE:
                            log.error("%s[%s]: offsets %s-%s are gone from the broker (retention); they "
                                      "were never processed", tp.topic, tp.partition, offsets.expected[tp],
                                      offset - 1)
                            offsets.skip_lost(tp, offset)
                        elif verdict is not Verdict.DELIVER:
                            if verdict is Verdict.UNPOSITIONED:
                                early[tp] = early.get(tp, 0) + 1
                            elif (verdict is Verdict.COPY and tp not in behind
                                  and cast(int, offsets.expected[tp]) - offset > MAX_COPIES_BEHIND):
                                # the fetch position fell far behind the stream (seen: a partition
                                # quiet for 45 s while its copies were dropped): seek ahead to it
                                behind.add(tp)
                                await self._seek_back(tp, offset, cast(int, offsets.expected[tp]))
                            continue
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            self.loop_stage = "committing"
                            await self.commit()
                        self.loop_stage = "delivering"
                        self._delivered_in[message] = offsets.epochs.get(tp, 0)
                        delivery = callback(message)
                        self.delivering = (tp, offset, time.monotonic())
                        results = await self.wait_first(delivery, self.suspend_flow.wait())
                        self.delivering = None
                        if delivery in results.done:  # not when the flow was suspended first
                            offsets.delivered(tp, offset)
                            self.last_delivered[tp] = time.monotonic()
                            set_read_offset(tp, offset)
                        continue
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, offset)
                self.last_fetch_at = time.monotonic()
                self.last_fetch_note = f"{batch_size} message(s), {len(early)} partition(s) early"
                if early:  # fetched again after the seek
                    log.info("dropped messages fetched before their partition's seek: %s",
                             {f"{tp.topic}[{tp.partition}]": n for tp, n in early.items()})
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:  # as faust's loop: never die silently
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _seek_back(self, tp: TP, got: int, want: int) -> None:
        """Seek `tp` back to the offset its stream expects. While a rebalance runs (the flow
        is stopped) nothing is sought: the partition may be leaving, and the new assignment
        seeks it anyway. A seek that fails (the partition was revoked meanwhile: aiokafka's
        IllegalStateError) leaves the partition unpositioned until its next seek, instead of
        ending the fetch loop, which stopped every input of the worker."""
        if not self.flow_active or self.suspend_flow.is_set():
            return
        self.loop_stage = f"seeking {tp.topic}[{tp.partition}] back"
        log.warning("%s[%s]: got offset %s, expected %s; seeking to it", tp.topic, tp.partition, got, want)
        try:
            await self._seek_in_thread({tp: want})
        except Exception as exc:
            log.warning("%s[%s]: seek back to %s failed (%s: %s); trying again at its next message", tp.topic,
                        tp.partition, want, type(exc).__name__, exc)
            self._strict_offsets.seek_failed(tp)

    async def _below_log_start(self, tp: TP, offsets: StrictOffsets) -> bool:
        """Whether the expected offset is below the partition's first offset (deleted by
        retention): only then may the partition go on past it."""
        want = offsets.expected.get(tp)
        try:
            first = (await self.earliest_offsets(tp))[tp]
        except Exception as exc:
            log.warning("%s[%s]: cannot read its first offset (%s)", tp.topic, tp.partition, exc)
            return False
        return want is not None and first is not None and first > want


def install(app: faust.App, strict_topics: Iterable[str]) -> None:
    """Make `app` consume with StrictConsumer; call before the app starts (its consumer is
    created on first use)."""
    if app._consumer is not None:
        raise RuntimeError("install the strict consumer before the app's consumer exists")
    consumer_class = type("MallwattConsumer", (StrictConsumer,), {"strict_topics": frozenset(strict_topics)})
    app.transport.Consumer = consumer_class  # type: ignore[misc]
