"""Which accounts a parallel replay job bills (`mallwatt replay --jobs N`).

The stream's worker owns an account through its partition, `account_shard(account, P)` over
the topics' P partitions (`MALLWATT_PARTITIONS`, default 8), and no event of one account ever
changes another's state. Job ``i`` of ``N`` bills the accounts of the partitions ``p`` with
``p % N == i``: their readings (a reading by its circuit's account), payments, refusals and
timer work. Rows that belong to no account (a reading of an unknown circuit, a payment without
an account id) go to job 0, so every input row is billed or refused by exactly one job.

Every job walks the whole input through the same plan as a single replay: the same core calls
(the arrival cuts and batch bounds are worked out on all rows) and the same timer clock per call
(`replay_now` of the whole call), and only filters each call down to its own accounts. So an
account meets exactly the calls, in the same order, and the same timer instants as in
``--jobs 1``: its outputs and state are equal, not merely equivalent (a deferred trip noticed by
the timer or by a later charge carries a different cause id, and a different cut could decide
that; a shared plan cannot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from schemas.keys import account_shard


@dataclass
class JobFilter:
    """Job ``index`` of ``count`` over ``partitions`` stream partitions."""

    index: int
    count: int
    partitions: int
    _ranks: np.ndarray | None = field(default=None, repr=False)  # job of each account rank (lookup order)
    _ranks_of: int = field(default=0, repr=False)  # id() of the lookup the ranks were built for

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"job {self.index} of {self.count}: out of range")
        if self.partitions < 1:
            raise ValueError("partitions must be positive")

    def job_of(self, account_id: str | None) -> int:
        if not account_id:
            return 0
        return account_shard(account_id, self.partitions) % self.count

    def mine(self, account_id: str | None) -> bool:
        return self.job_of(account_id) == self.index

    def owned_partitions(self) -> list[int]:
        return [p for p in range(self.partitions) if p % self.count == self.index]

    def rank_jobs(self, lk: Any) -> np.ndarray:
        """The job of each account rank of a `lookup` (one crc32 per account, once)."""
        if self._ranks is None or self._ranks_of != id(lk):
            self._ranks = np.array([self.job_of(a) for a in lk.account_ids], dtype=np.int64)
            self._ranks_of = id(lk)
        return self._ranks

    def accounts_mask(self, acc: np.ndarray, lk: Any) -> np.ndarray:
        """Rows (given their account rank, -1: no account) this job bills."""
        jobs = self.rank_jobs(lk)
        out = np.zeros(acc.size, dtype=bool) if self.index else acc < 0
        known = acc >= 0
        out[known] = jobs[acc[known]] == self.index
        return out

    def circuits_mask(self, circuits: pl.Series, lk: Any) -> np.ndarray:
        """Rows (given their circuit id) this job bills: by the circuit's account."""
        from pipelines.core.interval import _circuit_codes

        codes = _circuit_codes(circuits, lk.cindex)
        acc = np.full(codes.size, -1, dtype=np.int64)
        known = codes >= 0
        acc[known] = lk.circ_acc[codes[known]]
        return self.accounts_mask(acc, lk)

    def payments_mask(self, accounts: pl.Series) -> np.ndarray:
        """Rows (given their account id) this job bills."""
        values = accounts.to_list()
        jobs = {a: self.job_of(a) for a in set(values)}
        return np.fromiter((jobs[a] == self.index for a in values), dtype=bool, count=len(values))

    def readings(self, frame: pl.DataFrame, lk: Any, acc: np.ndarray | None = None) -> pl.DataFrame:
        """This job's rows of a readings frame (``acc``: each row's account rank, when known)."""
        if not frame.height:
            return frame
        mask = self.accounts_mask(acc, lk) if acc is not None else self.circuits_mask(frame["circuit_id"], lk)
        return frame if mask.all() else frame.filter(pl.Series(mask))

    def by_account(self, frame: pl.DataFrame | None, column: str = "account_id") -> pl.DataFrame | None:
        """This job's rows of a frame with an account column (payments, refusals)."""
        if frame is None or not frame.height:
            return frame
        mask = self.payments_mask(frame[column])
        return frame if mask.all() else frame.filter(pl.Series(mask))


def parse_job(text: str, partitions: int) -> JobFilter:
    """``"i/N"`` (0-based job i of N) -> JobFilter; ValueError naming the problem."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--job {text!r}: expected INDEX/COUNT, e.g. 0/2") from None
    return JobFilter(i, n, partitions)
