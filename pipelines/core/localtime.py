"""Local calendar fields of UTC instants, computed once per 15-minute UTC slot, not per row.

Every TOU label the core needs (local month, hour, weekday, date) is constant inside a
15-minute UTC slot as long as the zone's offset is a multiple of 15 minutes and does not change
inside the slot (true of every modern zone rule; checked, not assumed). So a batch converts
only the slots it spans, exactly, with the zone database (DST included), and rows look their
slot up by integer arithmetic: ``fields[ms // GRID_MS - first_slot]``. When the check fails
(historical offsets such as LMT +08:05:43) or the span is huge, callers fall back to
converting each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np
import polars as pl

from pipelines.core.models import GRID_MS

MAX_SLOTS = 2_000_000  # ~57 years of slots; beyond that rows are converted one by one
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class SlotFields:
    """Local fields for slots ``first .. first + len - 1`` (slot = epoch ms // GRID_MS)."""

    first: int
    month: np.ndarray  # 1..12
    hour: np.ndarray  # 0..23
    wday: np.ndarray  # Mon=0
    day: np.ndarray  # local date as days since 1970-01-01
    yyyymm: np.ndarray

    def index(self, ms: np.ndarray) -> np.ndarray:
        return ms // GRID_MS - self.first


def slot_fields(tz: str, lo_ms: int, hi_ms: int) -> SlotFields | None:
    """Fields of every slot touching [lo_ms, hi_ms] in zone ``tz``; None if not slot-constant."""
    first, last = lo_ms // GRID_MS, hi_ms // GRID_MS
    if last - first + 1 > MAX_SLOTS:
        return None
    starts = pl.Series("s", np.arange(first, last + 1, dtype=np.int64) * GRID_MS)
    df = pl.DataFrame(starts).with_columns(e=pl.col("s") + (GRID_MS - 1)).select(
        off_s=_offset("s", tz), off_e=_offset("e", tz),
        local=pl.from_epoch("s", time_unit="ms").dt.replace_time_zone("UTC").dt.convert_time_zone(tz))
    off_s, off_e = df["off_s"].to_numpy(), df["off_e"].to_numpy()
    if (off_s != off_e).any() or (off_s % GRID_MS).any():
        return None
    local = df["local"]
    return SlotFields(
        first=first, month=local.dt.month().to_numpy().astype(np.int64),
        hour=local.dt.hour().to_numpy().astype(np.int64),
        wday=(local.dt.weekday() - 1).to_numpy().astype(np.int64),
        day=((starts.to_numpy() + off_s) // 86_400_000).astype(np.int64),
        yyyymm=(local.dt.year() * 100 + local.dt.month()).to_numpy().astype(np.int64))


def _offset(col: str, tz: str) -> pl.Expr:
    """UTC offset in ms at each instant of ``col`` (epoch ms)."""
    local = pl.from_epoch(col, time_unit="ms").dt.replace_time_zone("UTC").dt.convert_time_zone(tz)
    return local.dt.replace_time_zone(None).dt.epoch("ms") - pl.col(col)


@lru_cache(maxsize=4096)
def day_iso(day: int) -> str:
    """ISO date of a local day number (days since 1970-01-01)."""
    return date.fromordinal(EPOCH_ORDINAL + day).isoformat()


@lru_cache(maxsize=4096)
def iso_day(iso: str) -> int:
    return date.fromisoformat(iso).toordinal() - EPOCH_ORDINAL
