"""The read model: balance from the last entry, dedup, hourly/TOU aggregation, days left, relay."""

from __future__ import annotations

from typing import Any

from pipelines.portal.readmodel import HOUR_ROW, HOURS, ReadModel
from schemas.ledger import batch_entries, entries_to_batch

T0 = 1_784_044_800_000  # 2026-07-15 00:00 +08:00
H = 3_600_000


def charge(i: int, hour: int, wh: int, money: int, period: str, balance: int, day: int = 0) -> dict[str, Any]:
    start = T0 + day * 24 * H + hour * H
    return {"entry_id": f"c{day}-{hour}-{i}", "account_id": "M01-S0001", "mall_id": "M01", "kind": "charge",
            "amount_minor": -money, "balance_after_minor": balance, "ts_ms": start + 900_000, "source_id": "x",
            "interval_start_ms": start, "energy_wh": wh, "tou_period": period}


def topup(entry_id: str, amount: int, balance: int, ts: int) -> dict[str, Any]:
    return {"entry_id": entry_id, "account_id": "M01-S0001", "mall_id": "M01", "kind": "topup",
            "amount_minor": amount, "balance_after_minor": balance, "ts_ms": ts, "source_id": entry_id}


def test_balance_is_the_last_entry_and_replays_count_once() -> None:
    model = ReadModel({"M01": "Asia/Shanghai"})
    entries = [topup("p1", 10_000, 10_000, T0), charge(0, 10, 1000, 136, "peak", 9_864)]
    # through the real contract: a LedgerBatch round trip
    decoded = batch_entries(entries_to_batch(entries, "b1"))
    assert model.apply_entries(decoded, applied_ms=T0 + 11 * H) == 2
    assert model.apply_entries(decoded, applied_ms=T0 + 12 * H) == 0  # a replayed batch
    b = model.balance("M01-S0001", T0 + 12 * H)
    assert b is not None and b["balance_minor"] == 9_864 and b["as_of_ms"] == T0 + 11 * H
    assert model.duplicates == 2
    # ledger order decides, not entry time: a top-up paid an hour before the last charge but
    # posted after it carries the balance after both (here 9,864 + 1)
    model.apply_entries([topup("p0", 1, 9_865, T0 - H)], T0 + 12 * H)
    assert model.balance("M01-S0001", T0 + 12 * H)["balance_minor"] == 9_865
    assert [e["entry_id"] for e in model.activity("M01-S0001", 2)] == ["c0-10-0", "p1"]  # newest by time


def test_usage_today_by_hour_and_tou_period_in_local_time() -> None:
    model = ReadModel({"M01": "Asia/Shanghai"})
    model.apply_entries([charge(0, 10, 1000, 136, "peak", 0), charge(1, 10, 500, 68, "peak", 0),
                         charge(0, 3, 2000, 61, "valley", 0), charge(0, 13, 250, 20, "flat", 0),
                         charge(0, 23, 999, 30, "valley", 0, day=-1)], T0)  # yesterday: not today
    usage = model.usage_today("M01-S0001", T0 + 14 * H)
    assert usage["date"] == "2026-07-15"
    assert [(h["hour"], h["tou_period"], h["energy_wh"], h["amount_minor"]) for h in usage["hours"]] == [
        (3, "valley", 2000, 61), (10, "peak", 1500, 204), (13, "flat", 250, 20)]
    assert {p["tou_period"]: (p["kwh"], p["amount_minor"]) for p in usage["by_period"]} == {
        "flat": ("0.250", 20), "peak": ("1.500", 204), "valley": ("2.000", 61)}
    assert usage["energy_wh"] == 3750 and usage["amount_minor"] == 285
    month = model.usage_month("M01-S0001", T0 + 14 * H)
    assert [(d["date"], d["energy_wh"]) for d in month["days"]] == [("2026-07-14", 999), ("2026-07-15", 3750)]


def test_hourly_history_is_bounded() -> None:
    model = ReadModel()
    model.apply_entries([charge(0, h % 24, 10, 1, "flat", 0, day=h // 24) for h in range(HOURS * 3)], T0)
    assert len(set(model.accounts["M01-S0001"].hours[0::HOUR_ROW])) == HOURS  # distinct hours kept


def test_days_left_at_recent_consumption() -> None:
    model = ReadModel({"M01": "Asia/Shanghai"})
    # spend 1000 a day for 4 days, then a balance of 10,000: 10 days left
    entries = [charge(0, 12, 1000, 1000, "flat", 20_000 - 1000 * d, day=d) for d in range(4)]
    model.apply_entries(entries, T0)
    first = entries[0]["ts_ms"]
    model.apply_entries([topup("p1", 0, 10_000, first + 4 * 24 * H)], T0)
    assert model.days_left("M01-S0001", first + 4 * 24 * H) == 10.0
    model.apply_entries([topup("p2", 0, -5, first + 4 * 24 * H + 1)], T0)
    assert model.days_left("M01-S0001", first + 4 * 24 * H + 1) == 0.0
    assert model.days_left("nobody", T0) is None


def test_relay_state_and_alerts() -> None:
    model = ReadModel()
    model.apply_relay_command({"command_id": "c1", "action": "TRIP", "reason": "credit", "mall_id": "M01",
                               "account_id": "M01-S0001", "issued_at_ms": T0, "cause_ts_ms": T0})
    model.apply_relay_command({"command_id": "c2", "action": "RECONNECT", "reason": "topup", "mall_id": "M01",
                               "account_id": "M01-S0001", "issued_at_ms": T0 + 5, "cause_ts_ms": T0 + 5})
    model.apply_relay_command({"command_id": "c0", "action": "TRIP", "reason": "credit", "mall_id": "M01",
                               "account_id": "M01-S0001", "issued_at_ms": T0 - 5, "cause_ts_ms": T0 - 5})
    assert model.accounts["M01-S0001"].relay == "connected"
    alert = {"alert_id": "a1", "kind": "low_balance", "severity": "WARNING", "mall_id": "M01",
             "account_id": "M01-S0001", "ts_ms": T0, "message": "low"}
    model.apply_alert(alert)
    model.apply_alert(alert)
    model.apply_alert({**alert, "alert_id": "a2", "account_id": None})
    assert [a["alert_id"] for a in model.alerts("M01-S0001")] == ["a1"]


def test_a_charge_whose_source_is_its_own_id_reads_back_unchanged() -> None:
    model = ReadModel()
    entry = {**charge(0, 10, 100, 5, "peak", 995), "source_id": None}
    entry["source_id"] = str(entry["entry_id"])
    model.apply_entries([entry], T0)
    assert model.activity("M01-S0001")[0]["source_id"] == entry["entry_id"]
