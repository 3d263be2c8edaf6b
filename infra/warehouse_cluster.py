"""The warehouse migrations rendered for a ClickHouse cluster (MALLWATT_CLICKHOUSE_CLUSTER).

The embedded engine and a single server run `sql/migrations/*.sql` as written. A cluster runs
the SAME files, rewritten statement by statement (pure text; nothing here talks to a server):

* every table `db.t` becomes `db.t_local` with the Replicated* variant of its engine
  (`/clickhouse/tables/{shard}/{database}/{table}` and `{replica}` macros, the engine's own
  arguments after them), plus a `Distributed` table under the original name `db.t` over the
  local ones. Queries, views and the sink keep using `db.t`, so nothing else changes.
* materialized views are created on every node over the LOCAL tables (`FROM db.t_local`,
  `TO db.target_local`): an insert through the Distributed table lands in a shard's local
  table, and that shard's view rolls it up into its own local target.
* plain views keep reading the Distributed names; ALTERs of columns change both tables,
  other ALTERs (TTL, settings) only the local one; DROPs drop both.
* every DDL statement carries `ON CLUSTER <cluster>`. INSERT ... SELECT (data migrations)
  runs once, on the node that migrates, through the Distributed tables.

Sharding: a row must always go to the same shard, or ReplacingMergeTree could not collapse a
replayed copy with its first one: the key is a hash of row content. Tables read per circuit
(readings, billed intervals and their rollups) shard by circuit, the ledger and its rollups
by account; a materialized view's target is written on its source's shard, so it has its
source's key. Any other table shards by its ORDER BY columns. `sharding_keys` overrides.

    python -m infra.warehouse render-cluster --cluster mallwatt   # prints the DDL for review
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.warehouse_sql import (
    BOOTSTRAP,
    DATABASE,
    MIGRATIONS_DIR,
    list_migrations,
    split_statements,
)

LOCAL_SUFFIX = "_local"
ZK_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
REPLICA = "{replica}"
_MERGE_TREES = {
    "MergeTree",
    "ReplacingMergeTree",
    "AggregatingMergeTree",
    "SummingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
}
_CIRCUIT_KEY = "cityHash64(circuit_id)"
_ACCOUNT_KEY = "cityHash64(account_id)"
DEFAULT_SHARDING_KEYS: dict[str, str] = {
    "readings": _CIRCUIT_KEY,
    "interval_energy": _CIRCUIT_KEY,
    "circuit_daily": _CIRCUIT_KEY,  # MV target of readings
    "billed_daily": _CIRCUIT_KEY,  # MV target of interval_energy
    "circuit_hour_kwh": _CIRCUIT_KEY,
    "billed_hour_kwh": _CIRCUIT_KEY,
    "readings_15m": _CIRCUIT_KEY,
    "readings_15m_v2": _CIRCUIT_KEY,
    "ledger": _ACCOUNT_KEY,
    "ledger_hourly": _ACCOUNT_KEY,  # MV target of ledger
    "ledger_tou_hourly": _ACCOUNT_KEY,  # MV target of ledger
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = rf"{DATABASE}\.(\w+)"
_CREATE_DB = re.compile(r"^CREATE\s+DATABASE\s+(IF\s+NOT\s+EXISTS\s+)?(\w+)\s*$", re.I)
_CREATE_TABLE = re.compile(rf"^CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}\s*\(", re.I)
_ENGINE = re.compile(r"\s*ENGINE\s*=\s*(\w+)\s*(?:\(([^()]*)\))?", re.I)
_ORDER_BY = re.compile(r"\bORDER\s+BY\s+(\([^()]*\)|[\w.]+)", re.I)
_CREATE_MV = re.compile(
    rf"^CREATE\s+MATERIALIZED\s+VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}\s+TO\s+{_NAME}\s+AS\b", re.I
)
_CREATE_VIEW = re.compile(
    rf"^CREATE\s+(OR\s+REPLACE\s+)?VIEW\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}\s+AS\b", re.I
)
_ALTER = re.compile(rf"^ALTER\s+TABLE\s+{_NAME}\s+(.*)$", re.I | re.S)
_COLUMN_ALTER = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT|CLEAR)\s+COLUMN\b", re.I)
_DROP = re.compile(rf"^DROP\s+(TABLE|VIEW)\s+(IF\s+EXISTS\s+)?{_NAME}\s*$", re.I)
_TRUNCATE = re.compile(rf"^TRUNCATE\s+TABLE\s+(IF\s+EXISTS\s+)?{_NAME}\s*$", re.I)
_INSERT = re.compile(r"^INSERT\s+INTO\b", re.I)
_TABLE_REF = re.compile(rf"\b{DATABASE}\.(\w+)\b")


class ClusterRenderError(ValueError):
    """A statement the cluster renderer does not know how to rewrite (named in the message)."""


@dataclass(frozen=True)
class Rendered:
    """One source statement and the statements it became."""

    source: str
    statements: tuple[str, ...]


def _head(statement: str) -> str:
    return " ".join(statement.split())[:80]


def _check_cluster(cluster: str) -> str:
    if not _IDENT.match(cluster):
        raise ClusterRenderError(f"cluster name {cluster!r} is not a plain identifier")
    return cluster


def _matching_paren(text: str, start: int) -> int:
    """Index of the `)` closing the `(` at `start` (quotes and comments are gone already)."""
    depth = 0
    quote = ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ClusterRenderError("unbalanced parentheses")


def tables_of(statements: Iterable[str]) -> list[str]:
    """Names of the tables (not views) that CREATE TABLE statements create, in order."""
    found: list[str] = []
    for statement in statements:
        match = _CREATE_TABLE.match(statement)
        if match and match.group(2) not in found:
            found.append(match.group(2))
    return found


def all_tables(directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Every table of the bootstrap and the migrations: the ones that get a `_local` twin."""
    statements = list(BOOTSTRAP)
    for migration in list_migrations(directory):
        statements += migration.statements
    return tables_of(statements)


