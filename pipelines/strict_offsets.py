"""Which fetched message of an input partition its stream gets, and which offset may be
committed: the pure bookkeeping of the worker's strict consumer (pipelines/faust_consumer.py
explains why faust's own rules lost paid top-ups). No Kafka, no faust: each rule is tested on
its own in tests/unit/pipelines/test_faust_consumer.py."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from typing import Any

TP = Any  # a (topic, partition) named tuple: faust's TP or aiokafka's TopicPartition

#: Fetched batches in a row that may show the same jump before it is taken as offsets the
#: broker no longer has (each one seeks back to the expected offset first).
MAX_GAP_RESEEKS = 5
#: Seeks remembered per partition for `superseded`. A message delivered before all of them
#: counts as superseded (withheld: a commit that waits on it is unstuck by the stall check).
SEEKS_KEPT = 64


class Verdict(enum.Enum):
    DELIVER = "deliver"
    COPY = "copy"  # below the expected offset: delivered before
    UNPOSITIONED = "unpositioned"  # before the partition's seek: the seek fetches it again
    GAP = "gap"  # above the expected offset: seek back
    STALE = "stale"  # above it again in a batch that already sought back: drop
    GONE = "gone"  # the jump persisted: those offsets are gone from the broker; deliver


class StrictOffsets:
    """Per partition: the next offset its stream must get, and the floor of its commits.

    Pure bookkeeping (no Kafka), so each rule is unit-tested on its own."""

    def __init__(self, max_gap_reseeks: int = MAX_GAP_RESEEKS) -> None:
        self.expected: dict[TP, int | None] = {}  # None: positioned, committed offset unknown
        self.floor: dict[TP, int | None] = {}  # the committed offset; commits start exactly here
        self.max_gap_reseeks = max_gap_reseeks
        self._gap_batches: dict[TP, tuple[int, int]] = {}  # tp -> (expected offset, batches seen)
        self._gap_this_batch: set[TP] = set()
        self.lost: list[tuple[TP, int, int]] = []  # (tp, first, last) offsets gone from the broker
        self.epochs: dict[TP, int] = {}  # +1 at every seek of the partition (`sought`)
        self._seeks: dict[TP, deque[tuple[int, int | None]]] = {}  # recent (epoch, offset) seeks
        self._taken: dict[TP, tuple[int, int | None]] = {}  # (epoch, next offset an agent may take)

    def positioned(self, tp: TP, offset: int | None) -> None:
        """The partition was sought to `offset` (None: no committed offset, from its start)."""
        self.expected[tp] = offset
        self.floor[tp] = offset
        self._gap_batches.pop(tp, None)
        self.sought(tp, offset)

    def redeliver_from(self, tp: TP, offset: int) -> int:
        """Messages from `offset` on, delivered but not taken by the agent (withheld), must
        come again: the partition is sought back there (never below its commit floor).
        Returns the offset to seek to."""
        floor = self.floor.get(tp)
        start = max(offset, floor or 0)
        self.expected[tp] = start
        self._gap_batches.pop(tp, None)
        self.sought(tp, start)
        return start

    def sought(self, tp: TP, offset: int | None) -> None:
        """A new delivery epoch of `tp` begins at `offset` (None: its start)."""
        epoch = self.epochs.get(tp, 0) + 1
        self.epochs[tp] = epoch
        self._seeks.setdefault(tp, deque(maxlen=SEEKS_KEPT)).append((epoch, offset))

    def admit(self, items: list[tuple[TP, int, int]]) -> tuple[set[int], dict[TP, int]]:
        """Which messages of an agent's step, (partition, offset, delivery epoch) in step
        order, skip ahead of a message of their partition that was delivered in the current
        epoch and never reached the agent. Returns the indexes of `items` to hold back (never
        billed, never acked) and, per partition, the offset to deliver again from; the rest
        is recorded as taken.

        Why: the consumer counts a message delivered once faust's conductor has it, but a
        faust stream still drops it, unacked, when it takes it while the flow is stopped or
        from an older consumer generation (faust/streams.py, `skipped_value`; the end of a
        recovery). A later message of that partition then reached the agent first: its
        accounts' high-water marks passed the dropped one, which, delivered again by the
        stall check 30 s later, was skipped as applied or billed after later top-ups (chaos
        run 26; the commits of payments-accepted[3] waiting on 7732 while 7790.. were acked).

        Messages of an older epoch (superseded or copies below a seek) and of partitions not
        positioned here are not judged."""
        held: set[int] = set()
        again: dict[TP, int] = {}
        for index, (tp, offset, epoch) in enumerate(items):
            current = self.epochs.get(tp)
            if tp not in self.expected or epoch != current:
                continue
            if tp in again:
                held.add(index)
                continue
            start = self._taken_start(tp)
            if start is not None and offset > start:
                held.add(index)
                again[tp] = start
                continue
            self._taken[tp] = (current, offset + 1 if start is None else max(start, offset + 1))
        return held, again

    def _taken_start(self, tp: TP) -> int | None:
        """The next offset of `tp` an agent may take in its current epoch (None: unknown)."""
        current = self.epochs.get(tp, 0)
        taken_epoch, start = self._taken.get(tp, (None, None))
        if taken_epoch == current:
            return start
        seeks = self._seeks.get(tp)  # the first take of this epoch: from where its seek went
        return seeks[-1][1] if seeks and seeks[-1][0] == current else None

    def superseded(self, tp: TP, offset: int, epoch: int) -> bool:
        """Whether a message at `offset` delivered in `epoch` will come again: a later seek
        went to its offset or before it. Its agent must not bill it: the copy that comes
        again is billed in order, and billing a later message of a partition before an
        earlier one made the earlier one's accounts skip it by their high-water marks
        (readings committed, never billed: the chaos proof's top-ups on too high a balance).

        Why it happens: a step withholds a partition's messages (a rebalance between its
        parts, or a partition not owned at the step) and seeks back to them, while later
        messages of that partition, delivered before the seek, wait in the agent's buffer;
        or a rebalance gives the partition back while older deliveries wait there."""
        seeks = self._seeks.get(tp)
        if not seeks:
            return False
        if len(seeks) == SEEKS_KEPT and epoch < seeks[0][0] - 1:  # older than what is kept: assume so
            return True
        return any(e > epoch and (start is None or start <= offset) for e, start in seeks)

    def revoked(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.expected.pop(tp, None)
            self.floor.pop(tp, None)
            self._gap_batches.pop(tp, None)

    def new_batch(self) -> None:
        self._gap_this_batch.clear()

    def verdict(self, tp: TP, offset: int) -> Verdict:
        if tp not in self.expected:
            return Verdict.UNPOSITIONED
        want = self.expected[tp]
        if want is None or offset == want:
            return Verdict.DELIVER
        if offset < want:
            return Verdict.COPY
        if tp in self._gap_this_batch:  # already sought back in this batch
            return Verdict.STALE
        self._gap_this_batch.add(tp)
        seen_for, batches = self._gap_batches.get(tp, (want, 0))
        batches = batches + 1 if seen_for == want else 1
        self._gap_batches[tp] = (want, batches)
        if batches > self.max_gap_reseeks:
            return Verdict.GONE
        return Verdict.GAP

    def seek_failed(self, tp: TP) -> None:
        """A seek back did not happen: the jump's count starts again (only jumps seen after
        seeks that took place may declare offsets gone)."""
        self._gap_batches.pop(tp, None)

    def delivered(self, tp: TP, offset: int) -> None:
        if tp not in self.expected:  # revoked while it was being delivered: its next owner seeks it
            return
        self.expected[tp] = offset + 1
        if self.floor.get(tp, 0) is None:  # no committed offset: commits start at the first one
            self.floor[tp] = offset
        if tp in self._gap_batches and self._gap_batches[tp][0] <= offset:
            del self._gap_batches[tp]

    def skip_lost(self, tp: TP, offset: int) -> None:
        """The offsets from the expected one to below `offset` are gone from the broker:
        recorded, and commits may start at `offset`."""
        want = self.expected.get(tp)
        if want is not None:
            self.lost.append((tp, want, offset - 1))
        floor = self.floor.get(tp)
        if floor is not None and floor < offset:
            self.floor[tp] = offset
        start = self._taken_start(tp)
        if start is None or start < offset:  # no agent can take them now: not a gap to deliver again
            self._taken[tp] = (self.epochs.get(tp, 0), offset)

    def commit_offset(self, tp: TP, acked: list[int], index: set[int]) -> int | None:
        """The offset to commit for `tp` from its acked offsets (sorted in place and trimmed,
        as faust keeps them): the end of the run of acked offsets that starts exactly at the
        floor; None while the floor's own message is unacked."""
        floor = self.floor.get(tp)
        if floor is None:
            return None
        acked.sort()
        stale = 0
        while stale < len(acked) and acked[stale] < floor:  # acks of copies below the floor
            index.discard(acked[stale])
            stale += 1
        del acked[:stale]
        end = floor
        for offset in acked:
            if offset != end:
                break
            end += 1
        if end == floor:
            return None
        index.difference_update(acked[: end - floor])
        del acked[: end - floor]
        self.floor[tp] = end
        return end


