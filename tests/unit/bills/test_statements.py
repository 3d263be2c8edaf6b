from __future__ import annotations

import pytest
from bills_fixtures import OCT, START, TZ, ledger

from pipelines.bills.statements import (
    StatementError,
    build_statement,
    mall_summary,
    opening_from_entries,
)


def statement_of(account: str, rows: list[dict] | None = None):  # type: ignore[no-untyped-def]
    rows = ledger() if rows is None else rows
    before = [r for r in rows if r["account_id"] == account and r["ts_ms"] < START]
    return build_statement(account, "M1", OCT, TZ, rows, opening_from_entries(before), merchant_name="Tea A")


def test_statement_lines_sum_to_closing_balance() -> None:
    st = statement_of("A")
    assert (st.opening_minor, st.closing_minor) == (10000, 13206)
    assert sum(x.amount_minor for x in st.lines) == 13206
    by_id = {x.line_id.split("/", 1)[1]: x for x in st.lines}
    assert by_id["opening"].entry_ids == ("A:topup:t0",)
    peak = by_id["energy:peak:1:170"]
    # 1000 + 500 Wh = 1.500 kWh, -170 - 85 = -255
    assert (peak.kwh, peak.amount_minor, peak.quantity) == ("1.500", -255, 2)
    assert peak.entry_ids == ("A:chg:CA:1", "A:chg:CA:2")
    assert by_id["energy:valley:1:38"].amount_minor == -38
    assert (by_id["standing"].amount_minor, by_id["standing"].quantity) == (-600, 2)
    shared = by_id["shared:HVAC:2026-09"]
    assert shared.amount_minor == -501 and shared.detail["method"] == "area" and shared.rate == "0.500000"
    assert by_id["adjustment:A:adj:adj-1"].amount_minor == 100
    assert st.section_totals()["debt_recovery"] == -500
    # every ledger entry of the period appears in exactly one line
    in_period = [r["entry_id"] for r in ledger() if r["account_id"] == "A" and r["ts_ms"] >= START]
    listed = [i for x in st.lines[1:] for i in x.entry_ids]
    assert sorted(listed) == sorted(in_period)


def test_statement_twice_is_identical() -> None:
    assert statement_of("A").to_document() == statement_of("A").to_document()


def test_statement_that_does_not_add_up_is_an_error() -> None:
    rows = ledger()
    rows[9]["balance_after_minor"] = 13000  # the debt recovery entry claims a wrong balance
    with pytest.raises(StatementError, match="closing balance is 13000"):
        statement_of("A", rows)


def test_account_without_entries_before_opens_at_zero() -> None:
    st = build_statement("B", "M1", OCT, TZ, ledger(), opening_from_entries([]))
    assert st.lines[0].entry_ids == ("ledger:none",)
    assert (st.opening_minor, st.closing_minor) == (0, 1700)


def _row(entry_id: str, kind: str, amount: int, balance: int, ts: int, debt: int | None = None) -> dict:
    return {"entry_id": entry_id, "account_id": "N", "mall_id": "M1", "kind": kind, "amount_minor": amount,
            "balance_after_minor": balance, "ts_ms": ts, "source_id": "config", "debt_change_minor": debt}


def test_opening_balance_and_debt_movements_are_lines_of_the_first_period() -> None:
    # carried over: balance 648, arrears 1,000; a top-up recovers 100; the operator writes off 300
    rows = [_row("N:opening_balance", "opening_balance", 648, 648, START),
            _row("N:opening_debt", "debt_opening", 0, 648, START, 1000),
            _row("N:topup:p1", "topup", 1000, 1648, START + 10),
            _row("N:debtpct:p1", "debt_recovery", -100, 1548, START + 10, -100),
            _row("w1", "debt_writeoff", 0, 1548, START + 20, -300)]
    st = build_statement("N", "M1", OCT, TZ, rows, opening_from_entries([]))
    assert (st.opening_minor, st.closing_minor) == (0, 1548)
    by_section = {}
    for x in st.lines:
        by_section.setdefault(x.section, []).append(x)
    assert [x.amount_minor for x in by_section["opening_balance"]] == [648]
    assert [(x.amount_minor, x.detail["debt_change_minor"]) for x in by_section["debt"]] == [(0, 1000), (0, -300)]
    assert "Arrears carried over" in by_section["debt"][0].description
    assert "(debt +10.00)" in by_section["debt"][0].description
    assert [(x.amount_minor, x.detail["debt_change_minor"]) for x in by_section["debt_recovery"]] == [(-100, -100)]
    # every entry is on exactly one line
    assert sorted(i for x in st.lines[1:] for i in x.entry_ids) == sorted(r["entry_id"] for r in rows)


def test_mall_summary() -> None:
    sts = [statement_of(a) for a in ("A", "B", "M1-LANDLORD")]
    s = mall_summary("M1", "2026-10", sts)
    # shared costs conserve money: -501 - 300 + 801 = 0
    assert s["sections_minor"]["shared_cost"] == 0
    assert s["sections_minor"]["topup"] == 7000
    assert s["closing_minor"] == 13206 + 1700 - 200
    assert s["energy_kwh"] == "12.510"  # 1.5 + 1.0 + 10.01