def sharding_key(table: str, order_by: str, overrides: Mapping[str, str] | None = None) -> str:
    """The Distributed sharding expression of `table` (module doc: a hash of row content)."""
    if overrides and table in overrides:
        return overrides[table]
    if table in DEFAULT_SHARDING_KEYS:
        return DEFAULT_SHARDING_KEYS[table]
    columns = order_by.strip()
    if columns.startswith("(") and columns.endswith(")"):
        columns = columns[1:-1]
    return f"cityHash64({', '.join(c.strip() for c in columns.split(','))})"


def _local(name: str) -> str:
    return f"{DATABASE}.{name}{LOCAL_SUFFIX}"


def _create_table(statement: str, cluster: str, overrides: Mapping[str, str] | None) -> list[str]:
    match = _CREATE_TABLE.match(statement)
    assert match is not None
    if_not_exists, name = match.group(1) or "", match.group(2)
    open_at = match.end() - 1
    close_at = _matching_paren(statement, open_at)
    columns = statement[open_at : close_at + 1]
    rest = statement[close_at + 1 :]
    engine = _ENGINE.match(rest)
    if engine is None:
        raise ClusterRenderError(f"table {name}: no ENGINE clause after the columns")
    kind, args = engine.group(1), (engine.group(2) or "").strip()
    if kind not in _MERGE_TREES:
        raise ClusterRenderError(f"table {name}: engine {kind} has no Replicated variant here")
    order_by = _ORDER_BY.search(rest)
    if order_by is None:
        raise ClusterRenderError(f"table {name}: no ORDER BY")
    replicated_args = ", ".join([f"'{ZK_PATH}'", f"'{REPLICA}'", *([args] if args else [])])
    # Replicated tables deduplicate retried inserts with their own window setting.
    tail = re.sub(
        r"\bnon_replicated_deduplication_window\b",
        "replicated_deduplication_window",
        rest[engine.end() :],
    ).strip()
    tail = re.sub(r"\n\s*\n", "\n", tail)  # blank lines where comments were
    local = (
        f"CREATE TABLE {if_not_exists}{_local(name)} ON CLUSTER {cluster}\n{columns}\n"
        f"ENGINE = Replicated{kind}({replicated_args})" + (f"\n{tail}" if tail else "")
    )
    key = sharding_key(name, order_by.group(1), overrides)
    distributed = (
        f"CREATE TABLE {if_not_exists}{DATABASE}.{name} ON CLUSTER {cluster} AS {_local(name)}\n"
        f"ENGINE = Distributed({cluster}, {DATABASE}, {name}{LOCAL_SUFFIX}, {key})"
    )
    return [local, distributed]


