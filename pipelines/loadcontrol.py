"""Load control: overload trips with debounce, banned-appliance steps, relay tamper. Pure.

No Kafka and no clock: time is the readings' ``ts_ms``. State is plain, JSON-serialisable
per-account data that the caller stores (the worker keeps it in ``Envelope.extra``), so a
batch boundary never changes an answer: processing a time-ordered stream in one batch or
in many gives the same outputs and the same final state (tested with hypothesis).

Vectorised where the volume is (every reading): dedup, per-circuit previous values, the
account's running total, step signatures and relay checks are polars expressions. Only
accounts that are over their limit, tripped, or saw a banned step go through the small
per-reading state machine in Python.

Account power is the sum of the *latest* reading of each of its circuits, evaluated after
every reading, in integer milliwatts so sums are exact whatever the batch split.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

OVERLOAD = "overload"
BANNED = "banned_appliance"
MISMATCH = "relay_mismatch"
REQUESTED_BY = "loadcontrol"

Restore = Literal["auto", "manual"]


class BannedBand(BaseModel):
    """A banned-appliance signature: a sudden step of min_w..max_w at power factor >= min_pf."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "resistive"
    min_w: float = Field(800.0, ge=0)
    max_w: float = Field(3000.0, gt=0)
    min_pf: float = Field(0.95, ge=0, le=1)


class LoadPolicy(BaseModel):
    """The parts of a merchant level's load rules that the portfolio does not carry (yet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    restore: Restore = "auto"
    cooldown_s: float = Field(300.0, ge=0)
    banned: tuple[BannedBand, ...] = ()
    banned_action: Literal["alert", "trip"] = "alert"
    max_step_gap_s: float = Field(60.0, gt=0)  # a "step" across a longer gap is not sudden
    mismatch_w: float = Field(50.0, ge=0)  # an OPEN meter drawing more than this is tampered


@dataclass(frozen=True)
class LoadLimits:
    """Everything the rules need for one account."""

    mall_id: str
    max_power_w: float
    debounce_s: float
    policy: LoadPolicy = field(default_factory=LoadPolicy)
    trip: bool = True  # False for protected ("keep power") accounts: alerts only


@dataclass
class LoadOutputs:
    alerts: list[dict[str, Any]] = field(default_factory=list)  # Alert schema fields
    commands: list[dict[str, Any]] = field(default_factory=list)  # see _command()
    late: int = 0  # readings ignored as duplicates or older than their circuit's last one


def limits_from_portfolio(portfolio: Any, policies: Mapping[str, LoadPolicy] | None = None
                          ) -> dict[str, LoadLimits]:
    """Per-account limits: the level's max_power_w / overload_debounce_s plus its LoadPolicy."""
    policies = policies or {}
    out: dict[str, LoadLimits] = {}
    for mall, merchant in portfolio.merchants():
        level = portfolio.level(merchant.level)
        out[merchant.id] = LoadLimits(mall.id, level.max_power_w, level.overload_debounce_s,
                                      policies.get(level.name, LoadPolicy()), trip=not merchant.protected)
    return out


# ---- the vectorised pass ------------------------------------------------------------

_CIRCUIT_SCHEMA = {"circuit_id": pl.String, "prev_ts": pl.Int64, "prev_p": pl.Float64,
                   "prev_pf": pl.Float64, "prev_mw": pl.Int64, "prev_mm": pl.Boolean}


def _circuit_frame(circuit_ids: list[str], accounts: list[str], state: Mapping[str, dict]) -> pl.DataFrame:
    # column-wise: this runs per circuit of a step (tens of thousands at portfolio scale)
    empty: dict[str, Any] = {}
    found = [(cid, *_previous(c)) for cid, acc in zip(circuit_ids, accounts, strict=True)
             if (c := state.get(acc, empty).get("circuits", empty).get(cid)) is not None]
    columns = list(zip(*found, strict=True)) if found else [[]] * len(_CIRCUIT_SCHEMA)  # transposed in C
    return pl.DataFrame(dict(zip(_CIRCUIT_SCHEMA, columns, strict=True)), schema=_CIRCUIT_SCHEMA)


_previous = operator.itemgetter("ts", "p", "pf", "mw", "mm")  # a circuit's state, _CIRCUIT_SCHEMA order
_milliwatts = operator.itemgetter("mw")


