"""Cumulative import registers -> integer-Wh energy intervals, per circuit.

Registers are quantised once, as absolute values, to integer Wh (round half to even of
``import_kwh * 1000``). Interval energy is the difference of consecutive quantised values,
so the sums telescope: whatever sub-Wh part a register value carries is never lost, only
deferred to the interval that ends at the next reading (the per-circuit "residue" is the
last register value itself, kept in state).

Ordering: readings wait in a per-circuit buffer until the circuit's watermark
(max timestamp seen - ``lateness_ms``) passes them, so any arrival order within the lateness
window yields the same intervals. A reading older than the last released one is never
applied: it is reported as ``late`` (an adjustment for an operator or an offline re-rate).

Per released reading, in time order (sequential rules, applied in a Python slow path only
to circuits whose batch shows an anomaly; the common case is vectorised):
- first reading of a circuit: baseline only, no interval;
- another meter_id on the circuit: replacement, new baseline, zero-energy ``replaced`` interval;
- delta >= 0 within the physical limit (max_kw * elapsed + 2 resolution steps): energy;
- delta above the limit: reading quarantined (``spike``), baseline kept; after
  ``SPIKE_REBASELINE`` consecutive spikes the latest reading becomes the baseline (``rebaseline``);
- small negative delta (<= 2 resolution steps): jitter, reading ignored (``regress``);
- negative delta whose wrapped value (modulus - last + new) is within the limit: ``rollover``;
- any other negative delta: reset, new baseline, zero-energy ``reset`` interval (never a
  negative bill; the energy billed before the swap stays billed).
Intervals longer than ``gap_ms`` are flagged ``estimated`` (their energy is still exact; only
the split over TOU periods is an estimate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import polars as pl

from pipelines.core.models import CircuitConfig

SPIKE_REBASELINE = 3
MS_PER_HOUR = 3_600_000

READING_SCHEMA: dict[str, Any] = {
    "circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64, "import_kwh": pl.Float64,
}
INTERVAL_SCHEMA: dict[str, Any] = {
    "circuit_id": pl.String, "meter_id": pl.String, "start_ms": pl.Int64, "end_ms": pl.Int64,
    "energy_wh": pl.Int64, "estimated": pl.Boolean, "flag": pl.String,
}
REJECT_SCHEMA: dict[str, Any] = {
    "circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64, "import_kwh": pl.Float64,
    "reason": pl.String,
}


@dataclass(slots=True)
class CircuitState:
    """Everything the interval step remembers about one circuit (plain data, serialisable)."""

    circuit_id: str
    meter_id: str | None = None  # meter of the last released reading
    last_ts_ms: int | None = None  # last released (billed-up-to) reading
    last_reg_wh: int | None = None
    max_seen_ts_ms: int | None = None  # drives the watermark
    spike_streak: int = 0
    billed_wh: int = 0  # total energy emitted so far (for reconciliation)
    pending: list[tuple[int, str, int]] = field(default_factory=list)  # (ts_ms, meter_id, reg_wh)

    def to_dict(self) -> dict[str, Any]:
        return {
            "circuit_id": self.circuit_id, "meter_id": self.meter_id, "last_ts_ms": self.last_ts_ms,
            "last_reg_wh": self.last_reg_wh, "max_seen_ts_ms": self.max_seen_ts_ms,
            "spike_streak": self.spike_streak, "billed_wh": self.billed_wh,
            "pending": [list(p) for p in self.pending],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CircuitState:
        return cls(**{**d, "pending": [tuple(p) for p in d.get("pending", [])]})


@dataclass(frozen=True, slots=True)
class _Limits:
    max_w: int
    modulus_wh: int | None
    res_wh: int


def _limits(cfg: CircuitConfig) -> _Limits:
    res = int((cfg.register_resolution_kwh * 1000).to_integral_value())
    mod = None
    if cfg.register_max_kwh is not None:
        mod = int(((cfg.register_max_kwh + cfg.register_resolution_kwh) * 1000).to_integral_value())
    return _Limits(int(cfg.max_kw * 1000), mod, max(res, 1))


def limit_wh(max_w: int, elapsed_ms: int, res_wh: int) -> int:
    """Most energy a circuit can plausibly register in ``elapsed_ms``."""
    return max_w * elapsed_ms // MS_PER_HOUR + 2 * res_wh


def _empty(schema: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def compute_intervals(
    states: dict[str, CircuitState],
    readings: pl.DataFrame,
    circuits: dict[str, CircuitConfig],
    *,
    lateness_ms: int = 0,
    gap_ms: int = 20 * 60_000,
    flush: bool = False,
) -> tuple[dict[str, CircuitState], pl.DataFrame, pl.DataFrame]:
    """Advance circuit states by a batch of readings.

    ``readings`` needs READING_SCHEMA columns (others ignored). Returns (states, intervals,
    rejected): ``states`` is a new dict (input states are not mutated), ``intervals`` has
    INTERVAL_SCHEMA, ``rejected`` has REJECT_SCHEMA with reason duplicate / late / invalid /
    unknown_circuit / spike / regress. ``flush=True`` releases all buffered readings (end of
    an offline replay).
    """
    new_states = dict(states)
    df = readings.select(list(READING_SCHEMA)).cast(READING_SCHEMA)
    bad = df["import_kwh"].is_null() | df["import_kwh"].is_nan() | (df["import_kwh"] < 0) \
        | df["import_kwh"].is_infinite() | df["ts_ms"].is_null() | df["circuit_id"].is_null() \
        | df["meter_id"].is_null()
    known = df["circuit_id"].is_in(list(circuits))
    rejects = [
        df.filter(bad).with_columns(reason=pl.lit("invalid")),
        df.filter(~bad & ~known).with_columns(reason=pl.lit("unknown_circuit")),
    ]
    df = df.filter(~bad & known).with_columns(
        reg_wh=(pl.col("import_kwh") * 1000).round(0).cast(pl.Int64), src=pl.lit(1, pl.Int8))

    touched = df["circuit_id"].unique().to_list() if flush is False else \
        sorted(set(df["circuit_id"].unique().to_list()) | {c for c, s in states.items() if s.pending})
    pend = [(c, ts, m, r) for c in touched if c in states for ts, m, r in states[c].pending]
    if pend:
        pdf = pl.DataFrame(pend, schema=["circuit_id", "ts_ms", "meter_id", "reg_wh"], orient="row") \
            .with_columns(import_kwh=pl.col("reg_wh") / 1000, src=pl.lit(0, pl.Int8))
        df = pl.concat([pdf.select(df.columns).cast(df.schema), df])
    if df.is_empty():
        return new_states, _empty(INTERVAL_SCHEMA), pl.concat(rejects).select(list(REJECT_SCHEMA))

    st = pl.DataFrame({
        "circuit_id": touched,
        "last_ts": [states[c].last_ts_ms if c in states else None for c in touched],
        "last_reg": [states[c].last_reg_wh if c in states else None for c in touched],
        "last_meter": [states[c].meter_id if c in states else None for c in touched],
        "seen": [states[c].max_seen_ts_ms if c in states else None for c in touched],
        "streak": [states[c].spike_streak if c in states else 0 for c in touched],
    }, schema={"circuit_id": pl.String, "last_ts": pl.Int64, "last_reg": pl.Int64,
               "last_meter": pl.String, "seen": pl.Int64, "streak": pl.Int64})

    # Sorting on every column makes "which duplicate wins" independent of arrival order.
    df = df.sort(["circuit_id", "ts_ms", "src", "meter_id", "reg_wh"])
    dup = df.select(pl.struct("circuit_id", "ts_ms").is_duplicated() &
                    ~pl.struct("circuit_id", "ts_ms").is_first_distinct()).to_series()
    rejects.append(df.filter(dup & (pl.col("src") == 1)).with_columns(reason=pl.lit("duplicate")))
    df = df.filter(~dup).join(st, on="circuit_id", how="left")
    old = pl.col("last_ts").is_not_null() & (pl.col("ts_ms") <= pl.col("last_ts"))
    rejects.append(df.filter(old & (pl.col("ts_ms") == pl.col("last_ts")))
                   .with_columns(reason=pl.lit("duplicate")))
    rejects.append(df.filter(old & (pl.col("ts_ms") < pl.col("last_ts")))
                   .with_columns(reason=pl.lit("late")))
    df = df.filter(~old).with_columns(
        seen=pl.max_horizontal(pl.col("seen"), pl.col("ts_ms").max().over("circuit_id")))
    release = pl.lit(True) if flush else pl.col("ts_ms") <= pl.col("seen") - lateness_ms
    held = df.filter(~release)
    df = df.filter(release)

    intervals, slow_rejects = _released(df, circuits, gap_ms, new_states)
    rejects.extend(slow_rejects)

    # Buffer and watermark bookkeeping for every touched circuit.
    held_by: dict[str, list[tuple[int, str, int]]] = {}
    for c, ts, m, r in held.select("circuit_id", "ts_ms", "meter_id", "reg_wh").iter_rows():
        held_by.setdefault(c, []).append((ts, m, r))
    seen_by = dict(pl.concat([df.select("circuit_id", "seen"), held.select("circuit_id", "seen")])
                   .group_by("circuit_id").agg(pl.col("seen").max()).iter_rows())
    for c in touched:
        s = new_states.get(c) or CircuitState(c)
        s = CircuitState.from_dict(s.to_dict())
        s.pending = held_by.get(c, [])
        if seen_by.get(c) is not None:
            s.max_seen_ts_ms = seen_by[c]
        new_states[c] = s
    _apply_released(new_states, intervals, df)

    rej = pl.concat([r.select(list(REJECT_SCHEMA)).cast(REJECT_SCHEMA) for r in rejects])
    return new_states, intervals, rej


def _released(
    df: pl.DataFrame, circuits: dict[str, CircuitConfig], gap_ms: int, new_states: dict[str, CircuitState],
) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Intervals for released readings: vectorised, with a sequential path for anomalies."""
    if df.is_empty():
        return _empty(INTERVAL_SCHEMA), []
    cids = df["circuit_id"].unique().to_list()
    lim = {c: _limits(circuits[c]) for c in cids}
    cfg = pl.DataFrame({"circuit_id": cids, "max_w": [lim[c].max_w for c in cids],
                        "res": [lim[c].res_wh for c in cids]},
                       schema={"circuit_id": pl.String, "max_w": pl.Int64, "res": pl.Int64})
    df = df.join(cfg, on="circuit_id", how="left").with_columns(
        prev_ts=pl.col("ts_ms").shift(1).over("circuit_id").fill_null(pl.col("last_ts")),
        prev_reg=pl.col("reg_wh").shift(1).over("circuit_id").fill_null(pl.col("last_reg")),
        prev_meter=pl.col("meter_id").shift(1).over("circuit_id").fill_null(pl.col("last_meter")),
    ).with_columns(
        delta=pl.col("reg_wh") - pl.col("prev_reg"),
        limit=pl.col("max_w") * (pl.col("ts_ms") - pl.col("prev_ts")) // MS_PER_HOUR + 2 * pl.col("res"),
    )
    anomaly = pl.col("prev_ts").is_not_null() & (
        (pl.col("meter_id") != pl.col("prev_meter")) | (pl.col("delta") < 0) | (pl.col("delta") > pl.col("limit")))
    df = df.with_columns(slow=(anomaly.any() | (pl.col("streak").first() > 0)).over("circuit_id"))
    fast = df.filter(~pl.col("slow") & pl.col("prev_ts").is_not_null()).select(
        "circuit_id", "meter_id", start_ms=pl.col("prev_ts"), end_ms=pl.col("ts_ms"),
        energy_wh=pl.col("delta"), estimated=(pl.col("ts_ms") - pl.col("prev_ts")) > gap_ms,
        flag=pl.lit(""))
    slow = df.filter(pl.col("slow"))
    out_rows: list[tuple[Any, ...]] = []
    rej_rows: list[tuple[Any, ...]] = []
    streaks: dict[str, int] = {}
    for (cid,), part in slow.group_by(["circuit_id"], maintain_order=True):
        first = part.row(0, named=True)
        streaks[cid] = _sequential(
            cid, first["last_ts"], first["last_reg"], first["last_meter"], first["streak"],
            part.select("ts_ms", "meter_id", "reg_wh").rows(), lim[cid], gap_ms, out_rows, rej_rows)
    for c in cids:
        s = new_states.get(c) or CircuitState(c)
        new_states[c] = CircuitState.from_dict({**s.to_dict(), "spike_streak": streaks.get(c, 0)})
    intervals = pl.concat([
        fast.cast(INTERVAL_SCHEMA),
        pl.DataFrame(out_rows, schema=INTERVAL_SCHEMA, orient="row"),
    ]).sort(["circuit_id", "end_ms"])
    rejected = [pl.DataFrame(rej_rows, schema=REJECT_SCHEMA, orient="row")] if rej_rows else []
    return intervals, rejected


