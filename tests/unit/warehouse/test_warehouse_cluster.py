"""The migrations rendered for a ClickHouse cluster (infra/warehouse_cluster.py).

No ClickHouse server or Keeper can run here, so the rendered DDL is checked as text, and
every statement is parsed by ClickHouse's own parser (chDB's formatQuery, in a subprocess so
this test never shares the in-process engine with another test).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from infra import warehouse
from infra.warehouse_cluster import (
    ZK_PATH,
    ClusterRenderError,
    all_tables,
    render,
    render_all,
    render_bootstrap,
    render_statement,
)
from infra.warehouse_sql import BOOTSTRAP, apply_migrations, list_migrations, split_statements

CLUSTER = "mallwatt"
ON = f"ON CLUSTER {CLUSTER}"
TABLES = all_tables()
_CREATE_TABLE = re.compile(r"^CREATE TABLE (?:IF NOT EXISTS )?mallwatt\.(\w+) ON CLUSTER (\w+)")
_ENGINE = re.compile(r"^ENGINE = (\w+)\((.*)\)$", re.M)
_SOURCE_ENGINE = re.compile(r"ENGINE\s*=\s*(\w+)\s*(?:\(([^()]*)\))?")
_MV = re.compile(r"^CREATE MATERIALIZED VIEW (?:IF NOT EXISTS )?mallwatt\.(\w+) ON CLUSTER \w+ TO mallwatt\.(\w+) AS")
_REF = re.compile(r"\bmallwatt\.(\w+)\b")


def _rendered() -> list[tuple[str, str, tuple[str, ...]]]:
    """(file, source statement, rendered statements) of every migration."""
    out = []
    for migration in list_migrations():
        items = render(migration.text, cluster=CLUSTER)
        # no statement lost: one rendering per source statement, in order
        assert [i.source for i in items] == migration.statements, migration.path.name
        out += [(migration.path.name, i.source, i.statements) for i in items]
    return out


def _all_statements() -> list[str]:
    return render_bootstrap(CLUSTER) + [s for _, _, outs in _rendered() for s in outs]


def _distributed_keys() -> dict[str, str]:
    keys: dict[str, str] = {}
    for statement in _all_statements():
        match = re.search(r"ENGINE = Distributed\((\w+), mallwatt, (\w+)_local, (.*)\)$", statement)
        if match:
            keys[match.group(2)] = match.group(3)
    return keys


def test_every_statement_is_rendered_and_every_ddl_is_on_the_cluster() -> None:
    rendered = _rendered()
    assert len(rendered) == sum(len(m.statements) for m in list_migrations())
    for name, source, outs in rendered:
        assert outs, f"{name}: {source[:60]} rendered to nothing"
        for out in outs:
            if out.startswith("INSERT"):
                assert out == source  # data migrations run once through the Distributed tables
            else:
                assert ON in out, f"{name}: no ON CLUSTER in {out[:80]}"


def test_every_table_is_replicated_local_with_a_distributed_twin() -> None:
    created = 0
    for name, source, outs in _rendered():
        if not source.startswith("CREATE TABLE"):
            continue
        created += 1
        table = re.match(r"CREATE TABLE IF NOT EXISTS mallwatt\.(\w+)", source).group(1)
        local, dist = outs
        assert _CREATE_TABLE.match(local).groups() == (f"{table}_local", CLUSTER), name
        engine, args = _ENGINE.search(local).groups()
        src_engine, src_args = _SOURCE_ENGINE.search(source).groups()
        assert engine == f"Replicated{src_engine}"
        expected = [f"'{ZK_PATH}'", "'{replica}'"] + ([src_args.strip()] if src_args else [])
        assert args == ", ".join(expected)
        assert "non_replicated_deduplication_window" not in local
        if "non_replicated_deduplication_window" in source:
            assert "replicated_deduplication_window = 1000" in local
        # everything after the engine (PARTITION BY, ORDER BY, TTL, SETTINGS) is kept
        for clause in ("PARTITION BY", "ORDER BY", "TTL"):
            assert (clause in source) == (clause in local), (table, clause)
        assert _CREATE_TABLE.match(dist).groups() == (table, CLUSTER)
        assert f"AS mallwatt.{table}_local" in dist
        assert f"ENGINE = Distributed({CLUSTER}, mallwatt, {table}_local, cityHash64(" in dist
    assert created == len([t for t in TABLES if t != "schema_migrations"])


def test_sharding_keys_are_row_content_and_follow_materialized_views() -> None:
    keys = _distributed_keys()
    assert set(keys) == set(TABLES)
    assert keys["readings"] == keys["interval_energy"] == "cityHash64(circuit_id)"
    assert keys["ledger"] == "cityHash64(account_id)"
    for key in keys.values():
        assert "rand" not in key.lower()  # a replayed row must land on its first copy's shard
    mvs = 0
    for _, _, outs in _rendered():
        for out in outs:
            match = _MV.match(out)
            if not match:
                continue
            mvs += 1
            target = match.group(2)
            assert target.endswith("_local") and target[: -len("_local")] in TABLES
            sources = {r for r in _REF.findall(out[match.end():])}
            assert sources and all(s.endswith("_local") for s in sources), out[:200]
            for source in sources:  # the view writes on its source's shard
                assert keys[target[: -len("_local")]] == keys[source[: -len("_local")]]
    assert mvs >= 5


def test_alters_drops_and_views() -> None:
    outs = render_statement(
        "ALTER TABLE mallwatt.ledger ADD COLUMN IF NOT EXISTS x Int64", cluster=CLUSTER, tables=TABLES
    )
    assert outs == [
        f"ALTER TABLE mallwatt.ledger_local {ON} ADD COLUMN IF NOT EXISTS x Int64",
        f"ALTER TABLE mallwatt.ledger {ON} ADD COLUMN IF NOT EXISTS x Int64",
    ]
    ttl = render_statement(
        "ALTER TABLE mallwatt.readings MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY DELETE",
        cluster=CLUSTER, tables=TABLES)
    assert ttl == [f"ALTER TABLE mallwatt.readings_local {ON} MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY DELETE"]
    assert render_statement("DROP TABLE IF EXISTS mallwatt.readings_15m", cluster=CLUSTER,
                            tables=TABLES) == [
        f"DROP TABLE IF EXISTS mallwatt.readings_15m {ON}",
        f"DROP TABLE IF EXISTS mallwatt.readings_15m_local {ON}",
    ]
    view = render_statement("CREATE OR REPLACE VIEW mallwatt.v AS SELECT 1 FROM mallwatt.readings",
                            cluster=CLUSTER, tables=TABLES)
    assert view == [f"CREATE OR REPLACE VIEW mallwatt.v {ON} AS SELECT 1 FROM mallwatt.readings"]
    alters = [o for _, s, outs in _rendered() if s.startswith("ALTER") for o in outs]
    assert alters and all(ON in a for a in alters)


def test_unknown_statements_and_bad_names_are_refused() -> None:
    with pytest.raises(ClusterRenderError, match="no cluster rendering"):
        render_statement("RENAME TABLE mallwatt.a TO mallwatt.b", cluster=CLUSTER, tables=TABLES)
    with pytest.raises(ClusterRenderError, match="engine Log"):
        render("CREATE TABLE mallwatt.t (x Int8) ENGINE = Log", cluster=CLUSTER)
    with pytest.raises(ClusterRenderError, match="cluster name"):
        render_statement("CREATE DATABASE mallwatt", cluster="a; DROP", tables=TABLES)


_PARSE = """
import json, sys, chdb
out = []
for q in json.load(sys.stdin):
    # a String parameter is read in the escaped (TSV) format
    q = q.replace('\\\\', '\\\\\\\\').replace('\\n', '\\\\n').replace('\\t', '\\\\t')
    try:
        out.append(str(chdb.query('SELECT formatQuery({q:String})', 'TSVRaw', params={'q': q})))
    except Exception as exc:
        out.append('ERROR ' + str(exc)[:300])
