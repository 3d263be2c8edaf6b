"""SQL files of the warehouse: statement splitting, migrations and named queries.

Pure text handling plus a runner that only needs a clickhouse-connect client, so it works
the same against embedded chDB and a ClickHouse server.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"
DATABASE = "mallwatt"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_QUERY_NAME = re.compile(r"^[a-z0-9_]+$")

# Kept outside the numbered files: the runner needs it before it can tell what ran.
BOOTSTRAP = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations
(
    version     String,
    name        String,
    checksum    String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version""",
)


def split_statements(text: str) -> list[str]:
    """Split SQL text on top-level `;`, ignoring those in quotes and comments.

    Comments are dropped (ClickHouse rejects a statement that is only a comment); quoted
    strings and identifiers ('...', "...", `...`, with backslash escapes and doubled
    quotes) are kept verbatim.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text[j] == ch:
                    if j + 1 < n and text[j + 1] == ch:  # doubled quote escapes itself
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise ValueError(f"unterminated quote starting at offset {i}")
            buf.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j  # keep the newline: it separates tokens
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError(f"unterminated comment starting at offset {i}")
            buf.append(" ")
            i = j + 2
        elif ch == ";":
            out.append("".join(buf))
            buf = []
            i += 1
        else:
            buf.append(ch)
            i += 1
    out.append("".join(buf))
    return [s.strip() for s in out if s.strip()]


_READ_KEYWORDS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"}


def is_read_only(sql: str) -> bool:
    """True for one SELECT-like statement; anything else needs an explicit write flag."""
    statements = split_statements(sql)
    if len(statements) != 1:
        return False
    first = re.match(r"\(*\s*([A-Za-z]+)", statements[0])
    return bool(first) and first.group(1).upper() in _READ_KEYWORDS


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def statements(self) -> list[str]:
        return split_statements(self.text)


def list_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name {path.name!r} is not NNN_name.sql")
        found.append(Migration(match.group(1), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}: {versions}")
    return found


def applied_versions(client: Any) -> dict[str, str]:
    rows = client.query(
        f"SELECT version, argMax(checksum, applied_at) FROM {DATABASE}.schema_migrations GROUP BY version"
    ).result_rows
    return {version: checksum for version, checksum in rows}


def apply_migrations(
    client: Any, directory: Path = MIGRATIONS_DIR, *, cluster: str | None = None
) -> list[str]:
    """Apply the migrations not yet recorded; returns the versions applied now.

    Each statement is idempotent (IF NOT EXISTS), so a run that died half-way through a
    file is finished by simply running the file again: the version is recorded only after
    its last statement succeeded. With `cluster` (a ClickHouse server's cluster name) the
    same files run as rendered by infra.warehouse_cluster: ON CLUSTER, Replicated tables
    and Distributed tables under the usual names.
    """
    if cluster is None:
        bootstrap: list[str] = list(BOOTSTRAP)
        insert_settings: dict[str, Any] = {}
    else:
        from infra.warehouse_cluster import all_tables, render, render_bootstrap

        tables = all_tables(directory)
        bootstrap = render_bootstrap(cluster, tables)
        # The version row goes through the Distributed table: written before the call returns.
        insert_settings = {"insert_distributed_sync": 1}
    for statement in bootstrap:
        client.command(statement)
    done = applied_versions(client)
    applied: list[str] = []
    for migration in list_migrations(directory):
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                log.warning(
                    "migration %s_%s changed after it was applied; add a new migration instead",
                    migration.version,
                    migration.name,
                )
            continue
        statements = (
            migration.statements
            if cluster is None
            else [s for r in render(migration.text, cluster=cluster, tables=tables)
                  for s in r.statements]
        )
        for statement in statements:
            if insert_settings:  # the data migrations' INSERT ... SELECT, like the version row
                client.command(statement, settings=insert_settings)
            else:
                client.command(statement)
        client.insert(
            f"{DATABASE}.schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
            **({"settings": insert_settings} if insert_settings else {}),
        )
        log.info("applied migration %s_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied


def named_query_text(name: str, directory: Path = QUERIES_DIR) -> str:
    if not _QUERY_NAME.match(name):
        raise ValueError(f"bad query name {name!r}")
    path = directory / f"{name}.sql"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.sql"))
        raise KeyError(f"no named query {name!r}; known: {known}")
    statements = split_statements(path.read_text())
    if len(statements) != 1:
        raise ValueError(f"{path} must hold exactly one statement")
    return statements[0]


def list_named_queries(directory: Path = QUERIES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.sql"))
