"""The per-account and per-circuit parts of build_context, from roster frames.

At 350,000 merchants the cost is object creation: a pydantic model validated one by one
takes 3-9 us (seconds in all), so rows that the roster loader already validated column-wise
become models without running validators again (`prebuilt`), and wallet policies and load
limits are shared per level instead of copied per account.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import polars as pl

from pipelines.core.cols import as_list, chunked_dict
from pipelines.core.models import AccountRating, CircuitConfig, WalletPolicy
from pipelines.loadcontrol import LoadLimits


def prebuilt(cls: type[Any], names: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[Any]:
    """Frozen pydantic models from validated values, without their validators. The first row is
    also validated normally and compared, so a pydantic whose model internals differ falls back
    to validating every row (slow, never wrong)."""
    template = {k: None if f.is_required() else f.get_default(call_default_factory=True)
                for k, f in cls.model_fields.items()}  # declaration order, as a validated model has
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return []
    fields_set = set(names)  # shared: pydantic copies it before changing it (model_copy)
    new, put = object.__new__, object.__setattr__

    def make(values: tuple[Any, ...]) -> Any:
        obj = new(cls)
        d = template.copy()
        d.update(zip(names, values, strict=True))
        put(obj, "__dict__", d)
        put(obj, "__pydantic_fields_set__", fields_set)
        put(obj, "__pydantic_extra__", None)
        put(obj, "__pydantic_private__", None)
        return obj

    real = cls(**dict(zip(names, first, strict=True)))
    if make(first) != real or list(make(first).__dict__) != list(real.__dict__):
        return [real] + [cls(**dict(zip(names, r, strict=True))) for r in rows]
    return [make(first)] + [make(r) for r in rows]


def accounts_from_roster(rules: Any, merchants: pl.DataFrame, landlord_of: Callable[[str], str]
                         ) -> tuple[dict[str, AccountRating], dict[str, LoadLimits]]:
    """Per mall (in rules order) its landlord account, then its merchants in file order; the load
    limits that pipelines.loadcontrol.limits_from_portfolio gives for the same portfolio."""
    levels = {lv.name: lv for lv in rules.levels}
    mall_tariff = {m.id: m.tariff for m in rules.malls}
    alert_text = pl.col("alert_levels").cast(pl.List(pl.String)).list.join(";").fill_null("-")
    m = merchants.with_columns(
        _order=pl.col("mall").replace_strict({x.id: i for i, x in enumerate(rules.malls)}, return_dtype=pl.Int64),
        tariff=pl.coalesce("tariff", pl.col("mall").replace_strict(mall_tariff, return_dtype=pl.String)),
        _policy=pl.concat_str(pl.col("level"), pl.col("protected").cast(pl.String), alert_text, separator="|"),
        _limit=pl.concat_str(pl.col("mall"), pl.col("level"), pl.col("protected").cast(pl.String), separator="|"),
    ).sort("_order", maintain_order=True)
    policies = {key: _policy(levels[level].policy, protected, alerts) for key, level, protected, alerts in
                m.select("_policy", "level", "protected", "alert_levels").unique("_policy").iter_rows()}
    shared_limits = {key: LoadLimits(mall, levels[level].max_power_w, levels[level].overload_debounce_s,
                                     levels[level].load, trip=not protected)
                     for key, mall, level, protected in
                     m.select("_limit", "mall", "level", "protected").unique("_limit").iter_rows()}
    decimals = {x: Decimal(str(x)) for x in m["price_multiplier"].unique().to_list()}
    ids = as_list(m["id"])
    rows = zip(ids, as_list(m["mall"]), as_list(m["tariff"]), map(policies.__getitem__, as_list(m["_policy"])),
               map(decimals.__getitem__, as_list(m["price_multiplier"])), as_list(m["opening_balance_minor"]),
               as_list(m["opening_debt_minor"]), strict=True)
    names = ("account_id", "mall_id", "tariff_id", "policy", "price_multiplier", "opening_balance_minor",
             "opening_debt_minor")
    merchant_models = prebuilt(AccountRating, names, rows)
    count = dict(m.group_by("mall").len().iter_rows())
    accounts: dict[str, AccountRating] = {}
    start = 0
    for mall in rules.malls:
        landlord = landlord_of(mall.id)
        # Never tripped and never alerted for credit: the landlord pays the utility directly.
        accounts[landlord] = AccountRating(account_id=landlord, mall_id=mall.id, tariff_id=mall.tariff,
                                           policy=WalletPolicy(alert_levels=[], protected=True))
        end = start + count.get(mall.id, 0)
        accounts.update(chunked_dict(ids[start:end], merchant_models[start:end]))
        start = end
    limits = chunked_dict(ids, [shared_limits[x] for x in as_list(m["_limit"])])
    return accounts, limits


def _policy(policy: WalletPolicy, protected: bool, alert_levels: list[int] | None) -> WalletPolicy:
    updates: dict[str, object] = {}
    if protected:
        updates["protected"] = True
    if alert_levels is not None:
        updates["alert_levels"] = list(alert_levels)
    return policy.model_copy(update=updates) if updates else policy


def circuits_from_roster(rules: Any, meters: pl.DataFrame, landlord_of: Callable[[str], str],
                         route_cls: type[Any], register_limits: Callable[[str], tuple[Decimal | None, Decimal]]
                         ) -> tuple[dict[str, CircuitConfig], dict[str, Any], dict[str, Any]]:
    """circuit id -> CircuitConfig, circuit id -> route, meter id -> route (one route object per
    meter, shared by both maps), meters in mall order then file order."""
    landlords = {x.id: landlord_of(x.id) for x in rules.malls}
    m = meters.with_columns(
        _order=pl.col("mall").replace_strict({x.id: i for i, x in enumerate(rules.malls)}, return_dtype=pl.Int64),
        account=pl.coalesce("account", pl.col("mall").replace_strict(landlords, return_dtype=pl.String)),
    ).sort("_order", maintain_order=True)
    registers = {x: register_limits(x) for x in m["model"].unique().to_list()}  # (max, resolution)
    decimals = {x: Decimal(str(x)) for x in m["max_kw"].unique().to_list()}
    meter_ids, circuit_ids, accounts = as_list(m["id"]), as_list(m["circuit"]), as_list(m["account"])
    routes = [_route(route_cls, *r) for r in zip(as_list(m["mall"]), as_list(m["gateway"]), meter_ids, accounts,
                                                   strict=True)]
    limits = [registers[x] for x in as_list(m["model"])]
    configs = prebuilt(CircuitConfig, ("circuit_id", "account_id", "max_kw", "register_max_kwh",
                                       "register_resolution_kwh"),
                       zip(circuit_ids, accounts, map(decimals.__getitem__, as_list(m["max_kw"])),
                           [x[0] for x in limits], [x[1] for x in limits], strict=True))
    return chunked_dict(circuit_ids, configs), chunked_dict(circuit_ids, routes), chunked_dict(meter_ids, routes)


def _route(cls: type[Any], mall: str, gateway: str, meter: str, account: str) -> Any:
    return cls(mall, gateway, meter, account)