def render_statement(
    statement: str,
    *,
    cluster: str,
    tables: Iterable[str],
    sharding_keys: Mapping[str, str] | None = None,
) -> list[str]:
    """The cluster statements for one statement of a migration (module doc for the rules).

    `tables` names every table that has (or will have) a `_local` twin; references to other
    names (views) are left alone. Raises ClusterRenderError for a statement of unknown shape,
    so nothing is silently dropped or run unrendered.
    """
    _check_cluster(cluster)
    known = set(tables)
    on = f"ON CLUSTER {cluster}"
    if match := _CREATE_DB.match(statement):
        return [f"{statement.rstrip()} {on}"]
    if _CREATE_TABLE.match(statement):
        return _create_table(statement, cluster, sharding_keys)
    if match := _CREATE_MV.match(statement):
        name, target = match.group(2), match.group(3)
        if target not in known:
            raise ClusterRenderError(f"materialized view {name}: target {target} is not a table")
        body = _TABLE_REF.sub(
            lambda ref: _local(ref.group(1)) if ref.group(1) in known else ref.group(0),
            statement[match.end() :],
        )
        return [
            f"CREATE MATERIALIZED VIEW {match.group(1) or ''}{DATABASE}.{name} {on} "
            f"TO {_local(target)} AS{body}"
        ]
    if match := _CREATE_VIEW.match(statement):
        head = f"CREATE {match.group(1) or ''}VIEW {match.group(2) or ''}{DATABASE}.{match.group(3)}"
        return [f"{head} {on} AS{statement[match.end():]}"]
    if match := _ALTER.match(statement):
        name, action = match.group(1), match.group(2).strip()
        if name not in known:
            return [f"ALTER TABLE {DATABASE}.{name} {on} {action}"]
        out = [f"ALTER TABLE {_local(name)} {on} {action}"]
        if _COLUMN_ALTER.match(action):  # the Distributed table mirrors the columns
            out.append(f"ALTER TABLE {DATABASE}.{name} {on} {action}")
        return out
    if match := _DROP.match(statement):
        kind, if_exists, name = match.group(1).upper(), match.group(2) or "", match.group(3)
        if kind == "TABLE" and name in known:
            return [
                f"DROP TABLE {if_exists}{DATABASE}.{name} {on}",
                f"DROP TABLE {if_exists}{_local(name)} {on}",
            ]
        return [f"DROP {kind} {if_exists}{DATABASE}.{name} {on}"]
    if match := _TRUNCATE.match(statement):
        name = match.group(2)
        target = _local(name) if name in known else f"{DATABASE}.{name}"
        return [f"TRUNCATE TABLE {match.group(1) or ''}{target} {on}"]
    if _INSERT.match(statement):
        return [statement]  # once, on this node, through the Distributed tables
    raise ClusterRenderError(f"no cluster rendering for statement: {_head(statement)}")


def render(
    migration_sql: str,
    *,
    cluster: str,
    sharding_keys: Mapping[str, str] | None = None,
    tables: Iterable[str] | None = None,
) -> list[Rendered]:
    """Render one migration's text for `cluster`: one Rendered per source statement.

    `tables` defaults to every table of the bootstrap, the shipped migrations and this text.
    """
    statements = split_statements(migration_sql)
    known = list(tables) if tables is not None else [*all_tables(), *tables_of(statements)]
    return [
        Rendered(s, tuple(render_statement(s, cluster=cluster, tables=known,
                                           sharding_keys=sharding_keys)))
        for s in statements
    ]


def render_bootstrap(cluster: str, tables: Iterable[str] | None = None) -> list[str]:
    known = list(tables) if tables is not None else all_tables()
    return [out for s in BOOTSTRAP for out in render_statement(s, cluster=cluster, tables=known)]


def render_all(
    cluster: str,
    directory: Path = MIGRATIONS_DIR,
    sharding_keys: Mapping[str, str] | None = None,
) -> str:
    """Every migration rendered for review, as one SQL script with a header per file."""
    known = all_tables(directory)
    parts = ["-- bootstrap (infra/warehouse_sql.py)", *(f"{s};" for s in render_bootstrap(cluster, known))]
    for migration in list_migrations(directory):
        parts.append(f"\n-- {migration.path.name}")
        for item in render(migration.text, cluster=cluster, sharding_keys=sharding_keys, tables=known):
            parts += [f"{s};" for s in item.statements]
    return "\n".join(parts) + "\n"
