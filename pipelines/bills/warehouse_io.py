"""The only warehouse access of the bills package: named queries sql/queries/bills_*.sql.

`path` is the chDB folder (None: MALLWATT_CHDB_PATH / var/chdb, or the server of
MALLWATT_CLICKHOUSE), routed by `infra.warehouse` (owner endpoint or a direct open).
"""

from __future__ import annotations

import os
from typing import Any

from infra.warehouse import run_named_query
from pipelines.bills.reconcile import AccountTotals
from pipelines.bills.statements import Opening

LEDGER_TOPIC = "mallwatt.ledger"
READINGS_TOPIC = "mallwatt.readings"
PathLike = str | os.PathLike[str] | None


def complete_until_ms(topic: str = LEDGER_TOPIC, path: PathLike = None) -> int | None:
    frame = run_named_query("bills_watermark", {"topic": topic}, path=path)
    value = frame["complete_until_ms"][0] if frame.height else None
    return None if value is None else int(value)


def period_entries(start_ms: int, end_ms: int, mall_id: str = "", path: PathLike = None) -> list[dict[str, Any]]:
    frame = run_named_query("bills_ledger_period", {"start_ms": start_ms, "end_ms": end_ms, "mall_id": mall_id},
                            path=path)
    return frame.to_dicts()


def account_totals_before(before_ms: int, mall_id: str = "", path: PathLike = None) -> dict[str, AccountTotals]:
    frame = run_named_query("bills_account_totals", {"before_ms": before_ms, "mall_id": mall_id}, path=path)
    return {r["account_id"]: AccountTotals(r["account_id"], r["mall_id"], int(r["entries"]), int(r["sum_minor"]),
                                           int(r["last_balance_minor"]), r["last_entry_id"])
            for r in frame.to_dicts()}


def openings_at(start_ms: int, mall_id: str = "", path: PathLike = None) -> dict[str, Opening]:
    """Opening balance per account that has entries before `start_ms`."""
    return {a: Opening(t.last_balance_minor, t.last_entry_id)
            for a, t in account_totals_before(start_ms, mall_id, path).items()}


def circuit_energy_wh(start_ms: int, end_ms: int, mall_id: str = "", path: PathLike = None) -> dict[str, int]:
    frame = run_named_query("bills_circuit_energy", {"start_ms": start_ms, "end_ms": end_ms, "mall_id": mall_id},
                            path=path)
    return {r["circuit_id"]: int(r["wh"]) for r in frame.to_dicts()}
