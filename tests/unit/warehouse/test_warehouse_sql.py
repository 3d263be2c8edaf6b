from __future__ import annotations

import re

import pytest

from infra.warehouse_sql import (
    is_read_only,
    list_migrations,
    list_named_queries,
    named_query_text,
    split_statements,
)


def test_split_ignores_semicolons_in_quotes_and_comments() -> None:
    text = """
    -- a comment; with a semicolon
    CREATE TABLE t (a String DEFAULT 'x;y') ENGINE = Memory;
    /* block; comment */ SELECT "we;ird", `id;x`, 'it''s;', 'esc\\';' FROM t;
    ;
    """
    assert split_statements(text) == [
        "CREATE TABLE t (a String DEFAULT 'x;y') ENGINE = Memory",
        "SELECT \"we;ird\", `id;x`, 'it''s;', 'esc\\';' FROM t",
    ]


def test_split_rejects_unterminated_quote() -> None:
    with pytest.raises(ValueError):
        split_statements("SELECT 'abc")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", True),
        ("  with x AS (SELECT 1) SELECT * FROM x", True),
        ("-- hi\nSHOW TABLES", True),
        ("(SELECT 1) UNION ALL (SELECT 2)", True),
        ("INSERT INTO t VALUES (1)", False),
        ("DROP TABLE mallwatt.readings", False),
        ("SELECT 1; DROP TABLE x", False),
        ("OPTIMIZE TABLE x FINAL", False),
    ],
)
def test_is_read_only(sql: str, expected: bool) -> None:
    assert is_read_only(sql) is expected


def test_migrations_are_ordered_and_split_cleanly() -> None:
    migrations = list_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(versions) and len(versions) >= 2
    for m in migrations:
        # A run that died half-way is finished by running the file again, so every
        # statement must be safe to repeat: CREATE IF NOT EXISTS, DROP (VIEW|TABLE) IF EXISTS,
        # CREATE OR REPLACE VIEW, or a data migration INSERT into a rollup the same file
        # creates (AggregatingMergeTree with duplicate-insensitive columns only).
        created = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\S+)", "\n".join(m.statements)))
        for statement in m.statements:
            upper = statement.upper()
            if upper.startswith("INSERT INTO"):
                target = statement.split()[2]
                assert target in created, (m.path, statement[:80])
                continue
            assert "IF NOT EXISTS" in upper or upper.startswith(
                ("DROP VIEW IF EXISTS", "DROP TABLE IF EXISTS", "CREATE OR REPLACE VIEW")
            ), (m.path, statement[:80])


def test_named_queries_are_single_parameterised_statements() -> None:
    names = list_named_queries()
    assert {"portfolio_daily", "account_balances", "top_consumers"} <= set(names)
    for name in names:
        assert "{" in named_query_text(name)
    with pytest.raises(KeyError):
        named_query_text("no_such_query")
    with pytest.raises(ValueError):
        named_query_text("../etc")
