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
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np
import polars as pl

from pipelines.core import cols
from pipelines.core.cols import chunked, take
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
    return cols.empty(schema)


class CircuitIndex:
    """Circuit ids as ranks in sorted order (sorting by rank sorts by id) and their limits."""

    def __init__(self, circuits: dict[str, CircuitConfig]) -> None:
        self.circuits = circuits
        self.ids = sorted(circuits)
        self.rank = {c: i for i, c in enumerate(self.ids)}
        self.id_series = chunked("circuit_id", self.ids, pl.String)
        self.limits = [_limits(circuits[c]) for c in self.ids]
        self.max_w = np.array([x.max_w for x in self.limits], dtype=np.int64)
        self.res = np.array([x.res_wh for x in self.limits], dtype=np.int64)

    @cached_property
    def enum(self) -> pl.Enum:
        """An Enum of every circuit, built on first use (~30 ms at 350,000 circuits): a stream
        step of fewer rows than half the portfolio never needs it (see `_circuit_codes`)."""
        return pl.Enum(self.id_series)


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
    st, iv, rej, _ = interval_arrays(states, readings, CircuitIndex(circuits), lateness_ms=lateness_ms,
                                     gap_ms=gap_ms, flush=flush)
    return st, iv, rej


def _copy(s: CircuitState) -> CircuitState:
    return CircuitState(s.circuit_id, s.meter_id, s.last_ts_ms, s.last_reg_wh, s.max_seen_ts_ms, s.spike_streak,
                        s.billed_wh, list(s.pending))


