"""What the portal needs to know of the portfolio: each account's mall and top-up policy,
and each mall's time zone (from the one config builder, pipelines.context.build_context)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.models import WalletPolicy


@dataclass
class Directory:
    mall_of: dict[str, str]  # account id -> mall id
    policy_of: dict[str, WalletPolicy]
    mall_tz: dict[str, str] = field(default_factory=dict)

    def accounts_of_mall(self, mall_id: str) -> list[str]:
        return sorted(a for a, m in self.mall_of.items() if m == mall_id)


def load_directory(path: str | Path, partitions: int) -> Directory:
    from pipelines.context import build_context
    from pipelines.roster import load_config

    context = build_context(load_config(path), partitions)
    return Directory({a: r.mall_id for a, r in context.accounts.items()},
                     {a: r.policy for a, r in context.accounts.items()},
                     {m: mall.tz for m, mall in context.rating.malls.items()})
