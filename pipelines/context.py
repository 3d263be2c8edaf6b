"""From the portfolio config to what the billing core and the stream need at run time."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any

import polars as pl

from pipelines.core.context import RatingContext
from pipelines.core.models import AccountRating, CircuitConfig, Mall, WalletPolicy
from pipelines.envelope import bucket_key
from pipelines.loadcontrol import LoadLimits
from pipelines.portfolio import Portfolio
from pipelines.roster import PortfolioConfig, config_from_portfolio
from schemas.keys import account_shard

# Register wrap values per meter model (uint32 x0.01 kWh wraps at 42,949,672.95 kWh; the
# float32 models report a 6-digit display counter).
REGISTER_MAX_KWH: dict[str, Decimal | None] = {
    "acrel_ddsy1352": Decimal("42949672.95"),
    "acrel_adl400": Decimal("21474836.47"),
}
DEFAULT_REGISTER_MAX = Decimal("99999.99")


def landlord_account(mall_id: str) -> str:
    """The mall's own account: common-area meters are billed here, then shared out."""
    return f"{mall_id}-LANDLORD"


@dataclass(frozen=True)
class MeterRoute:
    mall_id: str
    gateway_id: str
    meter_id: str
    account_id: str


@dataclass
class BillingContext:
    """The core's rating context plus the routing facts the stream needs."""

    config: PortfolioConfig  # rules plus roster frames
    rating: RatingContext
    partitions: int
    circuit_meter: dict[str, MeterRoute]  # circuit id -> where it is
    meter_route: dict[str, MeterRoute]  # meter id -> where it is
    account_mall: dict[str, str]
    load_limits: dict[str, Any]  # account id -> pipelines.loadcontrol.LoadLimits

    @property
    def portfolio(self) -> Portfolio:
        """The config as models, built on first use (a table-form portfolio keeps only frames)."""
        return self.config.portfolio()

    @property
    def accounts(self) -> dict[str, AccountRating]:
        return self.rating.accounts

    @cached_property
    def account_meters(self) -> dict[str, list[str]]:
        """Account id -> its meters, in config order (the meters a trip or reconnect acts on)."""
        out: dict[str, list[str]] = {}
        for route in self.meter_route.values():
            out.setdefault(route.account_id, []).append(route.meter_id)
        return out

    @cached_property
    def _buckets(self) -> dict[str, str]:
        return {a: bucket_key(a, self.partitions) for a in self.accounts}

    def bucket_of(self, account_id: str) -> str:
        """The state bucket of an account (hashed once per config; any id works)."""
        key = self._buckets.get(account_id)
        return key if key is not None else bucket_key(account_id, self.partitions)

    @cached_property
    def circuit_routes(self) -> pl.DataFrame:
        """circuit_id -> the partition (shard) and state bucket that own its account."""
        ids = list(self.circuit_meter)
        accounts = [self.circuit_meter[c].account_id for c in ids]
        return pl.DataFrame({"circuit_id": ids,
                             "shard": [account_shard(a, self.partitions) for a in accounts],
                             "bucket": [bucket_key(a, self.partitions) for a in accounts]},
                            schema={"circuit_id": pl.String, "shard": pl.Int64, "bucket": pl.String})


def build_context(portfolio: Portfolio | PortfolioConfig, partitions: int, *, lateness_ms: int = 0) -> BillingContext:
    """From a Portfolio, or rules plus roster frames (pipelines.roster.load_config): columns
    are read once and policies and load limits shared per level, not built per account."""
    config = portfolio if isinstance(portfolio, PortfolioConfig) else config_from_portfolio(portfolio)
    rules = config.rules
    order = {m.id: i for i, m in enumerate(rules.malls)}
    malls = {m.id: Mall(mall_id=m.id, tz=m.timezone, holidays=[d.isoformat() for d in m.holidays])
             for m in rules.malls}
    accounts, limits = _accounts(rules, _in_mall_order(config.roster.merchants, order))
    circuits, circuit_meter, meter_route = _circuits(rules, _in_mall_order(config.roster.meters, order))
    rating = RatingContext(circuits=circuits, accounts=accounts,
                           tariffs={t.id: t for t in rules.tariffs}, malls=malls,
                           lateness_ms=lateness_ms)
    return BillingContext(config, rating, partitions, circuit_meter, meter_route,
                          {a.account_id: a.mall_id for a in accounts.values()}, limits)


