"""From the portfolio config to what the billing core and the stream need at run time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import polars as pl

from collectors.profile import register_limits
from pipelines.core.cols import as_list, chunked_frame
from pipelines.core.context import RatingContext
from pipelines.core.models import AccountRating, Mall
from pipelines.core.timeguard import Bounds, bounds_for
from pipelines.envelope import state_key
from pipelines.portfolio import Portfolio
from pipelines.roster import PortfolioConfig, config_from_portfolio
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
    def meter_purpose(self) -> dict[str, str]:
        """Meter id -> its circuit's purpose (life-safety circuits: pipelines.core.authority)."""
        meters = self.config.roster.meters
        return dict(zip(as_list(meters["id"]), as_list(meters["purpose"]), strict=True))

    @cached_property
    def account_area(self) -> dict[str, str]:
        """Merchant account id -> its area (an area-wide order's scope)."""
        merchants = self.config.roster.merchants
        return dict(zip(as_list(merchants["id"]), as_list(merchants["area"]), strict=True))

    def operator_decision(self, command: dict[str, Any]) -> Any:
        """pipelines.core.authority.decide for a per-meter operator command, against this config."""
        from pipelines.core.authority import decide

        route = self.meter_route.get(command["meter_id"])
        scope, target = command["scope"], command["target_id"]
        in_scope = route is not None and (
            (scope == "METER" and route.meter_id == target) or (scope == "ACCOUNT" and route.account_id == target)
            or (scope == "MALL" and route.mall_id == target)
            or (scope == "AREA" and self.account_area.get(route.account_id) == target))
        return decide(command, self.config.rules.security, meter_purpose=self.meter_purpose.get(command["meter_id"]),
                      in_scope=in_scope)

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
        rules = self.config.rules
        return bounds_for(rules.time, rules.tariffs, tariff_of)

    @cached_property
    def circuit_routes(self) -> pl.DataFrame:
        """circuit_id -> the partition (shard) and state key that own its account."""
        ids = list(self.circuit_meter)
        accounts = [self.circuit_meter[c].account_id for c in ids]
        return chunked_frame({"circuit_id": ids, "shard": [account_shard(a, self.partitions) for a in accounts],
                              "bucket": [state_key(a) for a in accounts]},
                             {"circuit_id": pl.String, "shard": pl.Int64, "bucket": pl.String})

    @cached_property
    def accounts_per_shard(self) -> dict[int, int]:
        """Partition -> how many metered accounts it owns (a catch-up step's sizer: a step
        spanning more than a poll cycle touches no more accounts than its partitions own)."""
        counts = self.circuit_routes.group_by("shard").agg(pl.col("bucket").n_unique().alias("n"))
        return dict(zip(counts["shard"].to_list(), counts["n"].to_list(), strict=True))


def build_context(portfolio: Portfolio | PortfolioConfig, partitions: int, *,
                  lateness_ms: int | None = None) -> BillingContext:
    """The one config -> billing context builder (stream, replay, bills, tests), from a Portfolio
    or rules plus roster frames (pipelines.roster.load_config, no model per row: see
    pipelines.context_build for how 350,000 accounts stay within seconds). Policy knobs come
    from the rules' ``billing:`` (``lateness_ms`` overrides it, for tests); register wraps from
    the meter profiles (`collectors.profile.register_limits`)."""
    from pipelines.context_build import accounts_from_roster, circuits_from_roster

    config = portfolio if isinstance(portfolio, PortfolioConfig) else config_from_portfolio(portfolio)
    rules = config.rules
    malls = {m.id: Mall(mall_id=m.id, tz=m.timezone, holidays=[d.isoformat() for d in m.holidays])
             for m in rules.malls}
    accounts, limits = accounts_from_roster(rules, config.roster.merchants, landlord_account)
    circuits, circuit_meter, meter_route = circuits_from_roster(
        rules, config.roster.meters, landlord_account, MeterRoute,
        register_limits)
    rating = RatingContext(circuits=circuits, accounts=accounts,
                           tariffs={t.id: t for t in rules.tariffs}, malls=malls,
                           lateness_ms=rules.billing.lateness_ms if lateness_ms is None else lateness_ms,
                           gap_ms=rules.billing.gap_ms,
                           # replay's time guard reads the same limits (pipelines.core.replay.time_bounds)
                           extra={"time_limits": rules.time, "security": rules.security})
    return BillingContext(config, rating, partitions, circuit_meter, meter_route,
                          {a.account_id: a.mall_id for a in accounts.values()}, limits)
