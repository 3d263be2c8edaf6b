"""RatingContext: the static configuration the engine rates against (no state, no clocks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import polars as pl

from pipelines.core.cols import chunked_frame
from pipelines.core.models import AccountRating, CircuitConfig, Mall, Tariff


@dataclass
class RatingContext:
    """Maps circuit -> account, account -> tariff/policy/overrides, mall -> tz/holidays.

    ``lateness_ms``: how long readings wait for stragglers; ``gap_ms``: intervals longer than
    this are flagged estimated. Derived lookup frames are cached, so build one context per
    configuration and reuse it across batches.
    """

    circuits: dict[str, CircuitConfig]
    accounts: dict[str, AccountRating]
    tariffs: dict[str, Tariff]
    malls: dict[str, Mall]
    lateness_ms: int = 60_000
    gap_ms: int = 20 * 60_000
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.circuits.values():
            if c.account_id not in self.accounts:
                raise ValueError(f"circuit {c.circuit_id}: unknown account {c.account_id}")
        for a in self.accounts.values():
            if a.tariff_id not in self.tariffs:
                raise ValueError(f"account {a.account_id}: unknown tariff {a.tariff_id}")
            if a.mall_id not in self.malls:
                raise ValueError(f"account {a.account_id}: unknown mall {a.mall_id}")

    def with_tariff(self, tariff: Tariff) -> RatingContext:
        """The same portfolio with every account re-rated under ``tariff`` (what-if)."""
        accounts = {k: a.model_copy(update={"tariff_id": tariff.id}) for k, a in self.accounts.items()}
        return RatingContext(self.circuits, accounts, {**self.tariffs, tariff.id: tariff}, self.malls,
                             self.lateness_ms, self.gap_ms, dict(self.extra))

    @cached_property
    def circuit_frame(self) -> pl.DataFrame:
        ids = list(self.circuits)
        acc = [self.circuits[c].account_id for c in ids]
        return chunked_frame({"circuit_id": ids, "account_id": acc, "mall_id": [self.accounts[a].mall_id for a in acc]},
                             {"circuit_id": pl.String, "account_id": pl.String, "mall_id": pl.String})

    @cached_property
    def account_frame(self) -> pl.DataFrame:
        accounts = list(self.accounts.values())
        ratios = {m: m.as_integer_ratio() for m in {a.price_multiplier for a in accounts}}
        columns = {"account_id": [a.account_id for a in accounts], "mall_id": [a.mall_id for a in accounts],
                   "tariff_id": [a.tariff_id for a in accounts],
                   "m_num": [ratios[a.price_multiplier][0] for a in accounts],
                   "m_den": [ratios[a.price_multiplier][1] for a in accounts],
                   "tz": [self.malls[a.mall_id].tz for a in accounts]}
        return chunked_frame(columns, {"account_id": pl.String, "mall_id": pl.String, "tariff_id": pl.String,
                                       "m_num": pl.Int64, "m_den": pl.Int64, "tz": pl.String})
