from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from bills_fixtures import OCT, START, e, ledger, portfolio_dict

from pipelines.bills.build import bills_from_entries
from pipelines.bills.export import export_bills
from pipelines.bills.statements import opening_from_entries
from pipelines.portfolio import parse_portfolio

FORMATS = ["csv", "json", "xlsx"]


def bills(rows: list[dict]):  # type: ignore[no-untyped-def]
    before = [r for r in rows if r["ts_ms"] < START]
    openings = {a: opening_from_entries([r for r in before if r["account_id"] == a]) for a in {"A", "B"}}
    openings = {a: o for a, o in openings.items() if o.ref != "config:opening_balance_minor"}
    return bills_from_entries(parse_portfolio(portfolio_dict()), OCT, [r for r in rows if r["ts_ms"] >= START],
                              openings)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_period_bills_cover_every_account_and_the_pool() -> None:
    b = bills(ledger())
    assert [s.account_id for s in b.statements] == ["A", "B", "C", "M1-LANDLORD"]
    (pool,) = b.allocations
    # HVAC in October: the landlord's charge on CH, 1001; 200 m2: A 500.5 -> 501, B 300, C (vacant) 200
    assert pool.cost_minor == 1001
    assert [(x.unit_id, x.role, x.amount_minor) for x in pool.lines] == [
        ("A", "tenant", 501), ("B", "tenant", 300), ("C", "vacant", 200)]


def test_export_twice_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_bills(bills(ledger()), out, FORMATS, html=True)
    first = snapshot(out)
    export_bills(bills(ledger()), out, FORMATS, html=True)
    assert snapshot(out) == first
    # The same into a fresh folder gives the same bytes too (nothing depends on the clock).
    export_bills(bills(ledger()), tmp_path / "again", FORMATS, html=True)
    assert snapshot(tmp_path / "again") == first
    docs = json.loads(first["bills-2026-10.json"])["documents"]
    assert [d["doc_id"] for d in docs] == ["ST-2026-10-A", "ST-2026-10-B", "ST-2026-10-C", "ST-2026-10-M1-LANDLORD"]
    assert first["bills-2026-10-lines.csv"].startswith(b"doc_id,line_id,")
    assert b"ST-2026-10-A/opening,,opening,Opening balance,10000," in first["bills-2026-10-lines.csv"]
    with zipfile.ZipFile(out / "bills-2026-10.xlsx") as z:  # a well-formed workbook
        for name in z.namelist():
            if name.endswith((".xml", ".rels")):
                ET.fromstring(z.read(name))
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        assert "ST-2026-10-A" in sheet and "<v>13206</v>" in sheet
    assert "Tea A" in first["html/ST-2026-10-A.html"].decode()


def test_adjustment_after_export_yields_a_credit_note(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_bills(bills(ledger()), out, ["json", "csv"])
    original = json.loads((out / "bills-2026-10.json").read_text())["documents"]
    # A backdated goodwill credit of 250 lands in October after the export.
    rows = [*ledger(), e("A:adj:adj-2", "A", "adjustment", 250, 13456, START + 5 * 86_400_000, source_id="adj-2")]
    export_bills(bills(rows), out, ["json", "csv"])
    docs = json.loads((out / "bills-2026-10.json").read_text())["documents"]
    assert docs[0] == original[0]  # the exported statement itself never changes
    note = next(d for d in docs if d["doc_id"] == "ST-2026-10-A-CN01")
    assert (note["doc_type"], note["refers_to"], note["net_minor"], note["closing_minor"]) == (
        "credit_note", "ST-2026-10-A", 250, 250)  # closing 13206 -> 13456
    (line,) = note["lines"]
    assert (line["refers_to_line"], line["amount_minor"], line["entry_ids"]) == (
        "ST-2026-10-A/adjustment:A:adj:adj-2", 250, ["A:adj:adj-2"])
    # Exporting the adjusted month again adds nothing more.
    before = snapshot(out)
    export_bills(bills(rows), out, ["json", "csv"])
    assert snapshot(out) == before
    # A reversal of the credit makes a debit note against the effective (corrected) version.
    export_bills(bills(ledger()), out, ["json"])
    docs = json.loads((out / "bills-2026-10.json").read_text())["documents"]
    dn = next(d for d in docs if d["doc_id"] == "ST-2026-10-A-DN02")
    assert (dn["doc_type"], dn["net_minor"], [x["amount_minor"] for x in dn["lines"]]) == ("debit_note", -250, [-250])
