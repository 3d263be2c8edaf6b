"""The portal's statements from a real warehouse (chDB): the same document as
`mallwatt bills statement --format json`, refused while the period is open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.bills.export import main as bills_main
from pipelines.bills.periods import PeriodOpen
from pipelines.portal.statements import Statements, WarehouseSource
from tests.integration.test_bills import END, LEDGER, START, TZ, H, insert, setup, watermark  # noqa: F401

pytestmark = pytest.mark.integration


def test_portal_statement_is_the_bills_statement(setup: tuple[Path, Path, object],  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder, config, client = setup
    insert(client, LEDGER)
    statements = Statements(WarehouseSource(folder))
    watermark(client, START + 20 * 24 * H)
    with pytest.raises(PeriodOpen):
        statements.statement("A", "M1", TZ, "2026-10")
    watermark(client, END + H)
    doc = statements.statement("A", "M1", TZ, "2026-10", merchant_name="Tea A")
    capsys.readouterr()
    assert bills_main(["--config", str(config), "--path", str(folder), "statement", "--account", "A",
                       "--month", "2026-10", "--format", "json"]) == 0
    assert doc == json.loads(capsys.readouterr().out)
    assert (doc["opening_minor"], doc["closing_minor"]) == (1000, 1030)
    listed = statements.periods("A", TZ, END + 5 * 24 * H)
    assert [s["period"] for s in listed["statements"]] == ["2026-10", "2026-09"]
