"""Table-form portfolios: loading, field-named errors per file/line/column, equivalence with
YAML, the background reload, and a small roster bench."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collectors.profile import register_limits
from pipelines.config_holder import ContextHolder
from pipelines.context import build_context, landlord_account
from pipelines.core.models import AccountRating, CircuitConfig
from pipelines.generate import generate, generate_tables
from pipelines.loadcontrol import limits_from_portfolio
from pipelines.portfolio import (
    ConfigError,
    Portfolio,
    dump_portfolio,
    load_portfolio,
    parse_portfolio,
)
from pipelines.roster import load_config, load_tables, write_tables
from pipelines.roster_bench import edit_merchant, measure


def _tables(tmp_path: Path, malls: int = 2, stalls: int = 30, fmt: str = "csv") -> Path:
    return generate_tables(tmp_path / "p", malls, stalls, fmt)


def _edit(path: Path, line: int, column: str, value: str | None) -> None:
    """Set one cell of a CSV (line numbers as in messages: the header is line 1)."""
    frame = pl.read_csv(path, infer_schema=False)
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == line - 2).then(pl.lit(value, pl.String))
                               .otherwise(pl.col(column)).alias(column))
    frame.write_csv(path)


def _error(folder: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_tables(folder)
    return str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_good_roster_loads_as_the_same_portfolio(tmp_path: Path, fmt: str) -> None:
    data = generate(2, 30, seed=5)
    folder = write_tables(data, tmp_path / "p", fmt)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["portfolio.yaml"] + [f"{t}.{fmt}" for t in ("areas", "gateways", "merchants", "meters")])
    assert load_portfolio(folder) == parse_portfolio(data)  # every model, field by field


@pytest.mark.parametrize(("table", "line", "column", "value", "expected"), [
    ("merchants", 12, "area", "F9", "merchants.csv: line 12: area: unknown area 'F9' in mall M01"),
    ("merchants", 5, "leased_area_m2", "-3", "merchants.csv: line 5: leased_area_m2: -3.0 must be greater than 0"),
    ("merchants", 7, "leased_area_m2", "big", "merchants.csv: line 7: leased_area_m2: 'big' is not a finite number"),
    ("merchants", 3, "id", "M01 S1", "merchants.csv: line 3: id: 'M01 S1' is not an identifier"),
    ("merchants", 4, "id", "M01-S0001", "merchants.csv: line 4: id: duplicate merchant id 'M01-S0001' "
                                        "(first on line 2)"),
    ("merchants", 6, "level", "gold", "merchants.csv: line 6: level: unknown level 'gold'"),
    ("merchants", 8, "business_type", "casino", "merchants.csv: line 8: business_type: 'casino' is not one of"),
    ("merchants", 9, "protected", "maybe", "merchants.csv: line 9: protected: 'maybe' is not true or false"),
    ("merchants", 10, "alert_levels", "500;x", "merchants.csv: line 10: alert_levels: '500;x' is not a list"),
    ("merchants", 11, "mall", "M77", "merchants.csv: line 11: mall: unknown mall 'M77'"),
    ("merchants", 13, "name", None, "merchants.csv: line 13: name: missing value"),
    ("meters", 20, "unit_id", "300", "meters.csv: line 20: unit_id: 300 must be between 1 and 247"),
    ("meters", 21, "gateway", "GW-NOPE", "meters.csv: line 21: gateway: unknown gateway 'GW-NOPE' in mall M01"),
    ("meters", 22, "account", "M02-S0001", "meters.csv: line 22: account: unknown merchant 'M02-S0001' in mall M01"),
    ("meters", 3, "unit_id", "1", "meters.csv: line 3: unit_id: unit used twice on gateway 1 on 'M01-GW01' in "
                                  "mall M01 (first on line 2)"),
    ("gateways", 3, "port", "15020", "gateways.csv: line 3: port: two gateways at 127.0.0.1:15020 in mall M01"),
    ("areas", 2, "floor", "first", "areas.csv: line 2: floor: 'first' is not a whole number"),
])
def test_each_kind_of_bad_row_names_file_line_and_column(tmp_path: Path, table: str, line: int, column: str,
                                                          value: str | None, expected: str) -> None:
    folder = _tables(tmp_path)
    _edit(folder / f"{table}.csv", line, column, value)
    assert expected in _error(folder)


def test_file_level_and_rules_problems(tmp_path: Path) -> None:
    folder = _tables(tmp_path)
    frame = pl.read_csv(folder / "meters.csv", infer_schema=False)
    frame.with_columns(pl.lit("red").alias("colour")).drop("unit_id").write_csv(folder / "meters.csv")
    text = _error(folder)
    assert "meters.csv: column 'colour' is not a known column" in text
    assert "meters.csv: missing column 'unit_id'" in text
    folder = _tables(tmp_path / "b")
    pl.read_csv(folder / "areas.csv", infer_schema=False).filter(pl.col("mall") != "M02").write_csv(
        folder / "areas.csv")
    text = _error(folder)
    assert "portfolio.yaml: malls[1]: mall M02 has no rows in the areas table" in text
    assert "merchants.csv: line" in text and "unknown area" in text  # its merchants lost their areas too
    rules = (folder / "portfolio.yaml").read_text().replace("M01-C-hvac", "M01-C-nope", 1)
    (folder / "portfolio.yaml").write_text(rules)
    assert "malls[0].pools[0].meters: unknown meter 'M01-C-nope'" in _error(folder)


def test_many_bad_rows_are_capped(tmp_path: Path) -> None:
    folder = _tables(tmp_path, 1, 120)
    frame = pl.read_csv(folder / "merchants.csv", infer_schema=False)
    frame.with_columns(pl.lit("0").alias("leased_area_m2")).write_csv(folder / "merchants.csv")
    text = _error(folder)
    assert "(120 problem(s))" in text and "... and 70 more" in text


def _reference_context(p: Portfolio, partitions: int) -> dict[str, Any]:
    """What build_context produced before roster frames: one model per account and circuit."""
    accounts, circuits, routes = {}, {}, {}
    for mall in p.malls:
        landlord = landlord_account(mall.id)
        accounts[landlord] = AccountRating(account_id=landlord, mall_id=mall.id, tariff_id=mall.tariff,
                                           policy={"alert_levels": [], "protected": True})
        for m in mall.merchants:
            policy = p.level(m.level).policy
            upd: dict[str, Any] = {"protected": True} if m.protected else {}
            if m.alert_levels is not None:
                upd["alert_levels"] = m.alert_levels
            accounts[m.id] = AccountRating(account_id=m.id, mall_id=mall.id, tariff_id=m.tariff or mall.tariff,
                                           policy=policy.model_copy(update=upd) if upd else policy,
                                           price_multiplier=Decimal(str(m.price_multiplier)),
                                           opening_balance_minor=m.opening_balance_minor,
                                           opening_debt_minor=m.opening_debt_minor)
        for meter in mall.meters:
            account = meter.account or landlord
            routes[meter.id] = (mall.id, meter.gateway, meter.id, account)
            circuits[meter.circuits[0].id] = CircuitConfig(
                circuit_id=meter.circuits[0].id, account_id=account, max_kw=Decimal(str(meter.max_kw)),
                register_max_kwh=register_limits(meter.model)[0],
                register_resolution_kwh=register_limits(meter.model)[1])
    limits = limits_from_portfolio(p, {lv.name: lv.load for lv in p.levels})
    return {"accounts": accounts, "circuits": circuits, "routes": routes, "limits": limits}


def _contents(ctx: Any) -> dict[str, Any]:
    return {"accounts": ctx.rating.accounts, "circuits": ctx.rating.circuits,
            "routes": {k: (r.mall_id, r.gateway_id, r.meter_id, r.account_id) for k, r in ctx.meter_route.items()},
            "limits": ctx.load_limits}


def test_yaml_and_tables_give_identical_billing_contexts(tmp_path: Path) -> None:
    data = generate(3, 40, seed=11)
    data["malls"][1]["merchants"][4].update(alert_levels=[700, 300], price_multiplier=0.85, protected=True)
    data["malls"][2]["merchants"][0]["tariff"] = "gd-commercial"
    dump_portfolio(data, tmp_path / "p.yaml")
    folder = write_tables(data, tmp_path / "p")
    a, b = build_context(load_config(tmp_path / "p.yaml"), 6), build_context(load_config(folder), 6)
    for ctx in (a, b):
        assert _contents(ctx) == _reference_context(parse_portfolio(data), 6)
        assert list(ctx.rating.accounts) == list(_reference_context(parse_portfolio(data), 6)["accounts"])
    assert list(a.circuit_meter) == list(b.circuit_meter) and a.account_mall == b.account_mall
    assert a.account_meters == b.account_meters
    assert a.circuit_routes.equals(b.circuit_routes)
    assert a.rating.account_frame.equals(b.rating.account_frame)
    assert b.portfolio == a.portfolio == parse_portfolio(data)
    special = b.rating.accounts["M02-S0005"]
    assert special.policy.alert_levels == [700, 300] and special.policy.protected
    assert special.price_multiplier == Decimal("0.85")


def test_background_reload_applies_one_changed_row(tmp_path: Path) -> None:
    folder = _tables(tmp_path)
    holder = ContextHolder(folder, 4)
    assert holder.current().accounts["M02-S0007"].price_multiplier == Decimal("1.0")
    edit_merchant(folder / "merchants.csv", "M02-S0007", "price_multiplier", "1.5")
    old = holder.current()
    assert asyncio.run(holder.reload_in_background()) is True
    assert holder.version == 2 and holder.current() is not old
    assert holder.current().accounts["M02-S0007"].price_multiplier == Decimal("1.5")
    assert holder.current().accounts["M02-S0006"].price_multiplier == Decimal("1.0")
    assert asyncio.run(holder.reload_in_background()) is False  # nothing changed since


def test_a_broken_edit_keeps_the_last_good_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _tables(tmp_path)
    holder = ContextHolder(folder, 4)
    good = holder.current()
    edit_merchant(folder / "merchants.csv", "M01-S0003", "area", "F9")
    with caplog.at_level(logging.ERROR, logger="mallwatt.billing"):
        assert asyncio.run(holder.reload_in_background()) is False
    assert holder.current() is good and holder.version == 1
    expected = "merchants.csv: line 4: area: unknown area 'F9' in mall M01"
    assert expected in caplog.text and expected in (holder.last_error or "")
    edit_merchant(folder / "merchants.csv", "M01-S0003", "area", "M01-F1")  # fixed: picked up again
    assert holder.reload_if_changed() is True and holder.version == 2 and holder.last_error is None


def test_yaml_file_holder_still_reloads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    data = generate(1, 5)
    dump_portfolio(data, path)
    holder = ContextHolder(path, 4)
    data["malls"][0]["merchants"][1]["price_multiplier"] = 2.0
    dump_portfolio(data, path)
    assert asyncio.run(holder.reload_in_background()) is True
    assert holder.current().accounts["M01-S0002"].price_multiplier == Decimal("2.0")


def test_roster_bench_small() -> None:
    result = measure(2000, stalls=700)
    assert result["merchants"] >= 2000 and result["change_visible"] is True
    assert result["circuits"] == result["merchants"] + 3 * result["malls"]
    assert 0 < result["config_load_s"] < 30 and result["config_change_stall_ms"] > 0


def test_every_reader_takes_the_directory(tmp_path: Path) -> None:
    """Collectors, replay and the rest read a portfolio through load_portfolio: a directory works."""
    from collectors.mapping import plan_mall
    from pipelines.core.replay import load_context

    folder = _tables(tmp_path)
    assert len(plan_mall(folder, "M02").devices) == 30 + 3  # its merchants' meters plus 3 common ones
    rating, state = load_context(str(folder))
    portfolio = load_portfolio(folder)
    first = portfolio.malls[0].merchants[0]
    # the opening balance is posted by the core when the account first appears, not preset
    assert first.id in rating.accounts and not state.accounts
    assert rating.accounts[first.id].opening_balance_minor == first.opening_balance_minor


def test_accounts_per_shard_counts_each_metered_account_once_in_its_partition(tmp_path: Path) -> None:
    """What a catch-up step's sizer takes as the accounts a worker owns (take.CatchupSize)."""
    from collections import Counter

    from schemas.keys import account_shard

    ctx = ContextHolder(_tables(tmp_path), 4).current()
    metered = {route.account_id for route in ctx.circuit_meter.values()}
    assert ctx.accounts_per_shard == dict(Counter(account_shard(a, 4) for a in metered))
    assert sum(ctx.accounts_per_shard.values()) == len(metered) > 4
