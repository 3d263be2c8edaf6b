"""Bills end to end on a real (temporary) chDB folder: ledger in, ERP files out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import warehouse as wh
from pipelines.bills import warehouse_io
from pipelines.bills.export import main
from pipelines.bills.periods import parse_period
from pipelines.portfolio import dump_portfolio
from pipelines.sink_tables import TOPIC_TABLES
from schemas import codec
from schemas.ledger import entries_to_batch

pytestmark = pytest.mark.integration

TZ = "Asia/Shanghai"
START = parse_period("2026-10").start_ms(TZ)
END = parse_period("2026-10").end_ms(TZ)
H = 3_600_000

CONFIG = {
    "name": "t", "tariffs": [{"id": "flat", "versions": [{"prices": {"flat": 100}}]}],
    "malls": [{"id": "M1", "name": "Mall One", "tariff": "flat", "areas": [{"id": "F1"}],
               "gateways": [{"id": "G1", "port": 1502}],
               "merchants": [{"id": "A", "name": "Tea A", "area": "F1", "leased_area_m2": 30},
                             {"id": "B", "name": "Shoes B", "area": "F1", "leased_area_m2": 10,
                              "opening_balance_minor": 700}],
               "meters": [{"id": "MH", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 1, "circuits": [{"id": "CH"}]},
                          {"id": "MA", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 2, "account": "A",
                           "circuits": [{"id": "CA"}]}],
               "pools": [{"id": "HVAC", "name": "Central HVAC", "meters": ["MH"]}]}]}


def entry(entry_id: str, account: str, kind: str, amount: int, balance: int, ts: int, **kw: object) -> dict:
    return {"entry_id": entry_id, "account_id": account, "mall_id": "M1", "kind": kind, "amount_minor": amount,
            "balance_after_minor": balance, "ts_ms": ts, "source_id": kw.pop("source_id", entry_id), **kw}


# A: opening 1000 (Sep top-up), Oct: top-up 500, peak charge -170 (1 kWh), standing -300 -> 1030.
# B: no entries before; Oct: its configured opening 700 (posted by the core), standing -300 -> 400.
# Landlord: HVAC charge -400 (4 kWh) -> -400. HVAC for October by area 30:10 -> A 300, B 100.
LEDGER = [
    entry("A:topup:t0", "A", "topup", 1000, 1000, START - 24 * H, source_id="t0"),
    entry("A:topup:p1", "A", "topup", 500, 1500, START + H, source_id="p1"),
    entry("A:chg:CA:1", "A", "charge", -170, 1330, START + 11 * H, circuit_id="CA", energy_wh=1000,
          tou_period="peak", tier=1, rate="170"),
    entry("A:standing:2026-10-01", "A", "standing_charge", -300, 1030, START + 11 * H + 1),
    entry("B:opening_balance", "B", "opening_balance", 700, 700, START, source_id="config"),
    entry("B:standing:2026-10-01", "B", "standing_charge", -300, 400, START + 2 * H),
    entry("M1-LANDLORD:chg:CH:1", "M1-LANDLORD", "charge", -400, -400, START + 3 * H, circuit_id="CH",
          energy_wh=4000, tou_period="flat", tier=1, rate="100"),
]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, object]]:
    folder = tmp_path / "chdb"
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(CONFIG, config)
    with wh.open_owner(folder, serve=False) as owner:
        yield folder, config, owner.client
    wh.release_folder(folder)


def insert(client: object, entries: list[dict]) -> None:
    spec = TOPIC_TABLES["mallwatt.ledger"]
    chunks = [spec.decode(codec.encode("LedgerBatch", entries_to_batch([e], e["entry_id"])))[0] for e in entries]
    client.insert_arrow(spec.table, spec.to_arrow(chunks))  # type: ignore[attr-defined]


def watermark(client: object, ts_ms: int) -> None:
    client.command(  # type: ignore[attr-defined]
        "INSERT INTO mallwatt.ingest_watermark SELECT 'mallwatt.ledger', 0, 1, "
        f"fromUnixTimestamp64Milli(toInt64({ts_ms}), 'UTC'), now64(3)")


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_statement_reconcile_end_to_end(setup: tuple[Path, Path, object], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder, config, client = setup
    insert(client, LEDGER)
    base = ["--config", str(config), "--path", str(folder)]
    out = tmp_path / "erp"
    export = [*base, "export", "--month", "2026-10", "--format", "csv", "--format", "json", "--format", "xlsx",
              "--out", str(out)]

    # The sink has only written up to October 20th: October is still open.
    watermark(client, START + 20 * 24 * H)
    assert main(export) == 1
    assert "not closed" in capsys.readouterr().err
    assert not out.exists()

    watermark(client, END + H)
    assert main(export) == 0
    first = files(out)
    assert main(export) == 0
    assert files(out) == first
    lines = first["bills-2026-10-lines.csv"].decode()
    assert "ST-2026-10-A/energy:peak:1:170,,energy,Energy peak tier 1: 1.000 kWh @ 170/kWh,-170,1.000" in lines
    assert "ST-2026-10-B/opening,,opening,Opening balance,0,,,,,1,ledger:none" in lines
    assert "ST-2026-10-B/opening_balance:B:opening_balance,,opening_balance,opening_balance config,700" in lines
    capsys.readouterr()

    assert main([*base, "statement", "--account", "A", "--month", "2026-10"]) == 0
    text = capsys.readouterr().out
    assert "Opening balance" in text and "10.30 CNY" in text  # closing 1030 fen

    assert main([*base, "reconcile", "--month", "2026-10"]) == 0
    capsys.readouterr()

    assert main([*base, "allocate", "--month", "2026-10"]) == 0
    posted = capsys.readouterr().out.splitlines()
    # October HVAC 400 by area 30:10: A -300, B -100, landlord +400
    assert [line.split('"amount_minor": ')[1].split(",")[0] for line in posted] == ["-300", "-100", "400"]

    # A backdated adjustment arrives after the export: a credit note, the original untouched.
    insert(client, [entry("A:adj:a1", "A", "adjustment", 50, 1080, START + 5 * 24 * H, source_id="a1")])
    assert main(export) == 0
    again = files(out)
    assert b"ST-2026-10-A-CN01,credit_note,ST-2026-10-A" in again["bills-2026-10-documents.csv"]
    assert again["bills-2026-10-documents.csv"].startswith(first["bills-2026-10-documents.csv"].split(b"\n")[0])

    # A broken balance is reported.
    insert(client, [entry("B:adj:bad", "B", "adjustment", -10, 999, START + 6 * 24 * H)])
    assert main([*base, "reconcile", "--month", "2026-10"]) == 1
    assert '"check": "balance"' in capsys.readouterr().out


def test_circuit_energy_from_interval_facts(setup: tuple[Path, Path, object]) -> None:
    folder, _, client = setup
    # The facts the core publishes for CH: 100.000 -> 101.500 kWh on meter MH (1500 Wh), a swap
    # to MH2 (replaced, 0 Wh), 0.200 -> 2.700 kWh (2500 Wh); a late reading (marker, 0 Wh); one
    # interval ending at the period's end (inside) and one after it (not counted); the first
    # again (a re-published fact counts once). CA has one reading only: no interval.
    facts = [("CH", "MH", START + H, START + 2 * H, 1500, 1500, ""),
             ("CH", "MH2", START + 2 * H, START + 3 * H, 0, 1500, "replaced"),
             ("CH", "MH2", START + 3 * H, START + 4 * H, 2500, 4000, ""),
             ("CH", "MH2", START + H + 1, START + H + 1, 0, 0, "late"),
             ("CH", "MH2", END - H, END, 100, 4100, ""),
             ("CH", "MH2", END, END + H, 7200, 11300, ""),
             ("CH", "MH", START + H, START + 2 * H, 1500, 1500, "")]
    for n, (c, m, start, end, energy, total, flag) in enumerate(facts):
        client.command("INSERT INTO mallwatt.interval_energy (mall_id, circuit_id, end_ts, start_ts, account_id, "  # type: ignore[attr-defined]
                       "meter_id, energy_wh, billed_total_wh, estimated, flag) VALUES "
                       f"('M1', '{c}', fromUnixTimestamp64Milli(toInt64({end}), 'UTC'), "
                       f"fromUnixTimestamp64Milli(toInt64({start}), 'UTC'), 'X', '{m}', {energy}, {total}, false, '{flag}')",
                       settings={"insert_deduplication_token": f"fact-{n}"})
    assert warehouse_io.circuit_energy_wh(START, END, "M1", folder) == {"CH": 4100}