def _sequential(
    cid: str, base_ts: int | None, base_reg: int | None, base_meter: str | None, streak: int,
    rows: list[tuple[int, str, int]], lim: _Limits, gap_ms: int,
    out: list[tuple[Any, ...]], rej: list[tuple[Any, ...]],
) -> int:
    """The per-reading rules of the module docstring; returns the spike streak left over."""
    for ts, meter, reg in rows:
        if base_ts is None or base_reg is None:
            base_ts, base_reg, base_meter = ts, reg, meter
            continue
        elapsed = ts - base_ts
        limit = limit_wh(lim.max_w, elapsed, lim.res_wh)
        est = elapsed > gap_ms
        d = reg - base_reg
        flag: str | None = None
        energy = 0
        if meter != base_meter:
            flag = "replaced"
        elif 0 <= d <= limit:
            flag, energy = "", d
        elif d > limit:
            streak += 1
            rej.append((cid, meter, ts, reg / 1000, f"spike: {d} Wh in {elapsed} ms > {limit} Wh"))
            if streak < SPIKE_REBASELINE:
                continue
            flag = "rebaseline"
        elif d >= -2 * lim.res_wh:
            rej.append((cid, meter, ts, reg / 1000, f"regress: {d} Wh"))
            continue
        elif lim.modulus_wh is not None and 0 <= lim.modulus_wh - base_reg + reg <= limit:
            flag, energy = "rollover", lim.modulus_wh - base_reg + reg
        else:
            flag = "reset"
        out.append((cid, meter, base_ts, ts, energy, est, flag))
        base_ts, base_reg, base_meter, streak = ts, reg, meter, 0
    return streak