_ACCOUNT_SCHEMA = {"account_id": pl.String, "base_mw": pl.Int64, "base_ts": pl.Int64, "max_mw": pl.Int64,
                   "mismatch_w": pl.Float64, "max_gap_ms": pl.Int64}


def _account_frame(accounts: list[str], state: Mapping[str, dict], limits: Mapping[str, LoadLimits]
                   ) -> pl.DataFrame:
    # column-wise, and each distinct LoadLimits converted once (a portfolio has a few levels)
    empty: dict[str, Any] = {}
    states = [state.get(acc, empty) for acc in accounts]
    converted: dict[int, tuple[int, float, int]] = {}
    lims = []
    for acc in accounts:
        lim = limits[acc]
        row = converted.get(id(lim))
        if row is None:
            row = converted[id(lim)] = (round(lim.max_power_w * 1000), lim.policy.mismatch_w,
                                        round(lim.policy.max_step_gap_s * 1000))
        lims.append(row)
    return pl.DataFrame({"account_id": accounts,
                         "base_mw": [sum(map(_milliwatts, s.get("circuits", empty).values())) for s in states],
                         "base_ts": [s.get("last_ts") for s in states], "max_mw": [r[0] for r in lims],
                         "mismatch_w": [r[1] for r in lims], "max_gap_ms": [r[2] for r in lims]},
                        schema=_ACCOUNT_SCHEMA)


def _bands_frame(accounts: list[str], limits: Mapping[str, LoadLimits]) -> pl.DataFrame:
    rows = [(acc, b.name, b.min_w, b.max_w, b.min_pf)
            for acc in accounts for b in limits[acc].policy.banned]
    return pl.DataFrame(rows, orient="row", schema={
        "account_id": pl.String, "band": pl.String, "lo": pl.Float64, "hi": pl.Float64, "min_pf": pl.Float64})


def _reactive(p: pl.Expr, pf: pl.Expr) -> pl.Expr:
    # magnitude only: the meters give |PF|, so leading vs lagging is unknown
    pf = pf.abs().clip(1e-3, 1.0)
    return p * (1.0 - pf * pf).sqrt() / pf


