"""A small hand-made ledger for mall M1 in October 2026 (Asia/Shanghai), used by several tests.

Account A (balance_after in brackets):
  before Oct   topup t0                      +10000  [10000]   -> opening 10000
  Oct 1        topup p1                       +5000  [15000]
  Oct 1        standing 2026-10-01             -300  [14700]
  Oct 1        charge peak  t1 @170 1000 Wh    -170  [14530]
  Oct 1        charge peak  t1 @170  500 Wh     -85  [14445]
  Oct 1        charge valley t1 @38 1000 Wh     -38  [14407]
  Oct 2        standing 2026-10-02             -300  [14107]
  Oct 3        shared_cost HVAC area 0.5       -501  [13606]
  Oct 4        adjustment adj-1                +100  [13706]
  Oct 5        debt_recovery                   -500  [13206]   -> closing 13206
Lines: 10000 + 5000 - 255 - 38 - 600 - 501 + 100 - 500 = 13206.

Landlord M1-LANDLORD: charge on HVAC -1001 [-1001], shared_cost recovery +801 [-200].
Account B: topup +2000 [2000], shared_cost -300 [1700].
"""

from __future__ import annotations

from typing import Any

from pipelines.bills.periods import parse_period

TZ = "Asia/Shanghai"
OCT = parse_period("2026-10")
START = OCT.start_ms(TZ)  # 2026-10-01 00:00 local = 2026-09-30T16:00Z
H = 3_600_000
D = 24 * H
SHR_SRC = "HVAC|area|2026-09|1001"


def e(entry_id: str, account: str, kind: str, amount: int, balance: int, ts: int, **kw: Any) -> dict[str, Any]:
    row = {"entry_id": entry_id, "account_id": account, "mall_id": "M1", "kind": kind, "amount_minor": amount,
           "balance_after_minor": balance, "ts_ms": ts, "source_id": kw.pop("source_id", entry_id),
           "meter_id": None, "circuit_id": None, "interval_start_ms": None, "energy_wh": None,
           "tou_period": None, "tier": None, "rate": None, "estimated": False}
    row.update(kw)
    return row


def ledger() -> list[dict[str, Any]]:
    return [
        e("A:topup:t0", "A", "topup", 10000, 10000, START - D, source_id="t0"),
        e("A:topup:p1", "A", "topup", 5000, 15000, START + H, source_id="p1"),
        e("A:standing:2026-10-01", "A", "standing_charge", -300, 14700, START + H + 1),
        e("A:chg:CA:1", "A", "charge", -170, 14530, START + 11 * H, circuit_id="CA", energy_wh=1000,
          tou_period="peak", tier=1, rate="170"),
        e("A:chg:CA:2", "A", "charge", -85, 14445, START + 11 * H + 900_000, circuit_id="CA", energy_wh=500,
          tou_period="peak", tier=1, rate="170"),
        e("A:chg:CA:3", "A", "charge", -38, 14407, START + 22 * H, circuit_id="CA", energy_wh=1000,
          tou_period="valley", tier=1, rate="38"),
        e("A:standing:2026-10-02", "A", "standing_charge", -300, 14107, START + D),
        e("A:shr:HVAC:2026-09", "A", "shared_cost", -501, 13606, START + 2 * D, source_id=SHR_SRC, rate="0.500000"),
        e("A:adj:adj-1", "A", "adjustment", 100, 13706, START + 3 * D, source_id="adj-1"),
        e("A:debtfix:2026-W41", "A", "debt_recovery", -500, 13206, START + 4 * D),
        e("M1-LANDLORD:chg:CH:1", "M1-LANDLORD", "charge", -1001, -1001, START + 5 * H, circuit_id="CH",
          energy_wh=10010, tou_period="flat", tier=1, rate="100"),
        e("M1-LANDLORD:shr:HVAC:2026-09", "M1-LANDLORD", "shared_cost", 801, -200, START + 2 * D,
          source_id=SHR_SRC, rate="0.800000"),
        e("B:topup:q1", "B", "topup", 2000, 2000, START + 2 * H, source_id="q1"),
        e("B:shr:HVAC:2026-09", "B", "shared_cost", -300, 1700, START + 2 * D, source_id=SHR_SRC, rate="0.300000"),
    ]


def portfolio_dict() -> dict[str, Any]:
    """Mall M1: A (100 m2), B (60 m2), vacant C (40 m2); HVAC pool on meter MH (circuit CH)."""
    return {
        "name": "t", "tariffs": [{"id": "flat", "versions": [{"prices": {"flat": 100}}]}],
        "malls": [{"id": "M1", "name": "Mall One", "tariff": "flat", "areas": [{"id": "F1"}],
                   "gateways": [{"id": "G1", "port": 1502}],
                   "merchants": [{"id": "A", "name": "Tea A", "area": "F1", "leased_area_m2": 100},
                                 {"id": "B", "name": "Shoes B", "area": "F1", "leased_area_m2": 60},
                                 {"id": "C", "name": "(vacant)", "area": "F1", "leased_area_m2": 40,
                                  "vacant": True}],
                   "meters": [{"id": "MH", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 1, "circuits": [{"id": "CH"}]},
                              {"id": "MA", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 2, "account": "A",
                               "circuits": [{"id": "CA"}]}],
                   "pools": [{"id": "HVAC", "name": "Central HVAC", "meters": ["MH"]}]}]}
