"""The step collector: no full pass while the state is steady, one when garbage piles up."""

from __future__ import annotations

import gc
import sys

from pipelines.gc_policy import StepCollector
from tests.unit.pipelines.gc_fixtures import _thawed  # noqa: F401 (autouse)


def _cycles(n: int) -> list[list[object]]:
    out = []
    for _ in range(n):
        a: list[object] = []
        a.append(a)
        out.append(a)
    return out


def test_replacing_state_without_cycles_never_runs_a_full_pass() -> None:
    state = {i: {"v": [i]} for i in range(20_000)}
    c = StepCollector(full_every_s=0, growth=0.1, entries=lambda: len(state), check_every_s=0)
    for round_ in range(20):
        with c.step():
            assert not gc.isenabled()
            for i in range(round_ * 1_000, round_ * 1_000 + 5_000):
                state[i % 20_000] = {"v": [i, round_]}
    assert gc.isenabled()
    assert c.full_collections == 0


def test_frozen_garbage_that_piles_up_is_collected_once() -> None:
    c = StepCollector(full_every_s=0, growth=0.1, entries=lambda: 1, check_every_s=0)
    with c.step():
        pass
    start = sys.getallocatedblocks()
    steps = 0
    while c.full_collections == 0:
        with c.step():
            junk = _cycles(start // 40)  # alive at the freeze, garbage after
        del junk
        steps += 1
        assert steps < 10
    assert steps >= 2  # growth of 10 %: not at the first few percent
    assert sys.getallocatedblocks() < start * 1.08  # the dead cycles of the earlier steps are gone
    for _ in range(3):
        with c.step():
            pass
    assert c.full_collections == 1


def test_a_full_pass_waits_for_its_interval() -> None:
    c = StepCollector(full_every_s=3600, growth=0.1, entries=lambda: 1, check_every_s=0)
    with c.step():
        pass
    for _ in range(5):
        with c.step():
            junk = _cycles(sys.getallocatedblocks() // 20)
        del junk
    assert c.full_collections == 0


def test_state_that_grows_without_garbage_runs_no_full_pass() -> None:
    """The allocated blocks also follow live data that holds no new containers (here each entry's
    strings, in the worker its bigger envelopes and the buffers of the load): a 10 % growth of
    them made a full pass of the heap, about 5 s of the event loop at 350,000 accounts, that
    found 30-312 objects of garbage. The frozen objects per entry did not grow: no pass."""
    n = 100_000
    state: dict[int, list[str]] = {i: [f"a{i}"] for i in range(n)}
    frozen_counts: list[int] = []

    def frozen() -> int:
        frozen_counts.append(gc.get_freeze_count())
        return frozen_counts[-1]

    c = StepCollector(full_every_s=0, growth=0.1, entries=lambda: len(state), check_every_s=0, frozen=frozen)
    with c.step():
        pass
    for width in range(2, 12):  # each entry keeps one list and holds more strings every step
        with c.step():
            for i in range(n):
                state[i] = [f"{w}-{i}" for w in range(width)]
    assert c.confirmations >= 2  # the blocks grew past the threshold more than once
    assert c.full_collections == 0


def test_frozen_cycles_still_make_a_full_pass_after_the_first_confirmation() -> None:
    """Garbage caught by a freeze raises the frozen objects too: the first confirmation sets the
    mark, a later one that sees them grown runs the pass, which frees them."""
    c = StepCollector(full_every_s=0, growth=0.1, entries=lambda: 1, check_every_s=0)
    with c.step():
        pass
    start = sys.getallocatedblocks()
    for _ in range(30):
        with c.step():
            junk = _cycles(start // 40)
        del junk
        if c.full_collections:
            break
    assert c.confirmations >= 2 and c.full_collections == 1
    assert sys.getallocatedblocks() < start * 1.08
