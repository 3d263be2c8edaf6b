"""The analytics catalog on real chDB: dimensions, rollups, every catalog query, the CLI.

Two datasets, both written straight into a temporary chDB folder through the sink's
insert path (bench.warehouse):
* `hand`: one mall, three merchants and a common HVAC circuit at constant power, so every
  figure can be computed by hand;
* `synthetic`: two generated malls for a week with noise and planted anomalies.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from bench.warehouse import (
    START,
    Synthetic,
    bench_params,
    build_synthetic,
    insert_readings,
    ledger_rows,
    reading_days,
    synthetic_dataset,
    write_watermark,
)
from infra import warehouse as wh
from infra.warehouse_catalog import catalog, completeness, query_main, run_catalog
from infra.warehouse_dims import load_dimensions
from pipelines.generate import guangdong_tariff
from pipelines.portfolio import parse_portfolio

pytestmark = pytest.mark.integration

TZ = "Asia/Shanghai"
D1 = START + dt.timedelta(days=1)  # day 0 of the data is only the register base
D2 = START + dt.timedelta(days=2)
HAND_DAYS = {"tz": TZ, "from_day": D1.isoformat(), "to_day": D2.isoformat()}
# merchant -> (business type, leased m2, constant kW)
HAND = {"A": ("retail", 100.0, 2.0), "B": ("retail", 50.0, 3.0), "C": ("restaurant", 200.0, 10.0)}
HVAC_KW = 20.0  # opening hours (10-22) only


def hand_portfolio() -> Any:
    meters = [
        {"id": f"{m}-E1", "model": "acrel_ddsy1352", "gateway": "GW1", "unit_id": i + 1,
         "account": m, "circuits": [{"id": f"{m}-E1.1", "purpose": "lighting" if t == "retail" else "kitchen"}]}
        for i, (m, (t, _, _)) in enumerate(HAND.items())
    ] + [{"id": "HVAC", "model": "acrel_adl400", "gateway": "GW1", "unit_id": 10,
          "circuits": [{"id": "HVAC.1", "purpose": "hvac"}]}]  # fmt: skip
    return parse_portfolio({
        "name": "hand", "tariffs": [guangdong_tariff()],
        "malls": [{
            "id": "M1", "name": "Hand mall", "tariff": "gd-commercial",
            "areas": [{"id": "F1"}, {"id": "F2"}],
            "gateways": [{"id": "GW1", "port": 15999}],
            "merchants": [{"id": m, "name": f"Shop {m}", "business_type": t, "area": "F1" if m != "C" else "F2",
                           "leased_area_m2": area} for m, (t, area, _) in HAND.items()],
            "meters": meters,
            "pools": [{"id": "P-HVAC", "name": "HVAC", "meters": ["HVAC"]}],
        }],
    })  # fmt: skip


def hand_synthetic() -> Synthetic:
    rows = [{"circuit_id": f"{m}-E1.1", "meter_id": f"{m}-E1", "account_id": m, "mall_id": "M1",
             "purpose": "x", "business_type": t, "kw_open": kw, "kw_closed": kw}
            for m, (t, _, kw) in HAND.items()]  # fmt: skip
    rows.append({"circuit_id": "HVAC.1", "meter_id": "HVAC", "account_id": "M1-LANDLORD",
                 "mall_id": "M1", "purpose": "hvac", "business_type": "common",
                 "kw_open": HVAC_KW, "kw_closed": 0.0})  # fmt: skip
    syn = build_synthetic(1, 1, 3, 900, plant=False)
    return Synthetic(hand_portfolio(), pl.DataFrame(rows), syn.start_ms, 3, 900, noise=0.0)


def _load(folder: Path, syn: Synthetic) -> dict[str, Any]:
    with wh.open_owner(folder, serve=False) as owner:
        return synthetic_dataset(owner.client, syn)


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("hand") / "chdb"
    _load(folder, hand_synthetic())
    yield folder
    wh.release_folder(folder)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Synthetic, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("synthetic") / "chdb"
    syn = build_synthetic(2, 20, 7)
    stats = _load(folder, syn)
    yield folder, syn, stats
    wh.release_folder(folder)


def run(folder: Path, name: str, **params: Any) -> pl.DataFrame:
    return run_catalog(name, params, path=str(folder)).frame


# --- hand-computed figures ------------------------------------------------------------


def test_consumption_matches_hand_computation(hand: Path) -> None:
    daily = run(hand, "consumption_daily", **HAND_DAYS, by="business_type")
    got = {(str(r["day"]), r["key"]): r["kwh"] for r in daily.to_dicts()}
    for day in (D1, D2):
        assert got[(str(day), "retail")] == pytest.approx((2 + 3) * 24, abs=0.02)
        assert got[(str(day), "restaurant")] == pytest.approx(10 * 24, abs=0.02)
        assert got[(str(day), "common")] == pytest.approx(HVAC_KW * 12, abs=0.02)
    assert len(got) == 6  # day 0 is outside the range, day 3 does not exist
    monthly = run(hand, "consumption_monthly", **HAND_DAYS, by="area")
    areas = {r["key"]: r["kwh"] for r in monthly.to_dicts()}
    assert areas == pytest.approx({"F1": 240.0, "F2": 480.0, "(common)": 480.0}, abs=0.05)


def test_kwh_per_m2_and_ranking_match_hand_computation(hand: Path) -> None:
    by_mall = run(hand, "kwh_per_m2", **HAND_DAYS).to_dicts()
    assert len(by_mall) == 1
    assert by_mall[0]["leased_m2"] == 350.0 and by_mall[0]["merchants"] == 3
    assert by_mall[0]["kwh_per_m2"] == pytest.approx((96 + 144 + 480) / 350, abs=1e-3)
    assert by_mall[0]["kwh_per_m2_day"] == pytest.approx(720 / 350 / 2, abs=1e-3)
    by_type = {r["key"]: r["kwh_per_m2"] for r in run(hand, "kwh_per_m2", **HAND_DAYS, by="business_type").to_dicts()}
    assert by_type == pytest.approx({"retail": 240 / 150, "restaurant": 2.4}, abs=1e-3)

    ranks = run(hand, "efficiency_rank", **HAND_DAYS)
    assert ranks.select("business_type", "rank", "account_id", "peers").rows() == [
        ("restaurant", 1, "C", 1), ("retail", 1, "A", 2), ("retail", 2, "B", 2)]  # fmt: skip
    kpm = dict(zip(ranks["account_id"], ranks["kwh_per_m2"], strict=True))
    assert kpm == pytest.approx({"A": 0.96, "B": 2.88, "C": 2.4}, abs=1e-3)
    median = dict(zip(ranks["account_id"], ranks["vs_median"], strict=True))
    assert median == pytest.approx({"A": 0.96 / 1.92, "B": 2.88 / 1.92, "C": 1.0}, abs=1e-3)


def test_load_profile_and_common_area_hours(hand: Path) -> None:
    profile = run(hand, "load_profile", **HAND_DAYS)
    assert profile.height == 24
    kw = dict(zip(profile["hour"], profile["avg_kw"], strict=True))
    for hour in range(24):
        expected = 15 + (HVAC_KW if 10 <= hour < 22 else 0)
        assert kw[hour] == pytest.approx(expected, abs=0.02), hour
    assert profile["share_of_day"].sum() == pytest.approx(1.0)

    common = run(hand, "common_area_hours", **HAND_DAYS).to_dicts()
    assert [r["purpose"] for r in common] == ["hvac"]
    assert common[0]["kwh_open"] == pytest.approx(480, abs=0.05)
    assert common[0]["kwh_closed"] == pytest.approx(0, abs=0.02)
    assert common[0]["avg_kw_open"] == pytest.approx(HVAC_KW, abs=0.01)
    # Open and closed split at other hours: 08:00-20:00 leaves 20:00-22:00 closed.
    late = run(hand, "common_area_hours", **HAND_DAYS, open_hour=8, close_hour=20).to_dicts()[0]
    assert late["kwh_closed"] == pytest.approx(2 * 2 * HVAC_KW, abs=0.05)
    assert late["running_closed_hours"] == 4


def test_tou_shares_sum_to_one_and_match_the_tariff_hours(hand: Path) -> None:
    shares = run(hand, "tou_shares", **HAND_DAYS)
    assert shares["share"].sum() == pytest.approx(1.0)
    got = dict(zip(shares["tou_period"], shares["share"], strict=True))
    # 15 kW all day + 20 kW from 10 to 22; valley 0-8, peak 10-12 and 14-19, flat otherwise.
    assert got == pytest.approx({"valley": 120 / 600, "flat": 235 / 600, "peak": 245 / 600}, abs=1e-4)
    prices = dict(zip(shares["tou_period"], shares["avg_price_minor_per_kwh"], strict=True))
    assert prices == pytest.approx({"valley": 30.4, "flat": 80.0, "peak": 136.0}, abs=0.01)


def test_merchant_by_purpose_shares_and_movers(hand: Path) -> None:
    by_purpose = run(hand, "merchant_by_purpose", **HAND_DAYS)
    sums = by_purpose.group_by("account_id").agg(pl.col("share").sum())
    assert sums["share"].to_list() == pytest.approx([1.0] * sums.height)
    assert set(by_purpose["purpose"]) == {"lighting", "kitchen", "hvac"}
    # D2 against D1: constant power, so nobody moved.
    movers = run(hand, "top_movers", tz=TZ, from_day=D2.isoformat(), to_day=D2.isoformat())
    assert movers["change_kwh"].abs().max() < 0.05
    ranks = dict(zip(movers["account_id"], movers["rank_now"], strict=True))
    assert ranks == {"C": 1, "M1-LANDLORD": 1, "B": 3, "A": 4}  # C and the HVAC tie at 240 kWh


def test_collections_vs_cost_and_completeness(hand: Path) -> None:
    money = run(hand, "collections_vs_cost", **HAND_DAYS).to_dicts()[0]
    # Charges: kWh x price per TOU period, per account and day (rounded per entry).
    expected_cost = 2 * (120 * 30.4 + 235 * 80 + 245 * 136)
    assert money["energy_cost_minor"] == pytest.approx(expected_cost, rel=1e-4)
    assert money["kwh"] == pytest.approx(1200, abs=0.1)
    marks = completeness(path=str(hand))
    assert set(marks) >= {"mallwatt.readings", "mallwatt.ledger", "mallwatt.intervals"}
    result = run_catalog("consumption_daily", {**HAND_DAYS}, path=str(hand))
    # billed energy: complete as far as the interval facts are
    assert result.complete_up_to == {"mallwatt.intervals": marks["mallwatt.intervals"]}
    # Every circuit of the portfolio reported every 15 minutes.
    full = run(hand, "collector_completeness", from_day=D1.isoformat(), to_day=D1.isoformat())
    assert full["completeness"].to_list() == [1.0] and full["gap_slots"].to_list() == [0]
    assert full["circuits"].to_list() == [4]


# --- the synthetic portfolio ----------------------------------------------------------


def test_every_catalog_query_runs_with_its_declared_columns(synthetic: tuple) -> None:
    folder, syn, _ = synthetic
    params = bench_params(syn)
    for spec in catalog():
        result = run_catalog(spec.name, params.get(spec.name, {}), path=str(folder))
        assert result.table.column_names == [c.name for c in spec.columns], spec.name
        for topic in spec.watermark_topics:
            assert topic in result.complete_up_to, spec.name
    assert run(folder, "consumption_daily", **params["consumption_daily"]).height > 0


def test_rollups_equal_aggregates_of_raw_rows(synthetic: tuple) -> None:
    folder, syn, stats = synthetic
    diff = wh.query_df("""
        SELECT count() AS n FROM (
            SELECT circuit_id, day, maxMap(hour_max_kwh) AS m, groupBitOr(slots) AS s
            FROM mallwatt.circuit_daily GROUP BY circuit_id, day
        ) AS r
        FULL OUTER JOIN (
            SELECT circuit_id, toDate(ts, 'UTC') AS day,
                   maxMap([toUInt8(toHour(ts, 'UTC'))], [import_kwh]) AS m,
                   groupBitOr(bitShiftLeft(toUInt128(1), toUInt8(intDiv(toUnixTimestamp(ts) % 86400, 900)))) AS s
            FROM mallwatt.readings FINAL GROUP BY circuit_id, day
        ) AS raw USING (circuit_id, day)
        WHERE r.m != raw.m OR r.s != raw.s""", path=folder)  # fmt: skip
    assert diff["n"].to_list() == [0]
    # Energy over local days 2..6 from the rollup == register differences of the raw reads.
    first, last = START + dt.timedelta(days=1), START + dt.timedelta(days=5)
    raw = pl.concat(stats["frames"]).with_columns(
        pl.col("ts").dt.convert_time_zone(TZ).dt.date().alias("day"))
    before = raw.filter(pl.col("day") < first).group_by("circuit_id").agg(pl.col("import_kwh").max())
    upto = raw.filter(pl.col("day") <= last).group_by("circuit_id").agg(pl.col("import_kwh").max())
    expected = upto.join(before, on="circuit_id", suffix="_before").select(
        (pl.col("import_kwh") - pl.col("import_kwh_before")).sum()).item()
    daily = run(folder, "consumption_daily", tz=TZ, from_day=first.isoformat(), to_day=last.isoformat())
    assert daily["kwh"].sum() == pytest.approx(expected, abs=0.01 * daily.height)
    monthly = run(folder, "consumption_monthly", tz=TZ, from_day=first.isoformat(), to_day=last.isoformat())
    assert monthly["kwh"].sum() == pytest.approx(expected, abs=0.01 * daily.height)
    # The ledger rollup against the raw ledger.
    tou = run(folder, "tou_shares", tz=TZ, from_day=START.isoformat(), to_day=(START + dt.timedelta(days=6)).isoformat())
    raw_wh = wh.query("SELECT sum(energy_wh) FROM mallwatt.ledger FINAL WHERE kind = 'charge'", path=folder)[1][0][0]
    assert tou["kwh"].sum() == pytest.approx(raw_wh / 1000, abs=0.01)
    for mall in tou.partition_by("mall_id"):
        assert mall["share"].sum() == pytest.approx(1.0)


def test_anomalies_flag_exactly_the_planted_faults(synthetic: tuple) -> None:
    folder, syn, _ = synthetic
    week = {"tz": TZ, "from_day": START.isoformat(), "to_day": (START + dt.timedelta(days=6)).isoformat()}
    a = syn.anomalies
    account = {c: r for c, r in zip(syn.circuits["circuit_id"], syn.circuits["account_id"], strict=True)}
    night = run(folder, "anomaly_closed_hours", **week)
    assert night["account_id"].to_list() == [account[a.night_draw]]
    shift = run(folder, "anomaly_baseline_shift", **week)
    assert shift.select("account_id", "direction").rows() == [(account[a.baseline_shift], "up")]
    assert shift["ratio"].to_list() == pytest.approx([3.0], rel=0.1)
    tripped = run(folder, "anomaly_tripped_drawing", **week)
    assert set(tripped["circuit_id"]) == {a.tripped_drawing}
    assert [t.hour for t in tripped["local_hour"].to_list()] == [2, 3, 4]
    assert tripped["max_power_w"].to_list() == [800.0] * 3
    assert run(folder, "anomaly_tripped_drawing", **week, threshold_w=1000).height == 0


def test_dimensions_are_idempotent_and_track_removals(tmp_path: Path) -> None:
    folder = tmp_path / "chdb"
    syn = build_synthetic(2, 10, 2, plant=False)
    smaller = build_synthetic(1, 8, 2, plant=False)
    count = "SELECT count() FROM mallwatt.{t} FINAL"
    try:
        with wh.open_owner(folder, serve=False) as owner:
            load_dimensions(owner.client, syn.portfolio)
            first = {t: owner.client.query(count.format(t=t)).result_rows[0][0] for t in ("dim_malls", "dim_accounts", "dim_circuits", "dim_pools")}
            load_dimensions(owner.client, syn.portfolio)
            again = {t: owner.client.query(count.format(t=t)).result_rows[0][0] for t in first}
            assert first == again == {"dim_malls": 2, "dim_accounts": 22, "dim_circuits": 26, "dim_pools": 6}
            load_dimensions(owner.client, smaller.portfolio)
            assert owner.client.query(count.format(t="dim_circuits")).result_rows[0][0] == 11
            assert owner.client.query("SELECT groupArray(mall_id) FROM mallwatt.dim_malls FINAL").result_rows[0][0] == ["M01"]
        # Through the CLI (direct open) with the config file.
        from pipelines.portfolio import dump_portfolio
        cfg = tmp_path / "p.yaml"
        dump_portfolio(syn.portfolio, cfg)
        assert wh.main(["--path", str(folder), "dims", "--config", str(cfg)]) == 0
        assert wh.query(count.format(t="dim_malls"), path=folder)[1][0][0] == 2
    finally:
        wh.release_folder(folder)


def test_query_cli_formats(hand: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["tou_shares", "--path", str(hand), "--param", f"from_day={D1}", "--param", f"to_day={D2}"]
    assert query_main([*base, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"]["tz"] == TZ and doc["complete_up_to"]["mallwatt.ledger"].startswith(str(D2))
    assert sum(r["share"] for r in doc["rows"]) == pytest.approx(1.0)
    assert query_main([*base, "--format", "csv", "--out", str(tmp_path / "t.csv")]) == 0
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("# complete up to: mallwatt.ledger")
    assert lines[1] == "mall_id,tou_period,kwh,share,charges_minor,avg_price_minor_per_kwh"
    assert len(lines) == 5
    assert query_main([*base, "--format", "parquet", "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.num_rows == 3 and json.loads(table.schema.metadata[b"mallwatt"])["query"] == "tou_shares"
    assert query_main([*base, "--format", "table"]) == 0
    assert "complete up to" in capsys.readouterr().out
    assert query_main([*base, "--param", "nope=1"]) == 1
    assert query_main(["consumption_daily", "--path", str(hand), "--param", f"from_day={D1}",
                       "--param", f"to_day={D2}", "--param", "by=colour"]) == 1  # fmt: skip


def test_replayed_readings_change_nothing(tmp_path: Path) -> None:
    """The rollups are duplicate-insensitive: inserting a day again leaves every report equal."""
    folder = tmp_path / "chdb"
    syn = hand_synthetic()
    try:
        with wh.open_owner(folder, serve=False) as owner:
            stats = synthetic_dataset(owner.client, syn)
            before = run(folder, "consumption_daily", **HAND_DAYS, by="mall")
            insert_readings(owner.client, stats["frames"][1], "a-different-token")
            write_watermark(owner.client, {"mallwatt.readings": syn.start_ms})  # cannot go back
            after = run(folder, "consumption_daily", **HAND_DAYS, by="mall")
            assert after.equals(before)
            marks = completeness(path=str(folder))
            assert marks["mallwatt.readings"].timestamp() * 1000 > syn.start_ms
    finally:
        wh.release_folder(folder)


def test_bench_fixture_ledger_is_consistent_with_readings() -> None:
    syn = hand_synthetic()
    frames = [f for _, f in reading_days(syn)]
    ledger = pl.from_arrow(ledger_rows(syn, frames))
    charges = ledger.filter(pl.col("kind") == "charge")
    # Day 0 has no register base for its first interval; days 1 and 2 are whole.
    per_day = charges.group_by(pl.col("interval_start").dt.convert_time_zone(TZ).dt.date()).agg(pl.col("energy_wh").sum())
    totals = dict(per_day.rows())
    assert totals[D1] == totals[D2] == 600_000


def test_grafana_panels_run_on_the_engine(hand: Path) -> None:
    """Every panel's SQL, with Grafana's macros and variables filled in, runs on chDB."""
    from infra.warehouse_grafana import build_dashboard

    start = f"toDateTime64('{D1} 00:00:00', 3, '{TZ}')"
    end = f"toDateTime64('{D2} 23:59:59', 3, '{TZ}')"
    for panel in build_dashboard()["panels"]:
        sql = (panel["targets"][0]["rawSql"].replace("$__fromTime", start)
               .replace("$__toTime", end).replace("${tz}", TZ).replace("${mall}", ""))  # fmt: skip
        table = wh.query_arrow(sql, path=hand)
        if panel["description"].split()[2] in {"consumption_daily", "tou_shares", "load_profile"}:
            assert table.num_rows > 0, panel["title"]


def test_audit_trail_stores_events_once_and_filters(tmp_path: Path) -> None:
    """AuditEvents as the sink stores them (decoded from their Avro bytes), read back by the
    catalog's audit_trail query: a re-published event is kept once, filters by principal/action."""
    from pipelines.audit import audit_record
    from pipelines.sink_tables import AUDIT_TOPIC, TOPIC_TABLES, insert_arrow
    from schemas import codec

    t0 = 1_784_080_800_000
    events = [audit_record(t0, "alice+bob", "power.order", "meter:MT1", "accepted", "worker", "order op-1"),
              audit_record(t0 + 1, "unverified:eve", "power.refused", "meter:MT2", "bad_signature", "worker"),
              audit_record(t0 + 2, "config:/p.yaml", "config.reload", "/p.yaml", "accepted", "worker", "version 2")]
    table = TOPIC_TABLES[AUDIT_TOPIC]
    chunks = [table.decode(codec.encode("AuditEvent", e))[0] for e in events + events[:1]]  # one re-published
    folder = tmp_path / "chdb"
    with wh.open_owner(folder, serve=False) as owner:
        insert_arrow(owner.client, table.table, table.to_arrow(chunks))
    window = {"from_ts": "2026-07-15 00:00:00", "to_ts": "2026-07-16 00:00:00"}
    everything = run(folder, "audit_trail", **window)
    assert everything.height == 3 and everything["principal"].to_list() == ["config:/p.yaml", "unverified:eve",
                                                                           "alice+bob"]  # newest first
    refused = run(folder, "audit_trail", **window, action="power.refused")
    assert refused["result"].to_list() == ["bad_signature"]
    assert run(folder, "audit_trail", **window, principal="alice+bob")["detail"].to_list() == ["order op-1"]
    wh.release_folder(folder)
