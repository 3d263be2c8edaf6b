"""From the portfolio config to what the billing core and the stream need at run time."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any

import polars as pl

from collectors.profile import register_limits
from pipelines.core.context import RatingContext
from pipelines.core.models import AccountRating, CircuitConfig, Mall, WalletPolicy
from pipelines.core.timeguard import Bounds, bounds_for
from pipelines.envelope import state_key
from pipelines.loadcontrol import limits_from_portfolio
from pipelines.portfolio import Portfolio
from schemas.keys import account_shard


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

    portfolio: Portfolio
    rating: RatingContext
    partitions: int
    circuit_meter: dict[str, MeterRoute]  # circuit id -> where it is
    meter_route: dict[str, MeterRoute]  # meter id -> where it is
    account_mall: dict[str, str]
    load_limits: dict[str, Any]  # account id -> pipelines.loadcontrol.LoadLimits

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

    def bucket_of(self, account_id: str) -> str:
        """The state key of an account (one key per account; any id works)."""
        return state_key(account_id)

    def partition_of_key(self, key: str) -> int:
        """The partition that owns a state key (the account's shard)."""
        return account_shard(key, self.partitions)

    @cached_property
    def time_bounds(self) -> Bounds:
        """The portfolio's `time:` limits in ms (pipelines.core.timeguard), per circuit tariff."""
        tariff_of = {c: self.accounts[r.account_id].tariff_id for c, r in self.circuit_meter.items()}
        return bounds_for(self.portfolio.time, self.portfolio.tariffs, tariff_of)

    @cached_property
    def circuit_routes(self) -> pl.DataFrame:
        """circuit_id -> the partition (shard) and state key that own its account."""
        ids = list(self.circuit_meter)
        accounts = [self.circuit_meter[c].account_id for c in ids]
        return pl.DataFrame({"circuit_id": ids,
                             "shard": [account_shard(a, self.partitions) for a in accounts],
                             "bucket": [state_key(a) for a in accounts]},
                            schema={"circuit_id": pl.String, "shard": pl.Int64, "bucket": pl.String})


def build_context(portfolio: Portfolio, partitions: int, *, lateness_ms: int | None = None) -> BillingContext:
    """The one config -> billing context builder (stream, replay, bills, tests). Policy knobs
    come from ``portfolio.billing`` (``lateness_ms`` overrides it, for tests); register wraps
    from the meter profiles (`collectors.profile.register_limits`)."""
    accounts: dict[str, AccountRating] = {}
    circuits: dict[str, CircuitConfig] = {}
    malls: dict[str, Mall] = {}
    circuit_meter: dict[str, MeterRoute] = {}
    meter_route: dict[str, MeterRoute] = {}
    for mall in portfolio.malls:
        malls[mall.id] = Mall(mall_id=mall.id, tz=mall.timezone, holidays=[d.isoformat() for d in mall.holidays])
        landlord = landlord_account(mall.id)
        # Never tripped and never alerted for credit: the landlord pays the utility directly.
        accounts[landlord] = AccountRating(account_id=landlord, mall_id=mall.id, tariff_id=mall.tariff,
                                           policy=WalletPolicy(alert_levels=[], protected=True))
        for merchant in mall.merchants:
            level = portfolio.level(merchant.level)
            policy = level.policy
            updates: dict[str, object] = {}
            if merchant.protected:
                updates["protected"] = True
            if merchant.alert_levels is not None:
                updates["alert_levels"] = merchant.alert_levels
            if updates:
                policy = policy.model_copy(update=updates)
            accounts[merchant.id] = AccountRating(
                account_id=merchant.id, mall_id=mall.id, tariff_id=merchant.tariff or mall.tariff,
                policy=policy, price_multiplier=Decimal(str(merchant.price_multiplier)),
                opening_balance_minor=merchant.opening_balance_minor, opening_debt_minor=merchant.opening_debt_minor)
        for meter in mall.meters:
            account = meter.account or landlord
            route = MeterRoute(mall.id, meter.gateway, meter.id, account)
            meter_route[meter.id] = route
            register_max, resolution = register_limits(meter.model)
            for circuit in meter.circuits:
                circuit_meter[circuit.id] = route
                circuits[circuit.id] = CircuitConfig(
                    circuit_id=circuit.id, account_id=account, max_kw=Decimal(str(meter.max_kw)),
                    register_max_kwh=register_max, register_resolution_kwh=resolution)
    rating = RatingContext(circuits=circuits, accounts=accounts,
                           tariffs={t.id: t for t in portfolio.tariffs}, malls=malls,
                           lateness_ms=portfolio.billing.lateness_ms if lateness_ms is None else lateness_ms,
                           gap_ms=portfolio.billing.gap_ms,
                           # replay's time guard reads the same limits (pipelines.core.replay.time_bounds)
                           extra={"time_limits": portfolio.time})
    limits = limits_from_portfolio(portfolio, {lv.name: lv.load for lv in portfolio.levels})
    return BillingContext(portfolio, rating, partitions, circuit_meter, meter_route,
                          {a.account_id: a.mall_id for a in accounts.values()}, limits)
