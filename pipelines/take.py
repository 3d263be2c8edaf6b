"""Steps of many events from a faust stream, sized by the load.

faust's `Stream.take_events(max_, within)` waits `within` after every step before it yields
the next one, even when messages piled up while the step ran. A step that takes 100 ms
then makes a cycle of 150 ms, and a reading that arrives at the start of a step waits a
whole cycle before it is billed. `take_steps` counts `within` from when the oldest buffered
event arrived instead (`_arrival`): when the worker is busy, the next step starts at once
with what arrived during the last one (the steps grow with the load); when it is idle, a
step waits at most `within` to fill up. Behind a backlog (`behind`), steps fill up to their
size as with take_events.

The buffering is faust's own (a stream processor fills the buffer, and events are acked
after the step that consumed them); only the wait differs, and that the buffer of the next
step fills while a step runs (up to that step's size: a catch-up step is ready when the last
one ends, instead of filling for seconds after it). A full buffer holds its partitions back
from the fetcher (`Holding`) instead of stopping the stream, so faust's one fetch loop never
waits on this agent's queue. It depends on faust-streaming 0.15.3 internals (pinned):
`add_processor`, `_enable_passive`, the channel's queue, `Consumer.on_buffer_full` and
`on_buffer_drop` (which faust skips while a table recovers; the streams' flow is stopped then).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, TypeVar

from faust.types import TP

log = logging.getLogger("mallwatt.take")
E = TypeVar("E")


def _position(event: Any) -> Hashable:
    message = event.message
    return message.topic, message.partition, message.offset


def distinct(events: list[E], position: Callable[[E], Hashable] = _position) -> list[E]:
    """The events of a step without a second copy of one message (same topic, partition and
    offset), first copies in their order. The caller still acks every event it was given.

    Why: faust delivers a message twice within one consumer generation after a rebalance or
    a restart: Recovery.on_recovery_completed resumes the stream partitions and only then seeks
    them to their committed offsets (faust-streaming 0.15.x, tables/recovery.py), so what the
    fetcher delivered in between comes again, everything after the committed offset. When a
    step ran long (a takeover's backlog) both copies wait in the queue and meet in the next
    step. The high-water marks skip a message that an account applied in an earlier step, but
    not a copy inside the same core call, which refused the copy's readings as `duplicate`:
    false meter_fault alerts after a takeover, no money moved (the chaos proof's finding,
    docs/stream.md). Billing each message once per step makes a step what message by message
    would be, which `mallwatt replay --arrival-order` reproduces."""
    seen: set[Hashable] = set()
    out: list[E] = []
    again: list[Hashable] = []
    for event in events:
        key = position(event)
        if key in seen:
            again.append(key)
        else:
            seen.add(key)
            out.append(event)
    if again:  # after a rebalance or restart only; INFO: it changes nothing billed
        log.info("%s message(s) delivered twice in one step, billed once: %s", len(again), again[:5])
    return out


def withhold(step: list[E], keep: Callable[[E], bool]) -> list[E]:
    """Take out of a step (in place) the events `keep` refuses and return them: take_steps acks
    only what is left in the list it yielded, so a withheld event is never acked and its
    offset never committed (its partition's next owner, or this worker after its seek, gets
    it again)."""
    withheld = [event for event in step if not keep(event)]
    if withheld:
        step[:] = [event for event in step if keep(event)]
    return withheld


P = TypeVar("P")


async def bill_in_parts(parts: list[tuple[frozenset[int], P]], bill: Callable[[P], None],
                        still_mine: Callable[[frozenset[int]], bool]) -> set[int]:
    """Bill a step's `parts` (pipelines.batching.parts: input partitions, part) in order,
    letting the event loop run between them (timers, top-ups, the consumer's rebalance
    callbacks). Before each part, the first too (the caller may have awaited since it checked
    ownership: the worker reads a cold step's envelopes in slices), `still_mine(partitions)`
    must hold (no rebalance since the step began, the partitions still assigned); else the
    step stops there. Returns the partitions of the parts not billed (empty when every part
    was): their messages must not be acked. Each `bill` runs with no await inside, so no other
    agent sees a part half done."""
    for number, (partitions, part) in enumerate(parts):
        if number:
            await asyncio.sleep(0)
        if not still_mine(partitions):
            return set().union(*(p for p, _ in parts[number:]))
        bill(part)
    return set()


def _arrival(message: Any) -> float:
    """When a message arrived, on the monotonic clock: the earlier of its receipt by this
    worker and its Kafka timestamp. faust notes the receipt only when its event loop is free,
    so a message that came while a step ran looks fresh after the step; its timestamp (the
    producer's clock) tells it has waited. A producer clock that runs ahead is caught by the
    receipt time; one that runs behind makes messages look older: steps start sooner, or,
    behind by more than `within`, they wait to fill as with take_events (see `behind`)."""
    now = time.monotonic()
    received = getattr(message, "time_in", None)  # set by faust's monitor
    stamped = getattr(message, "timestamp", None)  # epoch seconds
    arrived = received if received is not None else now
    if stamped:
        arrived = min(arrived, now - max(0.0, time.time() - stamped))
    return arrived


#: How old even the newest buffered message must be (seconds) before a step may grow past its
#: size to the catch-up size: a real backlog (a restart, an outage), not a live worker whose
#: last step took longer than `within`. With the `within` threshold (50 ms) a live worker
#: at 350,000 merchants grew steps to 16,384 messages (1.4 M readings, tens of seconds of
#: event loop) as soon as one step ran long, and its trip latency went to minutes. And a
#: catch-up step saves only when it spans several poll cycles (several readings per account);
#: less than a cycle behind, a big step bills one reading per account at a higher cost per
#: message than live steps (its working set: 11-15 against 7.4 ms per 88-reading message at
#: 350,000 merchants), so with 5 s a worker that fell 14 s behind took one step a minute and
#: never caught up. 120 s is two cycles at the longest cadence (60 s); less behind, a worker
#: takes live-size steps back to back.
CATCHUP_AFTER_S = float(os.environ.get("MALLWATT_CATCHUP_AFTER_S", 120.0))
#: A catch-up step's fill ends once its newest message is this recent (seconds): the backlog is
#: drained. Lower than CATCHUP_AFTER_S, so a worker leaves catch-up nearly live.
CATCHUP_DONE_S = float(os.environ.get("MALLWATT_CATCHUP_DONE_S", 1.0))


#: How long a catch-up step may keep filling while messages keep coming (seconds). A step
#: that went after `within` held what the fetcher delivered in 50 ms, about one poll cycle's
#: messages: one reading per account, so catch-up ran at the live per-account rate (the 35,000
#: merchant bench drained its backlog at 1.6x the offered rate; billed in-process with eight
#: cycles per step the same worker code ran 29,000 readings/s).
CATCHUP_FILL_S = float(os.environ.get("MALLWATT_CATCHUP_FILL_S", 10.0))


#: How long a catch-up step may take to bill (seconds): the catch-up size adapts so steps take
#: about this long (CatchupSize). With a fixed size a 350,000-merchant worker took steps of
#: 70-130 s (16,384 messages, four poll cycles) in one call, its event loop blocked that long:
#: timers, top-ups and the consumer thread's keepalive waited. The worker now bills a step in
#: parts of about a second each (batching.parts) and its event loop runs between them, so a
#: step may be long enough to hold several cycles (several readings per account: their
#: per-account cost shared); what it still bounds is the input a crash makes billed again
#: (offsets are committed after a step).
CATCHUP_STEP_S = float(os.environ.get("MALLWATT_CATCHUP_STEP_S", 90.0))


class CatchupSize:
    """How many messages the next catch-up step may take: what the last full steps billed in
    `step_s` seconds, between `floor` (the live step size) and `ceiling`, growing at most
    `growth`x per step.

    Without a step's shape it assumes a constant cost per message, which errs small (a
    larger step costs less per message), hence growth 4x. With the shape (`note_shape`: the
    accounts a step billed, its readings and the accounts the worker owns) it models a step's
    time as per account plus per reading (StepCost). That matters at 350,000 merchants, where
    a step of one poll cycle bills each account once: measured live (session 9) a one-cycle
    step took 57 s and a four-cycle step 66 s, so per message the first looked four times as
    dear as the second and the per-message estimate kept steps near one cycle (catch-up at
    1.6x the offered rate, session 10)."""

    def __init__(self, floor: int, ceiling: int, step_s: float, growth: int = 4) -> None:
        self.floor, self.ceiling, self.step_s = floor, max(floor, ceiling), step_s
        self.growth = growth
        self.current = min(self.ceiling, 4 * floor)
        self.cost = StepCost()
        self._shape: tuple[int, int, int] | None = None  # of the step being billed

    def note_shape(self, accounts: int, readings: int, owned: int) -> None:
        """The running step billed `accounts` distinct accounts and `readings` readings; the
        worker owns `owned` accounts (a step spanning more than a cycle touches no more)."""
        self._shape = (accounts, readings, max(owned, accounts))

    def observe(self, messages: int, seconds: float) -> None:
        """A step of `messages` took `seconds` to bill. Steps below the live size say little
        (their fixed cost dominates) and are ignored."""
        shape, self._shape = self._shape, None
        if messages < self.floor or seconds <= 0:
            return
        fits = int(self.step_s * messages / seconds)
        if shape is not None:
            accounts, readings, owned = shape
            self.cost.observe(accounts, readings, seconds)
            fits = self.cost.messages_within(self.step_s, messages, accounts, readings, owned) or fits
        self.current = max(self.floor, min(self.ceiling, fits, self.growth * max(self.current, messages)))

    @property
    def ahead(self) -> int:
        """How many messages the next step's buffer may hold while a step runs: what the
        sizer may allow once that step is observed (the buffer is cut to `current` then)."""
        return min(self.ceiling, self.growth * self.current)


class StepCost:
    """A catch-up step's billing time as `per_account_s * accounts + per_reading_s * readings`,
    fitted to the last steps (least squares on up to KEPT of them). Until two steps of
    different readings per account pin both, a reading is taken to cost PRIOR_READING_SHARE of
    an account: more than measured (0.06 live, 0.2 in-process), so the estimate errs long and
    the step small."""

    KEPT = 4
    PRIOR_READING_SHARE = 0.2

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []  # (accounts, readings, seconds)
        self.per_account_s = 0.0
        self.per_reading_s = 0.0

    def observe(self, accounts: int, readings: int, seconds: float) -> None:
        if accounts <= 0 or readings <= 0:
            return
        self.seen = [*self.seen, (accounts, readings, seconds)][-self.KEPT:]
        fitted = self._fit()
        if fitted is None:  # the newest step alone, with the prior split
            unit = seconds / (accounts + self.PRIOR_READING_SHARE * readings)
            fitted = unit, self.PRIOR_READING_SHARE * unit
        self.per_account_s, self.per_reading_s = fitted

    def _fit(self) -> tuple[float, float] | None:
        """Least squares of seconds = a * accounts + r * readings, if the steps kept differ
        enough in readings per account to tell a from r and both come out positive."""
        ratios = [r / a for a, r, _ in self.seen]
        if len(self.seen) < 2 or max(ratios) < 1.2 * min(ratios):
            return None
        saa = sum(a * a for a, _, _ in self.seen)
        srr = sum(r * r for _, r, _ in self.seen)
        sar = sum(a * r for a, r, _ in self.seen)
        sat = sum(a * t for a, _, t in self.seen)
        srt = sum(r * t for _, r, t in self.seen)
        det = saa * srr - sar * sar
        if det <= 0:
            return None
        per_account = (sat * srr - srt * sar) / det
        per_reading = (saa * srt - sar * sat) / det
        if per_account <= 0 or per_reading <= 0:
            return None
        return per_account, per_reading

    def messages_within(self, budget_s: float, messages: int, accounts: int, readings: int,
                        owned: int) -> int | None:
        """How many messages shaped like the last step (readings per message; new accounts
        per message until every owned account is in) bill within `budget_s`; None without a
        fit."""
        a, r = self.per_account_s, self.per_reading_s
        if a <= 0 or r <= 0 or messages <= 0:
            return None
        readings_per_msg = readings / messages
        accounts_per_msg = accounts / messages
        below = budget_s / (a * accounts_per_msg + r * readings_per_msg)  # accounts still growing
        if below * accounts_per_msg <= owned:
            return int(below)
        # past every owned account a message adds readings only
        return max(int(owned / accounts_per_msg), int((budget_s - a * owned) / (r * readings_per_msg)))


def behind(newest_stamp: float | None, within: float) -> bool:
    """Whether even the newest buffered message (its Kafka timestamp, epoch seconds) is older
    than `within`: the worker is working through a backlog (a restart, a burst), not keeping
    up with live input, and a step that went at once would hold only what happened to be
    delivered yet."""
    return newest_stamp is not None and time.time() - newest_stamp >= within


class Holding:
    """The input partitions a full step buffer holds back from the fetcher, through faust's
    flow control (`Consumer.on_buffer_full` / `on_buffer_drop`: the fetcher leaves a partition
    out while it is "buffered"). The consumer's stall check is told (`held_by_steps`) so a
    partition held on purpose while a long step runs is not reported and sought as stalled."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.held: set[Any] = set()

    def hold(self, message_tp: Any) -> None:
        # faust's flow control asserts its own TP type; a message may carry aiokafka's
        tp = TP(message_tp.topic, message_tp.partition)
        consumer = self.app.consumer
        # every time, not once: a rebalance resets faust's buffered set, and the partition
        # would be fetched again while the buffer is full
        consumer.on_buffer_full(tp)
        if tp not in self.held:
            self.held.add(tp)
            getattr(consumer, "held_by_steps", set()).add(tp)

    def release(self) -> None:
        if not self.held:
            return
        consumer = self.app.consumer
        held_by_steps = getattr(consumer, "held_by_steps", set())
        for tp in self.held:
            consumer.on_buffer_drop(tp)
            held_by_steps.discard(tp)
        self.held.clear()


async def _fill(stream: Any, arrived: asyncio.Event, full: asyncio.Event, quiet_s: float, limit_s: float,
                still_behind: Callable[[], bool]) -> None:
    """Let a catch-up step fill: until it is full, no message came for `quiet_s`, `limit_s`
    passed (the backlog ends, or the fetcher is slower than the catch-up size needs), or
    the step reached live input (`still_behind` is false: the rest goes after `within`)."""
    deadline = time.monotonic() + limit_s
    while not full.is_set() and not stream.should_stop and still_behind():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        arrived.clear()
        await stream.wait_for_stopped(arrived, timeout=min(quiet_s, left))
        if not arrived.is_set():
            return


async def take_steps(stream: Any, max_: int, within: float, catchup_max: int | None = None,
                     catchup_bytes: int | None = None,
                     catchup_after_s: float = CATCHUP_AFTER_S,
                     catchup_fill_s: float = CATCHUP_FILL_S,
                     catchup_step_s: float = CATCHUP_STEP_S,
                     sizer: CatchupSize | None = None,
                     catchup_done_s: float = CATCHUP_DONE_S) -> AsyncIterator[list[Any]]:
    """Lists of at most `max_` events; a list is yielded at once when it is full, else once
    its oldest event has waited `within` seconds since it arrived (behind a backlog: once it
    is full or `within` after the wait began). A full buffer holds its partitions back from
    the fetcher (Holding), and what the fetcher had already fetched (one fetch answer per
    partition at most) still comes in: such an overflow goes into the steps after, each cut to
    the sizer's `ahead`.

    Behind a backlog (its newest message older than `catchup_after_s`) a step may grow to
    `catchup_max` events or `catchup_bytes` of message values, whichever comes first: a step's
    cost is mostly per account it touches, and only a step spanning several poll cycles brings
    several readings per account (at 350,000 merchants one cycle is about 4,000 messages). Such
    a step fills while messages keep coming (no pause of `within`), for at most
    `catchup_fill_s` or until its newest message is under `catchup_done_s` old (the backlog is
    drained), and its size adapts so it bills in about `catchup_step_s`
    (CatchupSize; `catchup_max` is the ceiling). A caller that knows each step's shape passes
    its own `sizer` (built with the same max_, catchup_max and catchup_step_s) and notes it."""
    catchup_max = max(max_, catchup_max or max_)
    sizer = sizer or CatchupSize(max_, catchup_max, catchup_step_s)
    catchup_bytes = catchup_bytes or 0
    size = 0  # bytes of the buffered message values
    events: list[Any] = []
    oldest = float("inf")  # monotonic time the oldest buffered event arrived (_arrival)
    newest_stamp: float | None = None  # Kafka timestamp of the newest buffered event
    has_events = asyncio.Event()
    arrived = asyncio.Event()  # set by every event added (a catch-up step's fill waits on it)
    full = asyncio.Event()
    holding = Holding(stream.app)
    stepping = False  # a step is out: the buffer fills for the next one, up to CatchupSize.ahead
    channel = aiter(stream.channel)

    async def add_to_buffer(value: Any) -> Any:
        # While a step runs, what arrives fills the next step's buffer (up to its size), so a
        # catch-up step is ready when the last one ends: filling one after billing cost 3-8 s
        # between steps of a minute at 350,000 merchants, and held steps to what 10 s of
        # fetching brought (about 1.5 poll cycles; in session 9 a 4-cycle step billed 21,800
        # readings/s, a single-cycle one 6,500).
        nonlocal oldest, newest_stamp, size
        try:
            event = stream.current_event
            if event is None:
                raise RuntimeError("take_steps found no current event")
            events.append(event)
            oldest = min(oldest, _arrival(event.message))
            stamp = getattr(event.message, "timestamp", None)
            if stamp and (newest_stamp is None or stamp > newest_stamp):
                newest_stamp = stamp
            has_events.set()
            arrived.set()
            value = event.message.value
            size += len(value) if isinstance(value, bytes | bytearray) else 0
            if len(events) >= max_ and (len(events) >= (sizer.ahead if stepping else sizer.current)
                                        or (catchup_bytes and size >= catchup_bytes)
                                        or not in_catchup()):
                full.set()
                # The buffer is full: stop fetching this partition (faust's own flow control,
                # as when an agent's queue is nearly full) rather than stop taking the queue.
                # Stopping the stream here left the queue to fill, and faust's one fetch loop
                # then waited to put the next message into it: every other topic's partitions
                # went undelivered for the whole step (top-ups waited 60-80 s behind a
                # 350,000-merchant catch-up step). What the fetcher already holds still comes
                # in (one fetch answer at most) and stays for the next steps.
                holding.hold(event.message.tp)
        except asyncio.CancelledError:  # pragma: no cover
            raise
        except Exception as exc:  # pragma: no cover - as faust's take_events
            stream.log.exception("Error adding to take buffer: %r", exc)
            await stream.crash(exc)
        return value

    def still_behind() -> bool:  # reads the newest stamp as it is when called
        return behind(newest_stamp, max(within, catchup_after_s))

    def not_caught_up() -> bool:
        # A fill goes on until the input is nearly live (`catchup_done_s`), not merely less than
        # `catchup_after_s` behind: ending it there kept a 350,000-merchant worker 5 s behind
        # for good (each step filled up to the first message under 5 s old; trip p99 11 s).
        return behind(newest_stamp, min(max(within, catchup_after_s), catchup_done_s))

    catching_up = False  # entered `catchup_after_s` behind, left once nearly live (hysteresis)

    def in_catchup() -> bool:
        # One pair of thresholds for the fill and for a step being full: a step of `max_` or
        # more used to count as full at the first message under `catchup_after_s` old while
        # its fill went on to `catchup_done_s`, so large steps still stopped 5 s behind.
        return catchup_max > max_ and (still_behind() or (catching_up and not_caught_up()))

    enable_acks = stream.enable_acks
    stream.enable_acks = False  # events are acked after the step that consumed them
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel)
    try:
        while not stream.should_stop:
            if not events:
                await stream.wait_for_stopped(has_events)
                if not events:
                    continue
            # what arrived while the last step ran is already queued: take it before deciding
            while not full.is_set() and not channel.queue.empty() and not stream.should_stop:
                await asyncio.sleep(0)
            remaining = within - (time.monotonic() - oldest)
            # a worker stays in catch-up from `catchup_after_s` behind until it is nearly live:
            # a catch-up step that ended on its size or fill time 2 s behind goes on next step
            catching_up = in_catchup()
            if catching_up:
                # a gap of `within` between fetches is common behind a backlog: wait a bit longer
                await _fill(stream, arrived, full, max(within, 0.2), catchup_fill_s, not_caught_up)
            elif remaining <= 0 and behind(newest_stamp, within):
                remaining = within  # a backlog: more is on its way, fill the step as take_events does
            if remaining > 0 and not full.is_set():
                await stream.wait_for_stopped(full, timeout=remaining)
            # a buffer filled while the last step ran may hold more than the sizer now allows
            take = min(len(events), sizer.current if catching_up else max(max_, sizer.ahead))
            step = events[:take]
            # the buffer starts over (with what the step leaves) and fills while the step runs
            del events[:take]
            oldest = min((_arrival(e.message) for e in events), default=float("inf"))
            newest_stamp = max((t for e in events if (t := getattr(e.message, "timestamp", None))), default=None)
            size = sum(len(v) for e in events if isinstance(v := e.message.value, bytes | bytearray))
            if not events:
                has_events.clear()
            full.clear()
            if len(events) >= max(max_, sizer.current):  # what the step left is a whole step: no fill
                full.set()
            if len(events) < max(max_, sizer.ahead):  # room while the step runs: fetch again
                holding.release()
            stepping = True
            stepped = False
            try:
                yielded_at = time.monotonic()
                yield step
                stepped = True
                sizer.observe(len(step), time.monotonic() - yielded_at)
            finally:
                stepping = False
                # Acked only after a step the agent finished: a step that raised (or an agent
                # cancelled in it) leaves its events unacked, so their offsets are never
                # committed and a restart delivers them again. Acking them here let a failed
                # step's input be committed as done.
                if stepped:
                    for event in step:
                        await stream.ack(event)
    finally:
        holding.release()
        stream.enable_acks = enable_acks
        stream._processors.remove(add_to_buffer)