def _in_mall_order(frame: pl.DataFrame, order: dict[str, int]) -> pl.DataFrame:
    """Rows grouped by mall in the order of portfolio.yaml, file order within a mall (as in YAML)."""
    ix = pl.col("mall").replace_strict(order, return_dtype=pl.Int64)
    return frame.with_columns(ix.alias("_mall_ix")).sort("_mall_ix", maintain_order=True)


def _accounts(rules: Any, merchants: pl.DataFrame) -> tuple[dict[str, AccountRating], dict[str, LoadLimits]]:
    """Per mall its landlord then its merchants; limits as loadcontrol.limits_from_portfolio gives them."""
    levels = {lv.name: lv for lv in rules.levels}
    count = dict(merchants.group_by("mall").len().iter_rows())
    ids, tariffs, level_names, protected, alerts, multipliers = (merchants[c].to_list() for c in (
        "id", "tariff", "level", "protected", "alert_levels", "price_multiplier"))
    policies: dict[tuple[Any, ...], WalletPolicy] = {}
    shared_limits: dict[tuple[str, str, bool], LoadLimits] = {}
    decimals: dict[float, Decimal] = {}
    accounts: dict[str, AccountRating] = {}
    limits: dict[str, LoadLimits] = {}
    start = 0
    for mall in rules.malls:
        landlord = landlord_account(mall.id)
        # Never tripped and never alerted for credit: the landlord pays the utility directly.
        accounts[landlord] = AccountRating(account_id=landlord, mall_id=mall.id, tariff_id=mall.tariff,
                                           policy=WalletPolicy(alert_levels=[], protected=True))
        end = start + count.get(mall.id, 0)
        for j in range(start, end):
            key = (level_names[j], protected[j], None if alerts[j] is None else tuple(alerts[j]))
            policy = policies.get(key)
            if policy is None:
                policy = policies[key] = _policy(levels[key[0]].policy, key[1], alerts[j])
            mul = decimals.get(multipliers[j])
            if mul is None:
                mul = decimals[multipliers[j]] = Decimal(str(multipliers[j]))
            accounts[ids[j]] = AccountRating(account_id=ids[j], mall_id=mall.id, tariff_id=tariffs[j] or mall.tariff,
                                             policy=policy, price_multiplier=mul)
            lkey = (mall.id, key[0], key[1])
            lim = shared_limits.get(lkey)
            if lim is None:  # frozen, so one object serves every merchant of the level in the mall
                level = levels[key[0]]
                lim = shared_limits[lkey] = LoadLimits(mall.id, level.max_power_w, level.overload_debounce_s,
                                                       level.load, trip=not key[1])
            limits[ids[j]] = lim
        start = end
    return accounts, limits


def _policy(policy: WalletPolicy, protected: bool, alert_levels: list[int] | None) -> WalletPolicy:
    updates: dict[str, object] = {}
    if protected:
        updates["protected"] = True
    if alert_levels is not None:
        updates["alert_levels"] = list(alert_levels)
    return policy.model_copy(update=updates) if updates else policy


def _circuits(rules: Any, meters: pl.DataFrame) -> tuple[dict[str, CircuitConfig], dict[str, MeterRoute],
                                                         dict[str, MeterRoute]]:
    landlords = {m.id: landlord_account(m.id) for m in rules.malls}
    meters = meters.with_columns(pl.coalesce("account", pl.col("mall").replace_strict(landlords)).alias("account"))
    register = {m: REGISTER_MAX_KWH.get(m, DEFAULT_REGISTER_MAX) for m in meters["model"].unique().to_list()}
    decimals = {kw: Decimal(str(kw)) for kw in meters["max_kw"].unique().to_list()}
    circuits: dict[str, CircuitConfig] = {}
    circuit_meter: dict[str, MeterRoute] = {}
    meter_route: dict[str, MeterRoute] = {}
    for mall, gateway, meter, account, circuit, model, max_kw in zip(*(meters[c].to_list() for c in (
            "mall", "gateway", "id", "account", "circuit", "model", "max_kw")), strict=True):
        meter_route[meter] = circuit_meter[circuit] = MeterRoute(mall, gateway, meter, account)
        circuits[circuit] = CircuitConfig(circuit_id=circuit, account_id=account, max_kw=decimals[max_kw],
                                          register_max_kwh=register[model])
    return circuits, circuit_meter, meter_route