json.dump(out, sys.stdout)
"""


def test_every_rendered_statement_parses_in_clickhouse() -> None:
    statements = _all_statements()
    proc = subprocess.run([sys.executable, "-c", _PARSE], input=json.dumps(statements),
                          capture_output=True, text=True, timeout=240, check=True)
    formatted = json.loads(proc.stdout)
    errors = [(s[:100], f) for s, f in zip(statements, formatted, strict=True) if f.startswith("ERROR")]
    assert not errors
    # the parser read the cluster and the engines as meant, not as something else
    assert sum(ON in f for f in formatted) == sum(not s.startswith("INSERT") for s in statements)
    assert any("ENGINE = Distributed(mallwatt, mallwatt, readings_local" in f for f in formatted)


class _FakeClient:
    def __init__(self) -> None:
        self.commands: list[tuple[str, Any]] = []
        self.inserts: list[tuple[str, Any]] = []

    def command(self, statement: str, settings: Any = None) -> None:
        self.commands.append((statement, settings))

    def query(self, sql: str) -> Any:
        return type("R", (), {"result_rows": []})()

    def insert(self, table: str, rows: Any, column_names: Any, settings: Any = None) -> None:
        self.inserts.append((table, settings))


def test_apply_migrations_on_a_cluster_runs_the_rendered_ddl() -> None:
    client = _FakeClient()
    applied = apply_migrations(client, cluster=CLUSTER)
    assert applied == [m.version for m in list_migrations()]
    ran = [c for c, _ in client.commands]
    assert ran == _all_statements()
    assert all(t == "mallwatt.schema_migrations" and s == {"insert_distributed_sync": 1}
               for t, s in client.inserts)
    # the embedded path is unchanged: the files as written
    plain = _FakeClient()
    apply_migrations(plain)
    assert [c for c, _ in plain.commands] == list(BOOTSTRAP) + [
        s for m in list_migrations() for s in split_statements(m.text)]
    assert all(s is None for _, s in plain.commands + plain.inserts)


def test_cluster_setting_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLWATT_CLICKHOUSE_CLUSTER", CLUSTER)
    monkeypatch.delenv("MALLWATT_CLICKHOUSE", raising=False)
    assert warehouse.cluster_name() is None
    monkeypatch.setenv("MALLWATT_CLICKHOUSE", "http://default:@ch1:8123/")
    assert warehouse.cluster_name() == CLUSTER
    client = _FakeClient()
    warehouse.set_raw_retention(client, 30, cluster=warehouse.cluster_name())
    assert client.commands == [
        (f"ALTER TABLE mallwatt.readings_local {ON} MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY DELETE", None)]


def test_render_cluster_command_prints_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert warehouse.main(["render-cluster", "--cluster", CLUSTER,
                           "--shard-key", "alerts=cityHash64(alert_id)"]) == 0
    printed = capsys.readouterr().out
    assert printed == render_all(CLUSTER, sharding_keys={"alerts": "cityHash64(alert_id)"})
    for table in TABLES:
        assert f"mallwatt.{table}_local {ON}" in printed
    assert "alerts_local, cityHash64(alert_id))" in printed
    for migration in list_migrations():
        assert f"-- {migration.path.name}" in printed
