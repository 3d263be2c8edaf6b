"""How the worker keeps Python's cycle collector off its state.

The worker holds every owned account's state as Python objects (several per account), and
each billing step replaces the touched accounts' objects. With the collector's defaults, the
allocations of a step trigger collections that walk that whole state again and again: at
35,000 accounts they took 30 to 40 % of a step (measured with gc.callbacks). The state has
no reference cycles (old values are freed by reference counting, frozen or not), so the worker

- pauses the collector for the duration of each step (`step()`), and
- freezes what exists after the step (`gc.freeze()`: the objects move to a permanent
  generation that collections skip), so a collection between steps only walks what was
  allocated since.

A full pass (unfreeze, collect, freeze) frees cyclic garbage that a freeze caught while it
was still alive (asyncio and faust internals make some), but it walks every tracked object
of the process, about 14 per cached envelope: at 350,000 accounts it holds the event loop for
seconds (3.3 s in `python -m bench.gc_pause`; run every 600 s it took 8.8 s of a 30 s py-spy
sample under load). So it runs only when garbage is seen to pile up: when the process's
allocated blocks per cached envelope (`entries`; `sys.getallocatedblocks`, ~2 ms at 350,000
accounts, so looked at every CHECK_S) have grown by `MALLWATT_GC_FULL_GROWTH` (default 10 %)
over the fewest seen since the last pass, and then at most every `MALLWATT_GC_FULL_S` (600 s).
In a steady state they do not grow (a replaced envelope is freed by reference counting), so
no pass runs; garbage caught by a freeze stays bounded to that share of the state.

The blocks also grow with live data, though: at 350,000 accounts they grew 10-17 % from the
first readings (baselines) to billed ones and with the buffers of the load, and the pass ran
600 s after every start, 4.6-5.7 s of the event loop, freeing 30-312 objects. So a growth of
the blocks is confirmed first: by the frozen objects per entry (`gc.get_freeze_count()`, which
walks the frozen set: 0.2-1 s at 350,000 accounts, a fifth of a pass or less). Garbage caught
by a freeze is containers and raises that count; bigger live values and buffers barely do
(6.80-6.82 M frozen objects in a whole run). The first confirmation sets the mark; a pass runs
when a later one finds the count grown by `growth` over it, and a confirmation that finds no
such growth takes the blocks of now as the new mark (again at most every MALLWATT_GC_FULL_S).
(`gc.get_freeze_count()` would measure the frozen set itself, but it walks it: 0.4 s.)
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FULL_COLLECTION_S = float(os.environ.get("MALLWATT_GC_FULL_S", 600))
FULL_GROWTH = float(os.environ.get("MALLWATT_GC_FULL_GROWTH", 0.10))
CHECK_S = 10.0


class StepCollector:
    """`with collector.step():` around each billing step; `entries` counts the cached
    envelopes, the state the allocated blocks are measured against (default: 1)."""

    def __init__(self, full_every_s: float = FULL_COLLECTION_S, growth: float = FULL_GROWTH,
                 entries: Callable[[], int] | None = None, check_every_s: float = CHECK_S,
                 frozen: Callable[[], int] = gc.get_freeze_count) -> None:
        self.full_every_s = full_every_s
        self.growth = growth
        self.check_every_s = check_every_s
        self._entries = entries or (lambda: 1)
        self._frozen = frozen
        self._last_full = self._next_check = time.monotonic()  # the last full pass or confirmation
        self._least: float | None = None  # fewest blocks per entry since the last full pass
        self._least_frozen: float | None = None  # fewest frozen objects per entry seen by a confirmation
        self.full_collections = 0
        self.confirmations = 0  # frozen-set counts taken because the blocks grew

    def _per_entry(self) -> float:
        return sys.getallocatedblocks() / max(1, self._entries())

    @contextmanager
    def step(self) -> Iterator[None]:
        was = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_every_s
                self._look(now)
            if was:
                gc.enable()

    def _look(self, now: float) -> None:
        per = self._per_entry()
        if self._least is None or per < self._least:
            self._least = per
        elif per > self._least * (1 + self.growth) and now - self._last_full >= self.full_every_s:
            if not self._frozen_grew():  # the state or the process's buffers grew, not garbage
                self._least = per  # look again after as much growth again
                self._last_full = now
                return
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._last_full = time.monotonic()
            self.full_collections += 1
            self._least = self._per_entry()
            self._least_frozen = None  # the next confirmation counts the set the pass left

    def _frozen_grew(self) -> bool:
        """Whether the frozen objects per entry grew by `growth` over the fewest a confirmation
        saw: garbage caught by a freeze is made of such objects (a cycle is containers), while
        the allocated blocks also follow bytes, strings and the live buffers of the load. The
        first confirmation only sets the mark. Counting walks the frozen set (0.2-1 s at
        350,000 accounts under load), a fifth of a full pass or less."""
        self.confirmations += 1
        frozen = self._frozen() / max(1, self._entries())
        least = self._least_frozen
        if least is None or frozen < least:
            self._least_frozen = frozen
        return least is not None and frozen > least * (1 + self.growth)
