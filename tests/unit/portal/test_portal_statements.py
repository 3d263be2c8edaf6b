"""Statements of closed periods through the portal API: the bills' own statement, scoped by
token, refused while the period is open, cached once closed."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp.test_utils import TestClient

from pipelines.bills.periods import parse_period
from pipelines.bills.statements import build_statement, opening_from_entries
from pipelines.portal.app import Portal
from pipelines.portal.statements import EntriesSource, Statements
from tests.unit.portal.test_app import auth, run

TZ = "Asia/Shanghai"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(TZ)).timestamp() * 1000)


def row(entry_id: str, kind: str, amount: int, balance: int, at: str, account: str = "M01-S0001",
        **extra: Any) -> dict[str, Any]:
    return {"entry_id": entry_id, "account_id": account, "mall_id": account[:3], "kind": kind,
            "amount_minor": amount, "balance_after_minor": balance, "ts_ms": ms(at), "source_id": entry_id,
            "energy_wh": extra.get("energy_wh"), "tou_period": extra.get("tou_period"), "tier": extra.get("tier"),
            "rate": extra.get("rate"), "estimated": False, "debt_change_minor": None}


ROWS = [
    row("t1", "topup", 10_000, 10_000, "2026-09-20T10:00"),
    row("c0", "charge", -300, 9_700, "2026-09-30T23:30", energy_wh=1000, tou_period="valley", tier=1, rate="30"),
    # October: opening 9,700 (the last September entry), a top-up and two charges
    row("t2", "topup", 5_000, 14_700, "2026-10-03T09:00"),
    row("c1", "charge", -1_200, 13_500, "2026-10-03T10:00", energy_wh=1500, tou_period="peak", tier=1, rate="80"),
    row("c2", "charge", -800, 12_700, "2026-10-04T10:00", energy_wh=1000, tou_period="peak", tier=1, rate="80"),
    row("s1", "standing_charge", -100, 12_600, "2026-10-05T00:00"),
    # another merchant's entries never reach this statement
    row("x1", "topup", 99_999, 99_999, "2026-10-03T09:00", account="M01-S0002"),
    # November is open (the watermark is in it)
    row("c3", "charge", -500, 12_100, "2026-11-02T10:00", energy_wh=600, tou_period="peak", tier=1, rate="80"),
]
WATERMARK = ms("2026-11-15T00:00")


def with_statements(portal: Portal, rows: list[dict[str, Any]] = ROWS) -> EntriesSource:
    source = EntriesSource(rows, WATERMARK)
    portal.statements = Statements(source)
    return source


def test_closed_month_is_the_bills_statement(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        with_statements(portal)
        portal.directory.name_of["M01-S0001"] = "Tea House"
        answer = await client.get("/api/v1/accounts/M01-S0001/statements/2026-10", headers=auth(tok["s1"]))
        doc = await answer.json()
        assert answer.status == 200
        period = parse_period("2026-10")
        mine = [r for r in ROWS if r["account_id"] == "M01-S0001"]
        expected = build_statement("M01-S0001", "M01", period, TZ, mine,
                                   opening_from_entries([r for r in mine if r["ts_ms"] < period.start_ms(TZ)]),
                                   merchant_name="Tea House").to_document()
        assert doc == expected
        assert (doc["opening_minor"], doc["closing_minor"]) == (9_700, 12_600)
        assert sum(x["amount_minor"] for x in doc["lines"]) == doc["closing_minor"]
        energy = [x for x in doc["lines"] if x["section"] == "energy"]
        assert [(x["kwh"], x["amount_minor"]) for x in energy] == [("2.500", -2_000)]
        html = await client.get("/api/v1/accounts/M01-S0001/statements/2026-10?format=html", headers=auth(tok["s1"]))
        assert html.status == 200 and "Tea House" in await html.text()
        # the mall's operator sees it too; a daily period works the same way
        assert (await client.get("/api/v1/accounts/M01-S0001/statements/2026-10-03",
                                 headers=auth(tok["op1"]))).status == 200
    run(tmp_path, scenario)


def test_scoping_and_errors(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        base = "/api/v1/accounts/M01-S0001/statements"
        assert (await client.get(f"{base}/2026-10")).status == 401
        assert (await client.get(f"{base}/2026-10", headers=auth("mwp_00000000_wrong"))).status == 401
        assert (await client.get(base, headers=auth(tok["s1"]))).status == 501  # no warehouse configured
        with_statements(portal)
        other = await client.get(f"{base}/2026-10", headers=auth(tok["s2"]))  # another merchant's account
        assert other.status == 403 and (await other.json())["error"] == "forbidden"
        assert (await client.get(base, headers=auth(tok["s2"]))).status == 403
        assert (await client.get("/api/v1/accounts/M02-S0001/statements/2026-10",
                                 headers=auth(tok["op1"]))).status == 403  # another mall's
        opened = await client.get(f"{base}/2026-11", headers=auth(tok["s1"]))
        assert opened.status == 409 and (await opened.json())["error"] == "period_open"
        bad = await client.get(f"{base}/October", headers=auth(tok["s1"]))
        assert bad.status == 422 and (await bad.json())["field"] == "period"
        assert (await client.get(f"{base}/2026-10?format=pdf", headers=auth(tok["s1"]))).status == 422
    run(tmp_path, scenario)


def test_listing_has_closed_months_only_newest_first(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        with_statements(portal)
        portal.clock = lambda: ms("2026-11-16T08:00")  # November is the current, open month
        listed = await (await client.get("/api/v1/accounts/M01-S0001/statements", headers=auth(tok["s1"]))).json()
        assert [s["period"] for s in listed["statements"]] == ["2026-10", "2026-09"]
        assert listed["complete_until_ms"] == WATERMARK
        other = await (await client.get("/api/v1/accounts/M01-S0002/statements", headers=auth(tok["s2"]))).json()
        assert [s["period"] for s in other["statements"]] == ["2026-10"]
    run(tmp_path, scenario)


def test_a_ledger_that_does_not_add_up_is_refused_not_shown(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        broken = [*ROWS[:3], {**ROWS[3], "balance_after_minor": 1}]  # a charge whose balance is wrong
        with_statements(portal, broken)
        answer = await client.get("/api/v1/accounts/M01-S0001/statements/2026-10", headers=auth(tok["s1"]))
        assert answer.status == 500 and (await answer.json())["error"] == "statement_does_not_add_up"
    run(tmp_path, scenario)


def test_closed_statements_are_cached_and_bounded() -> None:
    calls: list[str] = []

    class Counting(EntriesSource):
        def entries(self, account_id: str, start_ms: int, end_ms: int) -> list[Any]:
            calls.append(account_id)
            return super().entries(account_id, start_ms, end_ms)

    statements = Statements(Counting(ROWS, WATERMARK), cache_size=1)
    first = statements.statement("M01-S0001", "M01", TZ, "2026-10")
    assert statements.statement("M01-S0001", "M01", TZ, "2026-10") is first and len(calls) == 1
    statements.statement("M01-S0001", "M01", TZ, "2026-09")
    statements.statement("M01-S0001", "M01", TZ, "2026-10")  # evicted by September: built again
    assert len(calls) == 3


def test_every_api_route_is_in_the_openapi_document() -> None:
    import tempfile

    from pipelines.portal.app import build_app
    from pipelines.portal.openapi import openapi
    from tests.unit.portal.test_app import make_portal
    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(make_portal(Path(tmp))[0])
    paths = openapi()["paths"]
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/v1/")
              and r.method not in ("HEAD",) and not r.resource.canonical.endswith("openapi.json")}
    missing = {(p, m) for p, m in routes if m not in paths.get(p, {})}
    assert routes and not missing
