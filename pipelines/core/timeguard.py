"""Bounded time: refuse inputs whose timestamp cannot be true before they reach the core.

The core trusts ``ts_ms``: a reading stamped in the year 3000 would be billed, would become the
circuit's last reading (every later real reading is then ``late``) and would push the
lateness and ingest watermarks ahead. So every input is checked against its **reference
time**, the timestamp of the Kafka message that carried it (given explicitly; never the wall
clock, so replay gives the same answer as the stream):

- ``future``: ``ts_ms`` more than ``max_future_skew_s`` ahead of the reference time;
- ``before_start``: ``ts_ms`` before the earliest time the portfolio can bill: the first
  version of the circuit's tariff (of any tariff, for payments and postings) or the configured
  ``earliest``, whichever is later;
- ``absurd``: ``ts_ms`` <= 0 (not after 1970-01-01) or >= 2106-01-01 (``LATEST_MS``; the warehouse's 32-bit epoch seconds end in 2106): no meter,
  collector or provider clock says that; also keeps ms arithmetic far from int64 limits.

A missing reference time (null) skips only the ``future`` check. Null ``ts_ms`` values are left
to the core, which refuses them as ``invalid``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from pipelines.core.models import Tariff

FUTURE, BEFORE_START, ABSURD = "future", "before_start", "absurd"
# the warehouse's day rollups use 32-bit epoch seconds, which end on 2106-02-07
LATEST_MS = int(datetime(2106, 1, 1, tzinfo=UTC).timestamp() * 1000)
DEFAULT_MAX_FUTURE_SKEW_S = 300
REASON_COLUMN = "time_problem"


class TimeLimits(BaseModel):
    """The portfolio's ``time:`` section (every field optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: how far an input's own timestamp may run ahead of its Kafka message time (clock skew
    #: between meter, collector and broker); at most a week
    max_future_skew_s: int = Field(DEFAULT_MAX_FUTURE_SKEW_S, ge=0, le=7 * 86_400)
    #: nothing before this is billed (default: the first tariff version's effective_from)
    earliest: AwareDatetime | None = None


@dataclass(frozen=True)
class Bounds:
    """`TimeLimits` resolved to epoch ms for one portfolio."""

    max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_S * 1000
    earliest_ms: int = 0  # portfolio-wide floor (payments, postings, circuits without their own)
    circuit_floor_ms: Mapping[str, int] = field(default_factory=dict)  # only circuits above earliest_ms


def tariff_start_ms(tariff: Tariff) -> int:
    return min(v.effective_from_ms for v in tariff.versions)


def bounds_for(limits: TimeLimits, tariffs: Iterable[Tariff], circuit_tariff: Mapping[str, str] | None = None
               ) -> Bounds:
    """Resolve limits against the tariffs; ``circuit_tariff`` (circuit id -> tariff id) gives
    circuits whose tariff starts later than the portfolio's first one their own floor."""
    starts = {t.id: tariff_start_ms(t) for t in tariffs}
    configured = int(limits.earliest.timestamp() * 1000) if limits.earliest is not None else 0
    earliest = max(configured, min(starts.values(), default=0))
    floors = {c: starts[t] for c, t in (circuit_tariff or {}).items() if starts.get(t, earliest) > earliest}
    return Bounds(limits.max_future_skew_s * 1000, earliest, floors)


def iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


def explain(code: str, bounds: Bounds) -> str:
    """What a problem code means, for dead letters and rejected rows."""
    if code == FUTURE:
        return f"ts more than {bounds.max_future_skew_ms // 1000} s ahead of the broker time"
    if code == BEFORE_START:
        return "ts before the first tariff version (or the configured earliest time)"
    return f"ts not a plausible epoch-ms time (after 1970-01-01, before {iso(LATEST_MS)})"


def problem(ts_ms: int | None, ref_ms: int | None, bounds: Bounds, floor_ms: int | None = None) -> str | None:
    """One input (payment, posting, command): None if its time is acceptable, else the reason."""
    if ts_ms is None:
        return None
    floor = bounds.earliest_ms if floor_ms is None else floor_ms
    if ts_ms <= 0 or ts_ms >= LATEST_MS:
        return f"{explain(ABSURD, bounds)}: ts_ms={ts_ms}"
    if ts_ms < floor:
        return f"{explain(BEFORE_START, bounds)}: ts {iso(ts_ms)} < {iso(floor)}"
    if ref_ms is not None and ts_ms > ref_ms + bounds.max_future_skew_ms:
        return f"{explain(FUTURE, bounds)}: ts {iso(ts_ms)}, message time {iso(ref_ms)}"
    return None


def split_frame(frame: pl.DataFrame, bounds: Bounds, *, ts_col: str = "ts_ms", ref_col: str = "msg_ts_ms",
                circuit_col: str = "circuit_id") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accepted rows, rejected rows with a ``time_problem`` code column). Vectorised; the
    common case (every row fine) costs a few numpy comparisons. ``ref_col`` is optional: a
    frame without it is checked against the absolute bounds only."""
    if not frame.height:
        return frame, _none_rejected(frame)
    ts_s = frame.get_column(ts_col).cast(pl.Int64)
    ts = _ints(ts_s, 1)
    known = ~ts_s.is_null().to_numpy() if ts_s.null_count() else np.ones(ts.size, dtype=bool)  # null: the core's
    floor: np.ndarray | int = bounds.earliest_ms
    if bounds.circuit_floor_ms and circuit_col in frame.columns:
        floor = frame.get_column(circuit_col).replace_strict(
            dict(bounds.circuit_floor_ms), default=bounds.earliest_ms, return_dtype=pl.Int64).to_numpy()
    absurd = known & ((ts <= 0) | (ts >= LATEST_MS))
    before = known & ~absurd & (ts < floor)
    future = np.zeros(ts.size, dtype=bool)
    if ref_col in frame.columns:
        ref = _ints(frame.get_column(ref_col).cast(pl.Int64), LATEST_MS)  # no reference: no future check
        future = known & ~absurd & ~before & (ts > ref + bounds.max_future_skew_ms)
    bad = absurd | before | future
    if not bad.any():
        return frame, _none_rejected(frame)
    code = np.where(absurd, ABSURD, np.where(before, BEFORE_START, FUTURE))
    mask = pl.Series(bad)
    rejected = frame.filter(mask).with_columns(pl.Series(REASON_COLUMN, code[bad], dtype=pl.String))
    return frame.filter(~mask), rejected


def _ints(s: pl.Series, null: int) -> np.ndarray:
    """Int64 values with nulls as ``null`` (fill_null costs ~0.15 ms a call: only when needed)."""
    return s.fill_null(null).to_numpy() if s.null_count() else s.to_numpy()


def _none_rejected(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.clear().hstack([pl.Series(REASON_COLUMN, [], dtype=pl.String)])


def summarise(rejected: pl.DataFrame, bounds: Bounds, *, what: str = "reading", ts_col: str = "ts_ms",
              ref_col: str = "msg_ts_ms", key_col: str = "circuit_id", examples: int = 5) -> list[str]:
    """One sentence per problem code of ``rejected`` (rows of one message), naming examples."""
    out: list[str] = []
    for code in (FUTURE, BEFORE_START, ABSURD):
        rows = rejected.filter(pl.col(REASON_COLUMN) == code)
        if not rows.height:
            continue
        keys = rows[key_col].to_list() if key_col in rows.columns else ["?"] * rows.height
        named = ", ".join(f"{k}@{iso(t)}" for k, t in list(zip(keys, rows[ts_col].to_list(), strict=True))[:examples])
        more = f" (+{rows.height - examples} more)" if rows.height > examples else ""
        ref = ""
        if code == FUTURE and ref_col in rows.columns and rows[ref_col].null_count() < rows.height:
            ref = f" {iso(int(rows[ref_col].max()))}"  # type: ignore[arg-type]
        out.append(f"{rows.height} {what}(s) refused, {explain(code, bounds)}{ref}: {named}{more}")
    return out