class _Meters:
    """The batch's meter ids: a Python list up to ``cols.SMALL`` rows (no polars call per use),
    else a polars Series. Codes: equal ids <=> equal codes; ranks: dense, in id order."""

    def __init__(self, s: pl.Series | None, values: list[str] | None = None) -> None:
        if values is None and s is not None and s.len() <= cols.SMALL:
            values = s.to_list()
        self.s, self.v = (None, values) if values is not None else (s, None)

    def prepend(self, head: list[str]) -> _Meters:
        if self.v is not None:
            return _Meters(None, head + self.v)
        assert self.s is not None
        return _Meters(pl.concat([pl.Series("meter_id", head, dtype=pl.String), self.s]))

    def ranks(self) -> np.ndarray:
        if self.v is not None:
            rank = {m: i for i, m in enumerate(sorted(set(self.v)))}
            return np.array([rank[m] for m in self.v], dtype=np.int64)
        assert self.s is not None
        return self.s.rank("dense").to_numpy().astype(np.int64)

    def codes_with(self, last: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """`codes`, and the codes of ``last`` (the states' last meters) in the same coding:
        -2 for None, and a code no row has (-1 if there are few rows) for a meter not in the batch."""
        if self.v is not None:
            code: dict[str, int] = {}
            mcode = np.array([code.setdefault(m, len(code)) for m in self.v], dtype=np.int64)
            return mcode, np.array([code.get(m, -1) if m is not None else -2 for m in last], dtype=np.int64)
        assert self.s is not None
        n = self.s.len()  # one cast of both: equal ids get equal codes
        both = pl.concat([self.s, pl.Series("meter_id", last, dtype=pl.String)]).cast(pl.Categorical).to_physical()
        codes = both.cast(pl.Int64).fill_null(-2).to_numpy() if both.null_count() else both.to_numpy().astype(np.int64)
        return codes[:n], codes[n:]

    def take(self, idx: np.ndarray) -> _Meters:
        if self.v is not None:
            return _Meters(None, [self.v[i] for i in idx.tolist()])
        assert self.s is not None
        return _Meters(self.s[idx])

    def list(self, idx: np.ndarray) -> list[str]:
        if self.v is not None:
            return [self.v[i] for i in idx.tolist()]
        assert self.s is not None
        return self.s[idx].to_list()

    def series(self, idx: np.ndarray) -> pl.Series:
        if self.v is not None:
            return pl.Series("meter_id", [self.v[i] for i in idx.tolist()], dtype=pl.String)
        assert self.s is not None
        return self.s[idx]

    def __getitem__(self, i: int) -> str:
        return self.v[i] if self.v is not None else self.s[i]  # type: ignore[index]


def _reading_columns(readings: pl.DataFrame) -> tuple[pl.Series, _Meters, np.ndarray, np.ndarray, np.ndarray]:
    """(circuit ids, meter ids, ts_ms, import_kwh, invalid mask) without a polars expression."""
    got = {k: readings.get_column(k) for k in READING_SCHEMA}
    got = {k: s if s.dtype == READING_SCHEMA[k] else s.cast(READING_SCHEMA[k]) for k, s in got.items()}
    circ, meter, ts_s, kwh_s = got.values()
    kwh = kwh_s.to_numpy()  # nulls become NaN
    with np.errstate(invalid="ignore"):
        bad = np.isnan(kwh) | (kwh < 0) | np.isinf(kwh)
    for s in (ts_s, circ, meter):
        if s.null_count():
            bad |= s.is_null().to_numpy()
    ts = ts_s.fill_null(0).to_numpy() if ts_s.null_count() else ts_s.to_numpy()
    return circ, _Meters(meter), ts, kwh, bad


def _circuit_codes(circ: pl.Series, ix: CircuitIndex) -> np.ndarray:
    """Circuit rank of each row, -1 for unknown (or null) circuits. The cost follows the rows:
    a cast to the Enum of every circuit builds a hash map of the whole portfolio per call
    (~120 ms at 350,000 circuits, whatever the batch), so it is used only when the rows are as
    many as half the portfolio (there it is the cheapest); below, the ranks of the batch's
    distinct ids come from the index's dict."""
    n = circ.len()
    if n <= cols.SMALL:
        rank = ix.rank
        return np.array([rank.get(c, -1) for c in circ.to_list()], dtype=np.int64)  # type: ignore[arg-type]
    if 2 * n < len(ix.ids):
        return cols.ranks(circ, ix.rank)
    p = circ.cast(ix.enum, strict=False).to_physical()
    if p.null_count():
        return p.cast(pl.Int64).fill_null(-1).to_numpy()
    return p.to_numpy().astype(np.int64)


def _rej(circ: pl.Series, meter: pl.Series, ts: np.ndarray, kwh: np.ndarray, reason: str) -> pl.DataFrame:
    return cols.frame(REJECT_SCHEMA, {"circuit_id": circ, "meter_id": meter, "ts_ms": ts, "import_kwh": kwh,
                                      "reason": cols.repeat("reason", reason, ts.size, pl.String)})


def interval_arrays(
    states: dict[str, CircuitState], readings: pl.DataFrame, ix: CircuitIndex, *, lateness_ms: int,
    gap_ms: int, flush: bool, codes: np.ndarray | None = None,
) -> tuple[dict[str, CircuitState], pl.DataFrame, pl.DataFrame, np.ndarray]:
    """`compute_intervals` plus the circuit rank of each interval row (for the engine).
    ``codes``: each reading's circuit rank in ``ix`` (-1: unknown), when the caller has them."""
    new_states = dict(states)
    circ_s, meters, ts, kwh, bad = _reading_columns(readings)
    cidx = _circuit_codes(circ_s, ix) if codes is None else codes
    known = cidx >= 0
    rejects: list[pl.DataFrame] = []
    if bad.any() or not known.all():
        df = readings.select(list(READING_SCHEMA)).cast(READING_SCHEMA)
        rejects += [df.filter(pl.Series(bad)).with_columns(reason=pl.lit("invalid")),
                    df.filter(pl.Series(~bad & ~known)).with_columns(reason=pl.lit("unknown_circuit"))]
        keep = np.flatnonzero(~bad & known)
        meters, ts, kwh, cidx = meters.take(keep), ts[keep], kwh[keep], cidx[keep]
    reg = np.rint(kwh * 1000).astype(np.int64)  # == polars round(0): half to even
    ts = ts.astype(np.int64, copy=False)

    present = cols.distinct(cidx, len(ix.ids))
    if flush:
        pend_c = {ix.rank[c] for c, s in states.items() if s.pending and c in ix.rank}
        present = np.union1d(present, np.array(sorted(pend_c), dtype=np.int64))
    touched = [ix.ids[i] for i in present.tolist()]
    prior = _Gathered(list(map(states.get, touched)))
    n_p = len(prior.pend)
    if n_p:
        cidx = np.concatenate([np.repeat(present, prior.pend_counts), cidx])
        p_ts, p_meter, p_reg = zip(*prior.pend, strict=True)
        p_reg_a = np.array(p_reg, dtype=np.int64)
        ts = np.concatenate([np.array(p_ts, dtype=np.int64), ts])
        reg = np.concatenate([p_reg_a, reg])
        kwh = np.concatenate([p_reg_a / 1000, kwh])
        meters = meters.prepend(list(p_meter))
    if cidx.size == 0:
        return new_states, _empty(INTERVAL_SCHEMA), _concat_rejects(rejects), np.zeros(0, dtype=np.int64)
    src = (np.arange(cidx.size) >= n_p).astype(np.int64)  # 0: pending from state, 1: this batch
    mcode, lm_code = meters.codes_with(prior.meter)

    # Order by (circuit, ts); ties (duplicates) by every column, so the winner ignores arrival order.
    order = None if lex_sorted((cidx, ts)) else np.lexsort((ts, cidx))
    if order is not None:
        cidx, ts = cidx[order], ts[order]
    same = (cidx[1:] == cidx[:-1]) & (ts[1:] == ts[:-1])
    if same.any():
        mrank = meters.ranks()
        o2 = np.lexsort((reg, mrank, src, ts, cidx)) if order is None else \
            np.lexsort((reg[order], mrank[order], src[order], ts, cidx))
        order = o2 if order is None else order[o2]
        cidx, ts = cidx[o2], ts[o2]
        same = (cidx[1:] == cidx[:-1]) & (ts[1:] == ts[:-1])
    if order is not None:
        reg, kwh, src, mcode = reg[order], kwh[order], src[order], mcode[order]
        meters = meters.take(order)
    dup = np.concatenate(([False], same))
    row = np.arange(cidx.size)

    # State per touched circuit, gathered by rank.
    k = len(touched)
    pos = np.full(len(ix.ids), -1, dtype=np.int64)
    pos[present] = np.arange(k)
    has_last, last_ts, last_reg, last_meter = ~prior.ts_none, prior.last_ts, prior.last_reg, prior.meter
    seen0, streak = prior.seen, prior.streak

    def rows(mask: np.ndarray, reason: str) -> None:
        if mask.any():
            i = row[mask]
            rejects.append(_rej(take(ix.id_series, cidx[i], ix.ids), meters.series(i), ts[i], kwh[i], reason))

    rows(dup & (src == 1), "duplicate")
    t = pos[cidx]
    old = ~dup & has_last[t] & (ts <= last_ts[t])
    rows(old & (ts == last_ts[t]), "duplicate")
    rows(old & (ts < last_ts[t]), "late")
    alive = ~dup & ~old
    seen = seen0.copy()
    np.maximum.at(seen, t[alive], ts[alive])
    release = alive if flush else alive & (ts <= seen[t] - lateness_ms)
    held = alive & ~release

    rel = row[release]
    iv, iv_c, slow_rej, streaks, ends = _released(rel, cidx, ts, reg, mcode, meters, t, has_last, last_ts,
                                                  last_reg, lm_code, streak, last_meter, ix, gap_ms, touched)
    rejects.extend(slow_rej)

    alive_c = np.zeros(k, dtype=bool)
    alive_c[t[alive]] = True
    first = np.full(k, -1, dtype=np.int64)  # first released row of circuits without a baseline
    nb = rel[~has_last[t[rel]]]
    uc, fi = np.unique(t[nb], return_index=True)
    first[uc] = nb[fi]

    # New states, built from columns: every touched circuit gets a new object (inputs are never mutated).
    new_ts, new_reg, new_billed, new_streak = last_ts.copy(), last_reg.copy(), prior.billed.copy(), streak.copy()
    ts_none, reg_none = prior.ts_none.copy(), prior.reg_none.copy()
    meter = list(last_meter)
    new_streak[ends.heads] = 0
    for x, v in streaks.items():
        new_streak[x] = v
    fx = ends.fast_x
    new_ts[fx], new_reg[fx] = ends.fast_ts, ends.fast_reg
    new_billed[fx] += ends.fast_wh
    ts_none[fx] = reg_none[fx] = False
    moved = np.flatnonzero(mcode[ends.fast_row] != lm_code[fx])  # meter differs from the state's
    for x, mm in zip(fx[moved].tolist(), meters.list(ends.fast_row[moved]), strict=True):
        meter[x] = mm
    for x, (e, wh, rg, mm) in ends.slow.items():
        new_ts[x], new_billed[x], new_reg[x], meter[x] = e, new_billed[x] + wh, rg, mm
        ts_none[x] = reg_none[x] = False
    has_end = np.zeros(k, dtype=bool)
    has_end[fx] = True
    has_end[list(ends.slow)] = True
    for x in np.flatnonzero((first >= 0) & prior.ts_none & ~has_end).tolist():
        f = int(first[x])
        new_ts[x], new_reg[x], meter[x] = ts[f], reg[f], meters[f]
        ts_none[x] = reg_none[x] = False
    seen_new = np.where(alive_c, seen, seen0)
    hi = row[held]  # in (circuit, ts) order
    held_rows = zip(ts[hi].tolist(), meters.list(hi), reg[hi].tolist(), strict=True)
    if hi.size == k and (t[hi] == np.arange(k)).all():  # live input: one reading waits per circuit
        pending = [[h] for h in held_rows]
    else:
        pending = [[] for _ in range(k)]
        for x, h in zip(t[hi].tolist(), held_rows, strict=True):
            pending[x].append(h)
    new_states.update(zip(touched, map(
        CircuitState, touched, meter, _nullable(new_ts, ts_none), _nullable(new_reg, reg_none),
        _nullable(seen_new, prior.seen_none & ~alive_c), new_streak.tolist(), new_billed.tolist(), pending), strict=True))
    return new_states, iv, _concat_rejects(rejects), iv_c


class _Gathered:
    """The touched circuits' states as columns, each state object read once (``None``: no state;
    ``*_none``: the field is None, its array value is a placeholder)."""

    def __init__(self, sts: list[CircuitState | None]) -> None:
        rows = [(s.last_ts_ms, s.last_reg_wh, s.max_seen_ts_ms, s.spike_streak, s.meter_id, s.billed_wh, s.pending)
                if s is not None else _NO_STATE for s in sts]
        lt, lr, ms, sk, mt, bw, pend = zip(*rows, strict=True) if rows else ((),) * 7
        self.last_ts, self.ts_none = _ints(lt, 0)
        self.last_reg, self.reg_none = _ints(lr, 0)
        self.seen, self.seen_none = _ints(ms, int(np.iinfo(np.int64).min))
        self.streak = np.array(sk, dtype=np.int64)
        self.billed = np.array(bw, dtype=np.int64)
        self.meter: list[str | None] = list(mt)
        self.pend_counts = np.array(list(map(len, pend)), dtype=np.int64)
        self.pend: list[tuple[int, str, int]] = list(chain.from_iterable(pend)) if self.pend_counts.any() else []


_NO_STATE: tuple[Any, ...] = (None, None, None, 0, None, 0, ())


def _ints(values: tuple[Any, ...], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 array of ``values`` (None -> ``fill``) and the None mask."""
    try:
        return np.array(values, dtype=np.int64), np.zeros(len(values), dtype=bool)
    except TypeError:  # some None
        none = np.array([v is None for v in values], dtype=bool)
        return np.array([fill if v is None else v for v in values], dtype=np.int64), none


def _nullable(a: np.ndarray, none: np.ndarray) -> list[int | None]:
    out: list[int | None] = a.tolist()
    for x in np.flatnonzero(none).tolist():
        out[x] = None
    return out


def _concat_rejects(rejects: list[pl.DataFrame]) -> pl.DataFrame:
    if not rejects:
        return _empty(REJECT_SCHEMA)
    return pl.concat([r.select(list(REJECT_SCHEMA)).cast(REJECT_SCHEMA) for r in rejects])


@dataclass
class _Ends:
    """What `_released` changes in the touched circuits' states (indices: touched positions)."""

    heads: np.ndarray  # circuits with released rows (spike streak reset unless in ``streaks``)
    fast_x: np.ndarray  # vectorised circuits whose last released row ends an interval ...
    fast_ts: np.ndarray  # ... its time,
    fast_wh: np.ndarray  # their energy in this batch,
    fast_reg: np.ndarray  # the register value
    fast_row: np.ndarray  # and row (its meter)
    slow: dict[int, tuple[int, int, int, str]]  # sequential path: (end, energy, register, meter)


def _released(
    rel: np.ndarray, cidx: np.ndarray, ts: np.ndarray, reg: np.ndarray, mcode: np.ndarray, meters: _Meters,
    t: np.ndarray, has_last: np.ndarray, last_ts: np.ndarray, last_reg: np.ndarray, lm_code: np.ndarray,
    streak: np.ndarray, last_meter: list[str | None], ix: CircuitIndex, gap_ms: int, touched: list[str],
) -> tuple[pl.DataFrame, np.ndarray, list[pl.DataFrame], dict[int, int], _Ends]:
    """Intervals for released rows (``rel``, in (circuit, ts) order): vectorised, with a
    sequential path for circuits showing an anomaly. Also returns the new spike streak of the
    circuits on the sequential path (the others with released rows reset theirs) and the (end,
    energy, register, meter) of the last interval per touched circuit."""
    z = np.zeros(0, dtype=np.int64)
    if rel.size == 0:
        return _empty(INTERVAL_SCHEMA), z, [], {}, _Ends(z, z, z, z, z, z, {})
    c, tt, r, m, ti = cidx[rel], ts[rel], reg[rel], mcode[rel], t[rel]
    head = np.concatenate(([True], c[1:] != c[:-1]))
    prev_ts, prev_reg, prev_m = (np.concatenate(([0], x[:-1])) for x in (tt, r, m))
    prev_ts[head], prev_reg[head], prev_m[head] = last_ts[ti[head]], last_reg[ti[head]], lm_code[ti[head]]
    has_prev = ~head | has_last[ti]
    delta = r - prev_reg
    limit = ix.max_w[c] * (tt - prev_ts) // MS_PER_HOUR + 2 * ix.res[c]
    anomaly = has_prev & ((m != prev_m) | (delta < 0) | (delta > limit))
    seg = np.cumsum(head) - 1
    slow_seg = np.zeros(int(seg[-1]) + 1, dtype=bool)
    slow_seg[seg[anomaly]] = True
    slow_seg[streak[ti[head]] > 0] = True
    slow = slow_seg[seg]
    fast = ~slow & has_prev
    fi = np.flatnonzero(fast)
    streaks: dict[int, int] = {}
    # Fast circuits: the last released row ends the last interval.
    last_rows = np.flatnonzero(np.append(c[1:] != c[:-1], True) & ~slow & has_prev)
    fx = ti[last_rows]
    wh = np.zeros(len(touched), dtype=np.int64)
    np.add.at(wh, ti[fi], delta[fi])
    ends = _Ends(ti[head], fx, tt[last_rows], wh[fx], r[last_rows], rel[last_rows], {})
    frame = cols.frame(INTERVAL_SCHEMA, {
        "circuit_id": take(ix.id_series, c[fi], ix.ids), "meter_id": meters.series(rel[fi]),
        "start_ms": prev_ts[fi], "end_ms": tt[fi], "energy_wh": delta[fi], "estimated": (tt[fi] - prev_ts[fi]) > gap_ms,
        "flag": cols.repeat("flag", "", fi.size, pl.String)})
    iv_c = c[fi]
    rej: list[pl.DataFrame] = []
    if slow.any():
        out_rows: list[tuple[Any, ...]] = []
        rej_rows: list[tuple[Any, ...]] = []
        for sg in np.flatnonzero(slow_seg).tolist():
            idx = np.flatnonzero(seg == sg)
            x = int(ti[idx[0]])
            cid = touched[x]
            st_rows = list(zip(tt[idx].tolist(), meters.list(rel[idx]), r[idx].tolist(), strict=True))
            base = (int(last_ts[x]), int(last_reg[x])) if has_last[x] else (None, None)
            n0 = len(out_rows)
            streaks[x] = _sequential(cid, base[0], base[1], last_meter[x], int(streak[x]), st_rows, ix.limits[c[idx[0]]],
                                     gap_ms, out_rows, rej_rows)
            mine = out_rows[n0:]
            if mine:
                end = mine[-1][3]
                at = next(row for row in st_rows if row[0] == end)
                ends.slow[x] = (end, sum(o[4] for o in mine), at[2], at[1])
        if out_rows:
            sf = pl.DataFrame(out_rows, schema=INTERVAL_SCHEMA, orient="row")
            frame = pl.concat([frame, sf])
            iv_c = np.concatenate([iv_c, _circuit_codes(sf["circuit_id"], ix)])
            o = np.lexsort((frame["end_ms"].to_numpy(), iv_c))
            frame, iv_c = frame[o], iv_c[o]
        if rej_rows:
            rej.append(pl.DataFrame(rej_rows, schema=REJECT_SCHEMA, orient="row"))
    return frame, iv_c, rej, streaks, ends


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


def lex_sorted(keys: tuple[np.ndarray, ...]) -> bool:
    """True if rows are in non-decreasing lexicographic order of ``keys`` (cheap check)."""
    if keys[0].size < 2:
        return True
    bad = np.zeros(keys[0].size - 1, dtype=bool)
    eq = np.ones(keys[0].size - 1, dtype=bool)
    for k in keys:
        d = k[1:] - k[:-1]
        bad |= eq & (d < 0)
        eq &= d == 0
    return not bad.any()


def to_decimal_kwh(wh: int) -> Decimal:
    return Decimal(wh) / 1000