def _evaluate(readings: pl.DataFrame, state: Mapping[str, dict], limits: Mapping[str, LoadLimits]
              ) -> tuple[pl.DataFrame, int]:
    frame = (readings.select("circuit_id", "meter_id", "account_id", "ts_ms",
                             pl.col("power_w").cast(pl.Float64).fill_nan(None),
                             pl.col("power_factor").cast(pl.Float64).fill_nan(None),
                             pl.col("relay").cast(pl.UInt8))
             .filter(pl.col("power_w").is_not_null()))
    # accounts with limits, looked up per distinct account of the batch (not a series of the
    # whole portfolio's accounts per call: 350,000 at portfolio scale)
    present = frame["account_id"].unique()
    known = [a for a in present.to_list() if a in limits]
    if len(known) < len(present):
        frame = frame.filter(pl.col("account_id").is_in(known))
    n_in = frame.height
    frame = frame.unique(subset=["circuit_id", "ts_ms"], keep="first", maintain_order=True)
    pairs = frame.select("circuit_id", "account_id").unique(subset=["circuit_id"], maintain_order=True)
    circuits = _circuit_frame(pairs["circuit_id"].to_list(), pairs["account_id"].to_list(), state)
    accounts = _account_frame(frame["account_id"].unique().sort().to_list(), state, limits)
    frame = (frame.join(circuits, on="circuit_id", how="left")
             .filter(pl.col("prev_ts").is_null() | (pl.col("ts_ms") > pl.col("prev_ts")))
             .sort("account_id", "ts_ms", "circuit_id")
             .join(accounts, on="account_id", how="left")
             .with_row_index("row"))
    late = n_in - frame.height
    # live input brings one reading per circuit: its previous one is the state's (no lookups)
    once = frame["circuit_id"].n_unique() == frame.height
    if not once:  # several per circuit (a catch-up step): each row's previous row of its circuit
        prev = _previous_rows(frame["circuit_id"])
        first = pl.lit(pl.Series(prev < 0))
        at_prev = pl.lit(pl.Series(np.maximum(prev, 0)))

    def last(value: pl.Expr, prev_state: str) -> pl.Expr:
        # the circuit's previous reading: earlier in this batch, else from the state
        if once:
            return pl.col(prev_state)
        return pl.when(first).then(pl.col(prev_state)).otherwise(value.gather(at_prev))

    mw = (pl.col("power_w") * 1000).round(0).cast(pl.Int64)
    frame = frame.with_columns(
        mw=mw, lp=last(pl.col("power_w"), "prev_p"), lpf=last(pl.col("power_factor"), "prev_pf"),
        lts=last(pl.col("ts_ms"), "prev_ts"), lmw=last(mw, "prev_mw").fill_null(0),
        mm=(pl.col("relay") == 1) & (pl.col("power_w") > pl.col("mismatch_w")),
    ).with_columns(lmm=last(pl.col("mm"), "prev_mm").fill_null(False))
    # one reading per account (live input, one circuit per account): the running total and
    # time of an account are its one row's (no windows)
    single = once and frame["account_id"].n_unique() == frame.height

    def running(value: pl.Expr, how: str) -> pl.Expr:
        if single:
            return value
        # rows are in "row" order, so each account's window already is (an order_by sorts again)
        return getattr(value, how)().over("account_id")

    frame = frame.with_columns(
        total_mw=pl.col("base_mw") + running(pl.col("mw") - pl.col("lmw"), "cum_sum"),
        eval_ts=pl.max_horizontal(running(pl.col("ts_ms"), "cum_max"), pl.col("base_ts")),
        step_w=pl.col("power_w") - pl.col("lp"),
    ).with_columns(
        above=pl.col("total_mw") > pl.col("max_mw"),
        step_pf=pl.when(pl.col("power_factor").is_not_null() & pl.col("lpf").is_not_null())
        .then(pl.col("step_w") / pl.col("step_w").pow(2).add(
            (_reactive(pl.col("power_w"), pl.col("power_factor"))
             - _reactive(pl.col("lp"), pl.col("lpf"))).pow(2)).sqrt())
        .otherwise(pl.col("power_factor")),
    )
    candidates = frame.filter(pl.col("lp").is_not_null() & (pl.col("step_w") > 0) & (pl.col("relay") != 1)
                              & ((pl.col("ts_ms") - pl.col("lts")) <= pl.col("max_gap_ms"))
                              & pl.col("step_pf").is_not_null())
    hits = (candidates.select("row", "account_id", "step_w", "step_pf")
            .join(_bands_frame(accounts["account_id"].to_list(), limits), on="account_id")
            .filter(pl.col("step_w").is_between(pl.col("lo"), pl.col("hi")) & (pl.col("step_pf") >= pl.col("min_pf")))
            .group_by("row").agg(pl.col("band").first()))
    frame = frame.join(hits, on="row", how="left").sort("row")
    return frame, late


