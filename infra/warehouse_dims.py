"""Dimension tables for analytics, loaded from the portfolio config.

The portfolio file (pipelines.portfolio) is the source of truth for malls, areas,
merchants, meters, circuits and shared pools; reports group facts by them. Loading is
idempotent: every row carries version = load time in ms into a
ReplacingMergeTree(version, is_deleted) keyed by id, and ids that disappeared from the
config get a tombstone, so `SELECT ... FINAL` always shows the latest config.

    python -m infra.warehouse dims --config portfolio.yaml
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from pipelines.context import landlord_account
from pipelines.portfolio import Portfolio

DB = "mallwatt"
# table -> id column
DIMENSIONS: dict[str, str] = {
    "dim_malls": "mall_id",
    "dim_areas": "area_id",
    "dim_accounts": "account_id",
    "dim_circuits": "circuit_id",
    "dim_pools": "pool_id",
}
# The endpoint caps a request body at 1 MiB: rows sent through a query function go in
# chunks well below that.
_CHUNK_BYTES = 512 * 1024



def dimension_rows(portfolio: Portfolio) -> dict[str, list[dict[str, Any]]]:
    """The rows of every dimension table for `portfolio` (without version columns)."""
    out: dict[str, list[dict[str, Any]]] = {table: [] for table in DIMENSIONS}
    for mall in portfolio.malls:
        landlord = landlord_account(mall.id)
        out["dim_malls"].append({
            "mall_id": mall.id, "name": mall.name, "timezone": mall.timezone,
            "tariff_id": mall.tariff, "currency": portfolio.currency,
            "holidays": [d.isoformat() for d in mall.holidays],
            "leasable_m2": float(sum(m.leased_area_m2 for m in mall.merchants)),
        })  # fmt: skip
        for area in mall.areas:
            out["dim_areas"].append(
                {"area_id": area.id, "mall_id": mall.id, "name": area.name, "floor": area.floor}
            )
        out["dim_accounts"].append({
            "account_id": landlord, "mall_id": mall.id, "name": f"{mall.name} (common areas)",
            "business_type": "common", "area_id": "", "level": "landlord",
            "leased_area_m2": 0.0, "tariff_id": mall.tariff, "protected": True,
            "vacant": False, "is_landlord": True,
        })  # fmt: skip
        for merchant in mall.merchants:
            out["dim_accounts"].append({
                "account_id": merchant.id, "mall_id": mall.id, "name": merchant.name,
                "business_type": str(merchant.business_type), "area_id": merchant.area,
                "level": merchant.level, "leased_area_m2": float(merchant.leased_area_m2),
                "tariff_id": merchant.tariff or mall.tariff, "protected": merchant.protected,
                "vacant": merchant.vacant, "is_landlord": False,
            })  # fmt: skip
        for meter in mall.meters:
            pools = [p.id for p in mall.pools if meter.id in p.meters]
            for circuit in meter.circuits:
                out["dim_circuits"].append({
                    "circuit_id": circuit.id, "meter_id": meter.id, "mall_id": mall.id,
                    "account_id": meter.account or landlord, "purpose": str(circuit.purpose),
                    "meter_model": meter.model, "gateway_id": meter.gateway,
                    "max_kw": float(meter.max_kw), "poll_interval_s": float(meter.poll_interval_s),
                    "is_common": meter.account is None, "pool_ids": pools,
                })  # fmt: skip
        for pool in mall.pools:
            out["dim_pools"].append({
                "pool_id": pool.id, "mall_id": mall.id, "name": pool.name,
                "method": str(pool.method), "meter_ids": list(pool.meters),
                "excluded": list(pool.exclude),
                "fixed_shares": {k: float(v) for k, v in pool.fixed_shares.items()},
            })  # fmt: skip
    return out


def load_dimensions(
    client_or_query_fn: Any, portfolio: Portfolio, *, version: int | None = None
) -> dict[str, int]:
    """Write the dimension rows of `portfolio`; returns rows written per table.

    `client_or_query_fn`: a clickhouse-connect client (the sink's or the owner's), or a
    function like `infra.warehouse.query_arrow` taking (sql, params, allow_write=...)
    (rows then travel as JSON through the owner's endpoint, in chunks).
    """
    version = version if version is not None else time.time_ns() // 1_000_000
    if hasattr(client_or_query_fn, "command"):
        client = client_or_query_fn

        def read(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            return client.query(sql, parameters=params).result_rows

        def write(sql: str, params: dict[str, Any]) -> None:
            client.command(sql, parameters=params)
    else:
        fn = client_or_query_fn

        def read(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            table = fn(sql, params)
            return list(zip(*(c.to_pylist() for c in table.columns), strict=True))

        def write(sql: str, params: dict[str, Any]) -> None:
            fn(sql, params, allow_write=True)

    written: dict[str, int] = {}
    for table, rows in dimension_rows(portfolio).items():
        key = DIMENSIONS[table]
        # Every column but loaded_at; a tombstone's omitted fields get the type defaults
        # from the explicit structure.
        columns = read(
            "SELECT name, type FROM system.columns WHERE database = {db:String} "
            "AND table = {t:String} AND name != 'loaded_at' ORDER BY position",
            {"db": DB, "t": table},
        )
        present = {r[0] for r in read(f"SELECT {key} FROM {DB}.{table} FINAL", {})}
        gone = present - {r[key] for r in rows}
        batch = [{**r, "version": version, "is_deleted": 0} for r in rows]
        batch += [{key: i, "version": version, "is_deleted": 1} for i in sorted(gone)]
        names = ", ".join(name for name, _ in columns)
        structure = ", ".join(f"{name} {type_}" for name, type_ in columns)
        sql = (
            f"INSERT INTO {DB}.{table} ({names}) SELECT {names} "
            f"FROM format(JSONEachRow, '{structure}', {{rows:String}})"
        )
        for chunk in _chunks(batch):
            write(sql, {"rows": chunk})
        written[table] = len(batch)
    return written


def _chunks(batch: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    lines: list[str] = []
    size = 0
    for row in batch:
        line = json.dumps(row)
        if lines and size + len(line) > _CHUNK_BYTES:
            out.append("\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        out.append("\n".join(lines))
    return out


def dimension_tables(portfolio: Portfolio) -> dict[str, pa.Table]:
    """The same rows as Arrow tables (for callers that insert themselves, e.g. benches)."""
    return {t: pa.Table.from_pylist(rows) for t, rows in dimension_rows(portfolio).items()}
