"""References between roster tables and the rules, checked with joins (no loop over rows).

The same rules as pipelines.portfolio._reference_problems: ids unique portfolio-wide,
areas / gateways / accounts known in the row's own mall, levels and tariffs known, a
gateway's units and host:port unique, pools and main meters pointing at real rows.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from pipelines.roster_check import problems


def _known(frame: pl.DataFrame, column: str, allowed: pl.DataFrame, message: str,
           in_mall: bool = True) -> pl.DataFrame:
    """Rows whose `column` (within their mall when `in_mall`) is not a row of `allowed`."""
    keys = ["mall", column] if in_mall else [column]
    right = allowed.rename({allowed.columns[-1]: column}).unique()
    bad = frame.filter(pl.col(column).is_not_null()).join(right, on=keys, how="anti", nulls_equal=False)
    where = " in mall {}" if in_mall else ""
    args = [pl.col(column), pl.col("mall")] if in_mall else [pl.col(column)]
    return problems(bad, pl.lit(True), column, pl.format(f"unknown {message} '{{}}'{where}", *args))


def _unique(frame: pl.DataFrame, keys: list[str], column: str, what: str, word: str,
            show: pl.Expr | None = None) -> pl.DataFrame:
    """Second and later rows with the same `keys`, naming the first one's line."""
    dup = frame.filter(pl.struct(keys).is_duplicated())
    if not dup.height:
        return problems(dup, pl.lit(False), column, pl.lit(""))
    first = dup.group_by(keys).agg(pl.col("_line").min().alias("_first"))
    dup = dup.join(first, on=keys).filter(pl.col("_line") != pl.col("_first"))
    shown = show if show is not None else pl.format("'{}'", pl.col(keys[-1]))
    scope = " in mall {}" if "mall" in keys else ""
    args = [shown] + ([pl.col("mall")] if scope else []) + [pl.col("_first")]
    return problems(dup, pl.lit(True), column, pl.format(f"{what} {{}}{scope} (first on {word} {{}})", *args))


def reference_problems(rules: Any, frames: dict[str, pl.DataFrame], words: dict[str, str] | None = None
                       ) -> tuple[dict[str, pl.DataFrame], list[str]]:
    """Per-table problems, and problems of portfolio.yaml itself (its malls' pools and main meters)."""
    words = words or {}
    w = {t: words.get(t, "line") for t in frames}
    malls = pl.DataFrame({"mall": [m.id for m in rules.malls]}, schema={"mall": pl.String})
    levels = pl.DataFrame({"level": [lv.name for lv in rules.levels]}, schema={"level": pl.String})
    tariffs = pl.DataFrame({"tariff": [t.id for t in rules.tariffs]}, schema={"tariff": pl.String})
    areas, gateways, merchants, meters = (frames[t] for t in ("areas", "gateways", "merchants", "meters"))
    found: dict[str, list[pl.DataFrame]] = {t: [_known(f, "mall", malls, "mall", in_mall=False)]
                                            for t, f in frames.items()}
    found["areas"].append(_unique(areas, ["mall", "id"], "id", "duplicate area", w["areas"]))
    found["gateways"] += [
        _unique(gateways, ["mall", "id"], "id", "duplicate gateway", w["gateways"]),
        _unique(gateways, ["mall", "host", "port"], "port", "two gateways at", w["gateways"],
                pl.format("{}:{}", pl.col("host"), pl.col("port")))]
    found["merchants"] += [
        _unique(merchants, ["id"], "id", "duplicate merchant id", w["merchants"]),
        _known(merchants, "area", areas.select("mall", "id"), "area"),
        _known(merchants, "level", levels, "level", in_mall=False),
        _known(merchants, "tariff", tariffs, "tariff", in_mall=False)]
    found["meters"] += [
        _unique(meters, ["id"], "id", "duplicate meter id", w["meters"]),
        _unique(meters, ["circuit"], "circuit", "duplicate circuit id", w["meters"]),
        _known(meters, "gateway", gateways.select("mall", "id"), "gateway"),
        _unique(meters, ["mall", "gateway", "unit_id"], "unit_id", "unit used twice on gateway", w["meters"],
                pl.format("{} on '{}'", pl.col("unit_id"), pl.col("gateway"))),
        _known(meters, "account", merchants.select("mall", "id"), "merchant")]
    out = {t: pl.concat(fs) for t, fs in found.items()}
    return {t: f for t, f in out.items() if f.height}, _header_problems(rules, areas, merchants, meters)


def _header_problems(rules: Any, areas: pl.DataFrame, merchants: pl.DataFrame, meters: pl.DataFrame) -> list[str]:
    with_areas = set(areas["mall"].unique().to_list())
    # pools and main meters name few ids: look them up in per-mall sets of just those
    wanted_meters = {m for mall in rules.malls for pool in mall.pools for m in pool.meters}
    wanted_meters |= {mall.main_meter for mall in rules.malls if mall.main_meter}
    wanted_merchants = {x for mall in rules.malls for pool in mall.pools for x in [*pool.exclude, *pool.fixed_shares]}
    have_meters = set(meters.filter(pl.col("id").is_in(list(wanted_meters))).select("mall", "id").iter_rows())
    have_merchants = set(merchants.filter(pl.col("id").is_in(list(wanted_merchants))).select("mall", "id").iter_rows())
    out = []
    for mi, mall in enumerate(rules.malls):
        where = f"malls[{mi}]"
        if mall.id not in with_areas:
            out.append(f"{where}: mall {mall.id} has no rows in the areas table (it needs at least one area)")
        if mall.main_meter is not None and (mall.id, mall.main_meter) not in have_meters:
            out.append(f"{where}.main_meter: unknown meter {mall.main_meter!r}")
        for pi, pool in enumerate(mall.pools):
            out += [f"{where}.pools[{pi}].meters: unknown meter {m!r}" for m in pool.meters
                    if (mall.id, m) not in have_meters]
            out += [f"{where}.pools[{pi}]: unknown merchant {x!r}" for x in [*pool.exclude, *pool.fixed_shares]
                    if (mall.id, x) not in have_merchants]
    return out
