"""What the portal needs to know of the portfolio: each account's mall, top-up policy and
name, each mall's time zone, and the currency (from the one config builder,
pipelines.context.build_context)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.models import WalletPolicy


@dataclass
class Directory:
    mall_of: dict[str, str]  # account id -> mall id
    policy_of: dict[str, WalletPolicy]
    mall_tz: dict[str, str] = field(default_factory=dict)
    name_of: dict[str, str] = field(default_factory=dict)  # merchant account id -> name (statements)
    currency: str = "CNY"

    def accounts_of_mall(self, mall_id: str) -> list[str]:
        return sorted(a for a, m in self.mall_of.items() if m == mall_id)

    def tz_of(self, account_id: str, default: str = "Asia/Shanghai") -> str:
        return self.mall_tz.get(self.mall_of.get(account_id, ""), default)


def load_directory(path: str | Path, partitions: int) -> Directory:
    from pipelines.context import build_context
    from pipelines.roster import load_config

    config = load_config(path)
    context = build_context(config, partitions)
    merchants = config.roster.merchants
    names = (dict(zip(merchants["id"].to_list(), merchants["name"].to_list(), strict=True))
             if {"id", "name"} <= set(merchants.columns) else {})
    return Directory({a: r.mall_id for a, r in context.accounts.items()},
                     {a: r.policy for a, r in context.accounts.items()},
                     {m: mall.tz for m, mall in context.rating.malls.items()},
                     names, getattr(config.rules, "currency", "CNY"))
