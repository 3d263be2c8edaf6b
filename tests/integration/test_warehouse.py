"""Real chDB: migrations, the single-owner lock, the query endpoint, named queries."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import warehouse as wh
from infra.warehouse_sql import list_migrations
from pipelines.sink_tables import TOPIC_TABLES
from schemas import codec
from schemas.ledger import entries_to_batch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z = 08:00 in Asia/Shanghai


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chdb"
    yield path
    wh.release_folder(path)


def run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def tables_snapshot(client: object) -> list[tuple[str, str]]:
    return client.query(  # type: ignore[attr-defined]
        "SELECT name, create_table_query FROM system.tables WHERE database = 'mallwatt' ORDER BY name"
    ).result_rows


def test_migrations_apply_twice_without_change(folder: Path) -> None:
    with wh.open_owner(folder, serve=False, migrate=False) as owner:
        first = wh.apply_migrations(owner.client)
        assert first == [m.version for m in list_migrations()]
        before = tables_snapshot(owner.client)
        assert {"readings", "ledger", "circuit_hour_kwh", "ledger_hourly", "ingest_watermark"} <= {
            name for name, _ in before
        }
        assert wh.apply_migrations(owner.client) == []
        assert tables_snapshot(owner.client) == before
        recorded = owner.client.query("SELECT count() FROM mallwatt.schema_migrations FINAL")
        assert recorded.result_rows[0][0] == len(first)
    # A fresh owner (a restart) finds nothing to do either.
    with wh.open_owner(folder, serve=False, migrate=False) as owner:
        assert wh.apply_migrations(owner.client) == []


def ledger_entry(entry_id: str, account: str, kind: str, amount: int, balance: int, ts: int,
                 energy_wh: int | None = None) -> dict:  # fmt: skip
    return {"entry_id": entry_id, "account_id": account, "mall_id": "M1", "kind": kind,
            "amount_minor": amount, "balance_after_minor": balance, "ts_ms": ts,
            "source_id": entry_id, "energy_wh": energy_wh}  # fmt: skip


def insert_ledger(client: object, entries: list[dict]) -> None:
    spec = TOPIC_TABLES["mallwatt.ledger"]
    chunks = [spec.decode(codec.encode("LedgerBatch", entries_to_batch([e], e["entry_id"])))[0] for e in entries]
    client.insert_arrow(spec.table, spec.to_arrow(chunks))  # type: ignore[attr-defined]


def test_named_queries_on_known_data(folder: Path) -> None:
    entries = [
        ledger_entry("t1", "A", "topup", 10_000, 10_000, T0 - 3 * 3_600_000),
        ledger_entry("c1", "A", "charge", -850, 9_150, T0 + 1_000, energy_wh=1_000),
        ledger_entry("c2", "B", "charge", -425, -425, T0 + 2_000, energy_wh=500),
        # 16:30 UTC on Jan 1 is already 00:30 on Jan 2 in Shanghai.
        ledger_entry("c3", "A", "charge", -170, 8_980, T0 + 16 * 3_600_000 + 1_800_000, 200),
    ]
    with wh.open_owner(folder, serve=False) as owner:
        insert_ledger(owner.client, entries)
        insert_ledger(owner.client, entries[:2])  # a replay that bypassed the sink's filter
        balances = wh.run_named_query("account_balances", {"mall_id": ""}, path=folder)
        daily = wh.run_named_query(
            "portfolio_daily",
            {"tz": "Asia/Shanghai", "from_day": "2026-01-01", "to_day": "2026-01-02"},
            path=folder,
        )
    assert balances.select("account_id", "balance_minor", "entries").rows() == [
        ("B", -425, 1),
        ("A", 8_980, 3),
    ]
    rows = {str(r["day"]): r for r in daily.to_dicts()}
    assert set(rows) == {"2026-01-01", "2026-01-02"}
    assert rows["2026-01-02"]["kwh"] == pytest.approx(0.2)
    assert rows["2026-01-02"]["charges_minor"] == 170
    # The summing rollup sees every inserted block: rows replayed past the sink's
    # entry_id filter count twice there (the balances above, read from the ledger, do not).
    # This is why the sink filters known entry_ids before inserting.
    assert rows["2026-01-01"]["topups_minor"] == 20_000  # 05:00 local, inserted twice
    assert rows["2026-01-01"]["kwh"] == pytest.approx(2.5)  # 1.0 twice + 0.5


def test_endpoint_serves_a_second_process(folder: Path) -> None:
    with wh.open_owner(folder) as owner:
        insert_ledger(owner.client, [ledger_entry("x1", "A", "topup", 500, 500, T0)])
        assert (folder / "owner.json").exists()
        out = run_py(f"""
            import json
            from infra import warehouse as wh
            cols, rows = wh.query(
                "SELECT account_id, balance_after_minor, ts FROM mallwatt.ledger "
                "WHERE amount_minor > {{m:Int64}}", {{"m": 0}}, path={str(folder)!r})
            print(json.dumps({{"cols": cols, "rows": [[r[0], r[1], r[2].isoformat()] for r in rows]}}))
            try:
                wh.query("DROP TABLE mallwatt.ledger", path={str(folder)!r})
            except wh.ReadOnlyError:
                print("read-only enforced")
            wh.query("OPTIMIZE TABLE mallwatt.ledger FINAL", path={str(folder)!r}, allow_write=True)
            try:
                wh.get_client({str(folder)!r})
            except wh.WarehouseLocked as exc:
                print("locked:", exc)
        """)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        result = json.loads(lines[0])
        assert result["cols"] == ["account_id", "balance_after_minor", "ts"]
        assert result["rows"] == [["A", 500, "2026-01-01T00:00:00+00:00"]]
        assert lines[1] == "read-only enforced"
        assert lines[2].startswith("locked:")
        count = owner.client.query("SELECT count() FROM mallwatt.ledger").result_rows[0][0]
        assert count == 1
    assert not (folder / "owner.json").exists()


def test_holder_without_endpoint_gives_a_clear_error(folder: Path) -> None:
    with wh.open_owner(folder, serve=False):
        out = run_py(f"""
            from infra import warehouse as wh
            try:
                wh.query("SELECT 1", path={str(folder)!r}, wait=0.5)
            except wh.WarehouseLocked as exc:
                print(exc)
        """)
    assert out.returncode == 0, out.stderr
    assert "held by pid" in out.stdout and "does not answer" in out.stdout


def test_direct_openers_take_turns(folder: Path) -> None:
    with wh.open_owner(folder, serve=False):
        pass  # create the schema, then leave no owner behind
    code = f"""
        from infra import warehouse as wh
        print(wh.query("SELECT count() FROM mallwatt.readings", path={str(folder)!r}, wait=30)[1])
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "[(0,)]"


def test_queries_the_demo_suggests_run_on_the_schema(folder: Path) -> None:
    from pipelines.demo import NEXT_QUERIES

    with wh.open_owner(folder, serve=False, migrate=False) as owner:
        wh.apply_migrations(owner.client)
        insert_ledger(owner.client, [ledger_entry("e1", "A1", "topup", 500, 500, T0)])
        balances = owner.client.query(NEXT_QUERIES[0]).result_rows
        assert balances == [("A1", 5.0)]
        owner.client.query(NEXT_QUERIES[1])  # no alerts yet: it runs and returns nothing