def _apply_released(states: dict[str, CircuitState], intervals: pl.DataFrame, released: pl.DataFrame) -> None:
    """Move each circuit's baseline to its last released reading that was not rejected."""
    if not intervals.is_empty():
        ends = intervals.group_by("circuit_id").agg(
            pl.col("end_ms").max().alias("end"), pl.col("energy_wh").sum().alias("wh"))
        for c, end, wh in ends.iter_rows():
            states[c].last_ts_ms = end
            states[c].billed_wh += wh
        reg_at = released.join(ends.select("circuit_id", ts_ms="end"), on=["circuit_id", "ts_ms"])
        for c, m, r in reg_at.select("circuit_id", "meter_id", "reg_wh").iter_rows():
            states[c].last_reg_wh, states[c].meter_id = r, m
    # A circuit's very first reading only sets the baseline.
    firsts = released.filter(pl.col("last_ts").is_null()).group_by("circuit_id").agg(
        pl.col("ts_ms").first(), pl.col("reg_wh").first(), pl.col("meter_id").first())
    for c, ts, r, m in firsts.iter_rows():
        s = states[c]
        if s.last_ts_ms is None:
            s.last_ts_ms, s.last_reg_wh, s.meter_id = ts, r, m


def to_decimal_kwh(wh: int) -> Decimal:
    return Decimal(wh) / 1000
