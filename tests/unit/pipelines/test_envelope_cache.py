"""The worker's envelope cache holds no outboxes, so billing every account (after the first
readings, which only set baselines) does not look like garbage to the step collector."""

from __future__ import annotations

import gc
import sys

from pipelines.core.interval import CircuitState
from pipelines.core.wallet import AccountState
from pipelines.envelope import Envelope, OutboxItem, unframe_value
from pipelines.gc_policy import StepCollector
from pipelines.worker_metrics import ParsedEnvelopes
from tests.unit.pipelines.gc_fixtures import _thawed  # noqa: F401 (autouse)


def billed(i: int, ts: int, outputs: bool = True) -> Envelope:
    """One account as a readings step leaves it: with its ledger and interval rows in the outbox
    (a baseline reading, the first of a circuit, has none)."""
    acc, circ = f"B{i % 90:02d}-S{i:06d}", f"B{i % 90:02d}-S{i:06d}-E1.1"
    load = {"load": {acc: {"circuits": {circ: {"ts": ts, "p": 3262.4 + i, "pf": 0.95, "mw": 3262419, "mm": False}},
                           "last_ts": ts, "over_since": None, "over_alerted": False, "trips": {}}}}
    outbox = [OutboxItem("mallwatt.ledger#rows", acc.encode(), b"l" * 212 + str(i).encode()),
              OutboxItem("mallwatt.intervals#rows", acc.encode(), b"i" * 66 + str(i).encode())] if outputs else []
    return Envelope({acc: AccountState(acc, 9_999_986 - i, 824_000_000, standing_day="2026-07-15",
                                       tier_month=202607, tier_wh=109)},
                    {circ: CircuitState(circ, circ[:-2], ts, 1_407_871 + i, ts, 0, 109, [])},
                    {"mallwatt.readings:5": i}, outbox, 4, {}, load, {})


def test_the_cache_keeps_the_state_and_drops_the_written_outputs() -> None:
    env = billed(7, 1_784_080_980_180)
    written = env.to_bytes()
    cache = ParsedEnvelopes()
    cache["B07-S000007"] = (3, env)
    generation, cached = cache["B07-S000007"]
    assert generation == 3 and cached.outbox == []
    assert env.outbox, "the envelope the step wrote is not changed"
    assert [o.topic for o in unframe_value(written)[0]] == ["mallwatt.ledger#rows", "mallwatt.intervals#rows"]
    assert unframe_value(cached.to_bytes())[1] == unframe_value(written)[1]  # the same state
    quiet = billed(8, 1_784_080_980_180, outputs=False)
    cache["B08-S000008"] = (3, quiet)
    assert cache["B08-S000008"][1] is quiet  # nothing to drop: no copy


def test_billing_after_the_baselines_runs_no_full_collection() -> None:
    """The live worker's first cycle of readings sets baselines (no outputs); from the second on
    every account's new envelope has outputs. With the outputs cached, the cache grew by a sixth
    and the collector (10 % growth) ran a full pass of the heap: seconds of the event loop at
    350,000 accounts, for no garbage."""
    n = 20_000
    cache = ParsedEnvelopes()
    collector = StepCollector(full_every_s=0, growth=0.1, entries=lambda: len(cache), check_every_s=0)
    with collector.step():  # the baseline cycle
        for i in range(n):
            cache[f"k{i}"] = (1, billed(i, 1_784_080_920_180, outputs=False))
    for cycle in range(1, 4):  # billed cycles, a step at a time
        for start in range(0, n, 5_000):
            with collector.step():
                for i in range(start, start + 5_000):
                    cache[f"k{i}"] = (1, billed(i, 1_784_080_920_180 + cycle * 60_000))
    assert collector.full_collections == 0


def test_cached_outputs_would_have_grown_the_state() -> None:
    """The other side of the test above: the growth it guards against is the outputs' (a plain
    dict keeps them), so that test can fail."""
    n = 20_000
    gc.collect()
    base = sys.getallocatedblocks()
    plain = {f"k{i}": (1, billed(i, 1_784_080_920_180, outputs=False)) for i in range(n)}
    quiet = sys.getallocatedblocks() - base
    for i in range(n):
        plain[f"k{i}"] = (1, billed(i, 1_784_080_980_180))
    assert sys.getallocatedblocks() - base > 1.1 * quiet
