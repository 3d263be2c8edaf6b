"""Shared builders for the billing-core tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from pipelines.core.context import RatingContext
from pipelines.core.models import AccountRating, CircuitConfig, Mall, Tariff, WalletPolicy

SH = ZoneInfo("Asia/Shanghai")


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: ZoneInfo = SH) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)


def readings(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    """rows of (circuit_id, meter_id, ts_ms, import_kwh)."""
    return pl.DataFrame(rows, orient="row", schema={
        "circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64, "import_kwh": pl.Float64})


def make_ctx(tariff: Tariff | None = None, policy: WalletPolicy | None = None, tz: str = "Asia/Shanghai",
             holidays: list[str] | None = None, lateness_ms: int = 0, **circuit: Any) -> RatingContext:
    tariff = tariff or Tariff.flat("t", 1000)  # 1000 fen/kWh: 1 Wh costs exactly 1 fen
    return RatingContext(
        circuits={"c1": CircuitConfig(circuit_id="c1", account_id="a1", **circuit)},
        accounts={"a1": AccountRating(account_id="a1", mall_id="m", tariff_id=tariff.id,
                                      policy=policy or WalletPolicy(alert_levels=[]))},
        tariffs={tariff.id: tariff}, malls={"m": Mall(mall_id="m", tz=tz, holidays=holidays or [])},
        lateness_ms=lateness_ms)


@pytest.fixture
def ctx() -> RatingContext:
    return make_ctx()