def _previous_rows(circuits: pl.Series) -> np.ndarray:
    """Per row, the index of the row before it with the same circuit (-1: none): what
    `shift(1).over("circuit_id")` picks, found once for every column that needs it (five
    windows with order_by cost ~0.5 s on a 90,000-reading catch-up step)."""
    codes = circuits.cast(pl.Categorical).to_physical().to_numpy()
    order = np.argsort(codes, kind="stable")  # by circuit, rows in order within each
    same = codes[order[1:]] == codes[order[:-1]]
    prev = np.full(codes.size, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    return prev


# ---- the same pass in plain Python, for small batches --------------------------------
# The stream calls process_load once per Kafka message of a few dozen readings, where each
# polars expression costs ~0.1 ms; below SMALL rows this pass (same rules, same floating-point
# operations in the same order) is ~10x cheaper. tests/unit/loadcontrol compares both passes.

SMALL = 512


def _f(v: Any) -> float | None:
    """Float64 with NaN as null, as the polars pass casts and fills."""
    if v is None:
        return None
    v = float(v)
    return None if v != v else v


def _reactive_py(p: float, pf: float) -> float:
    pf = min(max(abs(pf), 1e-3), 1.0)
    return p * math.sqrt(1.0 - pf * pf) / pf


def _and3(a: bool | None, b: bool) -> bool | None:
    """Kleene AND (polars semantics for a null ``a``)."""
    if a is None:
        return None if b else False
    return a and b


def _evaluate_rows(readings: pl.DataFrame, state: Mapping[str, dict], limits: Mapping[str, LoadLimits]
                   ) -> tuple[list[dict[str, Any]], int]:
    """`_evaluate` as a list of row dicts, in the same row order."""
    names = ("circuit_id", "meter_id", "account_id", "ts_ms", "power_w", "power_factor", "relay")
    cols = [readings.get_column(n).to_list() for n in names]
    seen: set[tuple[str, int]] = set()
    kept: list[tuple[Any, ...]] = []
    n_in = 0
    for cid, meter, acc, ts, p, pf, relay in zip(*cols, strict=True):
        p = _f(p)
        if acc not in limits or p is None:
            continue
        n_in += 1
        if (cid, ts) in seen:
            continue
        seen.add((cid, ts))
        kept.append((cid, meter, acc, ts, p, _f(pf), relay))
    owner: dict[str, str] = {}
    for r in kept:
        owner.setdefault(r[0], r[2])
    prev = {cid: c for cid, acc in owner.items()
            if (c := state.get(acc, {}).get("circuits", {}).get(cid)) is not None}
    kept = [r for r in kept if r[0] not in prev or r[3] > prev[r[0]]["ts"]]
    kept.sort(key=lambda r: (r[2], r[3], r[0]))
    late = n_in - len(kept)
    acc_info: dict[str, tuple[int, int | None, int, float, int]] = {}
    for acc in sorted({r[2] for r in kept}):
        st, lim = state.get(acc, {}), limits[acc]
        acc_info[acc] = (sum(c["mw"] for c in st.get("circuits", {}).values()), st.get("last_ts"),
                         round(lim.max_power_w * 1000), lim.policy.mismatch_w, round(lim.policy.max_step_gap_s * 1000))
    last: dict[str, dict[str, Any]] = {}  # circuit -> its previous row in this batch
    run: dict[str, tuple[int, int]] = {}  # account -> (running mW delta, max ts)
    rows: list[dict[str, Any]] = []
    for i, (cid, meter, acc, ts, p, pf, relay) in enumerate(kept):
        base_mw, base_ts, max_mw, mismatch_w, max_gap_ms = acc_info[acc]
        mw = round(p * 1000)
        mm = _and3(None if relay is None else relay == 1, p > mismatch_w)
        b = last.get(cid)
        if b is not None:
            lp, lpf, lts, lmw, lmm = b["power_w"], b["power_factor"], b["ts_ms"], b["mw"], b["mm"]
        elif cid in prev:
            c = prev[cid]
            lp, lpf, lts, lmw, lmm = c["p"], c["pf"], c["ts"], c["mw"], c["mm"]
        else:
            lp = lpf = lts = lmw = lmm = None
        delta, cmax = run.get(acc, (0, ts))
        delta, cmax = delta + mw - (lmw or 0), max(cmax, ts)
        run[acc] = (delta, cmax)
        total = base_mw + delta
        step_w = None if lp is None else p - lp
        if pf is not None and lpf is not None and step_w is not None:
            dq = _reactive_py(p, pf) - _reactive_py(lp, lpf)
            den = math.sqrt(step_w * step_w + dq * dq)
            step_pf: float | None = step_w / den if den else math.nan
        else:
            step_pf = pf
        band = None
        if (step_w is not None and step_w > 0 and relay is not None and relay != 1 and lts is not None
                and ts - lts <= max_gap_ms and step_pf is not None):
            band = next((x.name for x in limits[acc].policy.banned
                         if x.min_w <= step_w <= x.max_w and step_pf >= x.min_pf), None)
        row = {"row": i, "account_id": acc, "circuit_id": cid, "meter_id": meter, "ts_ms": ts, "power_w": p,
               "power_factor": pf, "mw": mw, "mm": mm, "lmm": bool(lmm) if lmm is not None else False,
               "eval_ts": cmax if base_ts is None else max(cmax, base_ts), "total_mw": total,
               "above": total > max_mw, "band": band, "step_w": step_w, "step_pf": step_pf}
        last[cid] = row
        rows.append(row)
    return rows, late


def _process_rows(readings: pl.DataFrame, state: Mapping[str, dict], limits: Mapping[str, LoadLimits]
                  ) -> tuple[dict[str, dict], LoadOutputs]:
    """`process_load` over `_evaluate_rows` (same outputs, same state)."""
    new_state = dict(state)
    out = LoadOutputs()
    rows, out.late = _evaluate_rows(readings, state, limits)
    if not rows:
        return new_state, out
    by_account: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_account.setdefault(r["account_id"], []).append(r)
    lasts: dict[str, dict[str, Any]] = {}
    for r in rows:
        lasts[r["circuit_id"]] = r
    for account in sorted(by_account):
        mine = by_account[account]
        prior = state.get(account, {})
        busy = bool(prior.get("trips")) or prior.get("over_since") is not None or \
            any(r["above"] or r["band"] is not None for r in mine)
        acc = _copy_account(prior) if account in state else _empty_account()
        acc["last_ts"] = max(r["eval_ts"] for r in mine)
        if busy:
            _machine(acc, limits[account], account, mine, out)
        else:
            acc["over_since"], acc["over_alerted"] = None, False
        new_state[account] = acc
    for r in lasts.values():
        new_state[r["account_id"]]["circuits"][r["circuit_id"]] = {
            "ts": r["ts_ms"], "p": r["power_w"], "pf": r["power_factor"], "mw": r["mw"], "mm": r["mm"]}
    for r in rows:
        if r["mm"] and not r["lmm"]:
            _mismatch(r, limits[r["account_id"]], out)
    out.alerts.sort(key=lambda a: (a["ts_ms"], a["alert_id"]))
    out.commands.sort(key=lambda c: (c["cause_ts_ms"], c["command_id"]))
    return new_state, out


# ---- outputs ------------------------------------------------------------------------

def _alert(lim: LoadLimits, account: str, meter: str | None, kind: str, severity: str, ts: int, alert_id: str,
           message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": kind, "severity": severity, "mall_id": lim.mall_id,
            "account_id": account, "meter_id": meter, "ts_ms": int(ts), "message": message,
            "details": {k: str(v) for k, v in details.items()}}


def _command(lim: LoadLimits, account: str, action: str, reason: str, hold: str, ts: int,
             command_id: str, requested_by: str = REQUESTED_BY) -> dict[str, Any]:
    """RelayCommand fields minus gateway_id/meter_id, which the worker fills per meter of the account.

    ``hold`` names the relaygate hold (pipelines.relaygate) to set (TRIP) or clear (RECONNECT).
    """
    return {"command_id": command_id, "action": action, "reason": reason, "hold": hold,
            "mall_id": lim.mall_id, "account_id": account, "issued_at_ms": int(ts),
            "cause_ts_ms": int(ts), "requested_by": requested_by}


def _restore(acc: dict, lim: LoadLimits, account: str, rule: str, ts: int, reason: str, by: str,
             out: LoadOutputs) -> None:
    trip = acc["trips"].pop(rule)
    cid = f"{account}:{rule}:{trip['at']}:restore"
    out.commands.append(_command(lim, account, "RECONNECT", reason, rule, ts, cid, by))
    out.alerts.append(_alert(lim, account, None, "reconnect", "INFO", ts, cid,
                             f"supply restored after {rule} trip ({'cool-down' if by == REQUESTED_BY else by})",
                             {"rule": rule, "tripped_at_ms": trip["at"], "by": by}))
    if rule == OVERLOAD:  # a new overload needs a full new debounce run
        acc["over_since"], acc["over_alerted"] = None, False


def _trip(acc: dict, lim: LoadLimits, account: str, rule: str, ts: int, out: LoadOutputs) -> bool:
    if not lim.trip or rule in acc["trips"]:
        return False
    cid = f"{account}:{rule}:{ts}:trip"
    acc["trips"][rule] = {"at": int(ts), "id": cid}
    out.commands.append(_command(lim, account, "TRIP", rule, rule, ts, cid))
    return True


def _machine(acc: dict, lim: LoadLimits, account: str, rows: list[dict], out: LoadOutputs) -> None:
    debounce_ms = lim.debounce_s * 1000
    cooldown_ms = lim.policy.cooldown_s * 1000
    for r in rows:
        t = r["eval_ts"]
        if lim.policy.restore == "auto":
            for rule in sorted(acc["trips"]):
                if t >= acc["trips"][rule]["at"] + cooldown_ms:
                    _restore(acc, lim, account, rule, t, "restore", REQUESTED_BY, out)
        if not r["above"]:
            acc["over_since"], acc["over_alerted"] = None, False
        else:
            if acc["over_since"] is None:
                acc["over_since"] = t
            if not acc["over_alerted"] and t - acc["over_since"] >= debounce_ms:
                acc["over_alerted"] = True
                tripped = _trip(acc, lim, account, OVERLOAD, t, out)
                restore = ("auto after cool-down" if lim.policy.restore == "auto" else "operator required")
                out.alerts.append(_alert(
                    lim, account, None, OVERLOAD, "CRITICAL" if tripped else "WARNING", t,
                    f"{account}:{OVERLOAD}:{t}",
                    f"account draws {r['total_mw'] / 1000:.0f} W > {lim.max_power_w:.0f} W for "
                    f"{(t - acc['over_since']) / 1000:.0f} s; " + (f"tripped, restore {restore}" if tripped
                                                                  else "not tripped"),
                    {"total_w": r["total_mw"] / 1000, "max_power_w": lim.max_power_w,
                     "over_since_ms": acc["over_since"], "tripped": tripped}))
        if r["band"] is not None:
            tripped = lim.policy.banned_action == "trip" and _trip(acc, lim, account, BANNED, t, out)
            out.alerts.append(_alert(
                lim, account, r["meter_id"], BANNED, "CRITICAL" if tripped else "WARNING", r["ts_ms"],
                f"{account}:{BANNED}:{r['circuit_id']}:{r['ts_ms']}",
                f"banned appliance ({r['band']}): +{r['step_w']:.0f} W at power factor {r['step_pf']:.2f}"
                + ("; tripped" if tripped else ""),
                {"band": r["band"], "step_w": round(r["step_w"], 1), "step_pf": round(r["step_pf"], 3),
                 "circuit_id": r["circuit_id"], "tripped": tripped}))


def _mismatch(r: dict[str, Any], lim: LoadLimits, out: LoadOutputs) -> None:
    out.alerts.append(_alert(
        lim, r["account_id"], r["meter_id"], MISMATCH, "CRITICAL", r["ts_ms"],
        f"{r['account_id']}:{MISMATCH}:{r['circuit_id']}:{r['ts_ms']}",
        f"meter reports its relay OPEN but draws {r['power_w']:.0f} W (tamper or welded relay)",
        {"circuit_id": r["circuit_id"], "power_w": r["power_w"], "threshold_w": lim.policy.mismatch_w}))


def _copy_account(acc: Mapping[str, Any]) -> dict[str, Any]:
    # the nested entries are replaced, never mutated, so one level of copying keeps the input intact
    return {**acc, "circuits": dict(acc["circuits"]), "trips": dict(acc["trips"])}


def _empty_account() -> dict[str, Any]:
    return {"circuits": {}, "last_ts": None, "over_since": None, "over_alerted": False, "trips": {}}


_LAST_COLUMNS = ("account_id", "circuit_id", "ts_ms", "power_w", "power_factor", "mw", "mm")


def _new_state(state: Mapping[str, dict], account: str, last_ts: Any, rows_by_account: dict[str, list[dict]],
               limits: Mapping[str, LoadLimits], out: LoadOutputs) -> dict[str, Any]:
    """An account's state after its rows (its circuits' last readings not yet in), through the
    state machine when it is busy (over its limit, tripped, or a banned step)."""
    prior = state.get(account)
    if account not in rows_by_account and prior is not None:
        # not busy: no trips to copy (an account with trips is busy), the rest replaced
        return {**prior, "circuits": dict(prior["circuits"]), "trips": prior["trips"], "last_ts": last_ts,
                "over_since": None, "over_alerted": False}
    acc = _copy_account(prior) if account in state else _empty_account()
    acc["last_ts"] = last_ts
    if account in rows_by_account:
        _machine(acc, limits[account], account, rows_by_account[account], out)
    else:
        acc["over_since"], acc["over_alerted"] = None, False
    return acc


def _new_states_once(frame: pl.DataFrame, state: Mapping[str, dict], new_state: dict[str, dict],
                     rows_by_account: dict[str, list[dict]], limits: Mapping[str, LoadLimits],
                     out: LoadOutputs) -> None:
    """`process_load`'s new states where each circuit has one row (live input): one pass over
    the rows (in account order), no grouping; each account's last_ts is its rows' greatest."""
    columns = [frame[c].to_list() for c in ("eval_ts", *_LAST_COLUMNS)]
    current = None
    for last_ts, account, circuit, ts, p, pf, mw, mm in zip(*columns, strict=True):
        if account == current:  # another circuit of the account
            acc = new_state[account]
            acc["circuits"][circuit] = {"ts": ts, "p": p, "pf": pf, "mw": mw, "mm": mm}
            if last_ts is not None and (acc["last_ts"] is None or last_ts > acc["last_ts"]):
                acc["last_ts"] = last_ts
            continue
        current = account
        prior = state.get(account)
        if account not in rows_by_account and prior is not None:  # as _new_state, with the circuit
            new_state[account] = {**prior, "circuits": {**prior["circuits"], circuit: {
                "ts": ts, "p": p, "pf": pf, "mw": mw, "mm": mm}}, "trips": prior["trips"], "last_ts": last_ts,
                "over_since": None, "over_alerted": False}
        else:
            acc = new_state[account] = _new_state(state, account, last_ts, rows_by_account, limits, out)
            acc["circuits"][circuit] = {"ts": ts, "p": p, "pf": pf, "mw": mw, "mm": mm}


def process_load(readings: pl.DataFrame, state: Mapping[str, dict], limits: Mapping[str, LoadLimits]
                 ) -> tuple[dict[str, dict], LoadOutputs]:
    """Apply a batch of readings; returns (new state for all accounts given, outputs).

    ``readings``: circuit_id, meter_id, account_id, ts_ms, power_w, power_factor, relay
    (schemas.readings.FRAME_SCHEMA has them). Readings of accounts without limits, without
    power, duplicated or older than their circuit's last reading are ignored.
    ``state``: account_id -> the plain dict this function returned before (or nothing).
    """
    if readings.height <= SMALL:
        return _process_rows(readings, state, limits)
    new_state = dict(state)
    out = LoadOutputs()
    frame, out.late = _evaluate(readings, state, limits)
    if frame.height == 0:
        return new_state, out
    accounts = frame["account_id"].unique().to_list()
    busy = set(frame.filter(pl.col("above") | pl.col("band").is_not_null())["account_id"].unique().to_list())
    busy.update(a for a in accounts if (st := state.get(a)) is not None
                and (st.get("trips") or st.get("over_since") is not None))
    cols = ["account_id", "circuit_id", "meter_id", "ts_ms", "eval_ts", "total_mw", "above", "band",
            "step_w", "step_pf"]
    rows_by_account: dict[str, list[dict]] = {}
    if busy:
        for r in frame.filter(pl.col("account_id").is_in(sorted(busy))).select(cols).iter_rows(named=True):
            rows_by_account.setdefault(r["account_id"], []).append(r)

    once = frame["circuit_id"].n_unique() == frame.height  # one reading per circuit (live input)
    if once and frame["account_id"].is_sorted():  # live input: rows are in account order
        _new_states_once(frame, state, new_state, rows_by_account, limits, out)
    else:
        lasts = frame if once else frame.group_by("circuit_id").agg(pl.all().sort_by("row").last())
        acc_last = frame.group_by("account_id").agg(pl.col("eval_ts").max())
        for account, last_ts in zip(acc_last["account_id"].to_list(), acc_last["eval_ts"].to_list(), strict=True):
            new_state[account] = _new_state(state, account, last_ts, rows_by_account, limits, out)
        for account, circuit, ts, p, pf, mw, mm in zip(*(lasts[c].to_list() for c in _LAST_COLUMNS), strict=True):
            new_state[account]["circuits"][circuit] = {"ts": ts, "p": p, "pf": pf, "mw": mw, "mm": mm}

    for r in frame.filter(pl.col("mm") & ~pl.col("lmm")).iter_rows(named=True):
        _mismatch(r, limits[r["account_id"]], out)
    out.alerts.sort(key=lambda a: (a["ts_ms"], a["alert_id"]))
    out.commands.sort(key=lambda c: (c["cause_ts_ms"], c["command_id"]))
    return new_state, out


def release(state: Mapping[str, dict], account_id: str, rule: str, ts_ms: int, limits: LoadLimits,
            by: str = "operator") -> tuple[dict[str, dict], LoadOutputs]:
    """An operator's release of a load-control trip (the only way out under restore "manual").

    Returns the new state and a RECONNECT (reason "restore", hold ``rule``) + reconnect alert,
    or no outputs when that rule has no trip in effect.
    """
    out = LoadOutputs()
    acc = state.get(account_id)
    if not acc or rule not in acc.get("trips", {}):
        return dict(state), out
    acc = _copy_account(acc)
    _restore(acc, limits, account_id, rule, ts_ms, "restore", by, out)
    return {**state, account_id: acc}, out


def tripped_rules(state: Mapping[str, dict], account_id: str) -> list[str]:
    return sorted(state.get(account_id, {}).get("trips", {}))
