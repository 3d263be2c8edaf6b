from __future__ import annotations

from bills_fixtures import START, e, ledger

from pipelines.bills.reconcile import account_totals, energy_balance, reconcile
from pipelines.portfolio import parse_portfolio


def period_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ts_ms"] >= START]


def test_clean_ledger_has_no_mismatch() -> None:
    rows = ledger()
    report = reconcile("2026-10", account_totals(rows), period_rows(rows))
    assert report["mismatches"] == []
    assert report["accounts_checked"] == 3
    # collections in Oct: A 5000 + B 2000 = 7000; deductions: A -300-170-85-38-300-501-500,
    # B -300, landlord -1001 -> -1894 - 300 - 1001 = -3195; other: adj +100, recovery +801
    (flow,) = report["flows"]
    assert flow == {"mall_id": "M1", "collections_minor": 7000, "deductions_minor": -3195, "other_minor": 901}


def test_broken_ledger_is_flagged() -> None:
    rows = ledger()
    rows[4]["amount_minor"] = -95  # a charge changed after the fact: the balances no longer follow
    rows[7]["amount_minor"] = 501  # a shared cost with the wrong sign
    report = reconcile("2026-10", account_totals(rows), period_rows(rows))
    checks = [(m["check"], m["account_id"], m["expected"], m["actual"]) for m in report["mismatches"]]
    # A: sum = 10000+5000-300-170-95-38-300+501+100-500 = 14198 vs last balance_after 13206
    # pool HVAC|area|2026-09: +501 - 300 + 801 = 1002
    assert checks == [("balance", "A", 14198, 13206),
                      ("shared_cost", None, 0, 1002)]


def test_sign_and_config_opening() -> None:
    rows = [e("C:topup:x", "C", "topup", 500, 1500, START + 1, source_id="x"),
            e("C:chg:1", "C", "charge", 20, 1520, START + 2)]
    report = reconcile("2026-10", account_totals(rows), rows, config_openings={"C": 1000})
    # 1000 + 500 + 20 = 1520 matches the balance, but a positive charge is a sign error
    assert [(m["check"], m["actual"]) for m in report["mismatches"]] == [("sign", 20)]


def test_collections_against_provider() -> None:
    rows = ledger()
    provider = [{"payment_id": "p1", "account_id": "A", "kind": "TOPUP", "amount_minor": 5000},
                {"payment_id": "q1", "account_id": "B", "kind": "topup", "amount_minor": 2500},
                {"payment_id": "z9", "account_id": "B", "kind": "topup", "amount_minor": 100}]
    report = reconcile("2026-10", account_totals(rows), period_rows(rows), provider_payments=provider)
    assert [(m["check"], m["account_id"], m["expected"], m["actual"]) for m in report["mismatches"]] == [
        ("collections", "B", 2500, 2000), ("collections", "B", 100, None)]


def mall_with_main() -> object:
    return parse_portfolio({
        "name": "t", "tariffs": [{"id": "flat", "versions": [{"prices": {"flat": 100}}]}],
        "malls": [{"id": "M1", "name": "M1", "tariff": "flat", "areas": [{"id": "F1"}], "main_meter": "MM",
                   "gateways": [{"id": "G1", "port": 1502}],
                   "merchants": [{"id": "A", "name": "A", "area": "F1", "leased_area_m2": 30}],
                   "meters": [{"id": "MM", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 1, "circuits": [{"id": "CM"}]},
                              {"id": "MH", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 2, "circuits": [{"id": "CH"}]},
                              {"id": "MA", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 3, "account": "A",
                               "circuits": [{"id": "CA"}]}]}]}).mall("M1")  # type: ignore[attr-defined]


def test_energy_loss_against_main_meter() -> None:
    mall = mall_with_main()
    # main 10000 Wh, tenant 6000 + common 3500 = 9500 -> loss 500 Wh = 5.00 %
    row = energy_balance(mall, {"CM": 10000, "CA": 6000, "CH": 3500})  # type: ignore[arg-type]
    assert row is not None and (row["loss_wh"], row["loss_pct"]) == (500, "5.00")
    ok = reconcile("2026-10", {}, [], malls=[mall], circuit_wh={"CM": 10000, "CA": 6000, "CH": 3500})  # type: ignore[list-item]
    assert ok["mismatches"] == []
    # 8000 metered of 10000 -> 20 % loss: outside -1..10 %
    bad = reconcile("2026-10", {}, [], malls=[mall], circuit_wh={"CM": 10000, "CA": 6000, "CH": 2000})  # type: ignore[list-item]
    assert [(m["check"], m["actual"]) for m in bad["mismatches"]] == [("energy_loss", "20.00")]
