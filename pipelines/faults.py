"""Fault injection for the chaos proof: kill this process at a named point, the Nth time.

    MALLWATT_FAULT=after_state_write_before_commit:3     (several: comma-separated)

The variable is read once, here; unset (production) every `fault_point` is a dict lookup that
finds nothing. At the Nth pass of a named point the process sends itself SIGKILL: no finally
blocks, no flush, no commit, no goodbye to the group, exactly like `kill -9` at that line.

Points (where they sit and what a kill there leaves behind):
- ``after_state_write_before_commit``: the worker's state (and claims) writes are acknowledged
  by the broker, the input offsets are not committed yet (pipelines/worker.py, written()).
  A successor re-reads that input; the high-water marks must make it a no-op.
- ``forwarder_after_publish_before_commit``: the forwarder's outputs are delivered, its
  changelog offsets not committed (pipelines/forwarder.py). A successor publishes them again:
  exact duplicates, same ids and fields.
- ``mid_step``: between two account writes of one billing step, or between two rounds of it
  (pipelines/worker.py, store_all). Part of a step is in the changelog, part is not.
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = ("after_state_write_before_commit", "forwarder_after_publish_before_commit", "mid_step")


def parse(spec: str | None) -> dict[str, int]:
    """``name:N[,name:N]`` -> {name: N}; an unknown name or a bad N is a ValueError naming it."""
    plan: dict[str, int] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, count = part.strip().partition(":")
        if name not in POINTS:
            raise ValueError(f"MALLWATT_FAULT: unknown fault point {name!r} (known: {', '.join(POINTS)})")
        try:
            n = int(count or 1)
        except ValueError:
            raise ValueError(f"MALLWATT_FAULT: {name}: expected a count after ':', got {count!r}") from None
        if n < 1:
            raise ValueError(f"MALLWATT_FAULT: {name}: the count must be at least 1, got {n}")
        plan[name] = n
    return plan


_PLAN = parse(os.environ.get("MALLWATT_FAULT"))
_PASSES: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here (SIGKILL) if MALLWATT_FAULT names this point and this is its Nth pass."""
    if not _PLAN or name not in _PLAN:
        return
    _PASSES[name] = _PASSES.get(name, 0) + 1
    if _PASSES[name] == _PLAN[name]:
        sys.stderr.write(f"MALLWATT_FAULT: killing pid {os.getpid()} at {name} (pass {_PASSES[name]})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
