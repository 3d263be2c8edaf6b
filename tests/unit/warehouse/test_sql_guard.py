"""The read-only guard on canonical statement text (pure; the engine tests are in
tests/integration/test_sql_readonly.py)."""

from __future__ import annotations

import pytest

from infra.sql_guard import (
    OUTSIDE_FUNCTIONS,
    SAFE_TABLE_FUNCTIONS,
    QueryRefused,
    called_functions,
    caller_role,
    check_statement,
    forbidden_functions,
    require_write_role,
    tokenize,
)

# Canonical texts as formatQuery prints them (copied from chDB 26.9 output).
READS = [
    "SELECT 1",
    "WITH\n    1 AS x\nSELECT x",
    "SELECT 1\nUNION ALL\nSELECT 2",
    "DESCRIBE TABLE mallwatt.ledger",
    "SHOW TABLES FROM mallwatt",
    "EXISTS TABLE t",
    "EXPLAIN\nSELECT 1",
    "SELECT format('{}', 1)",  # the string function, not the table function
    "SELECT *\nFROM numbers(3)",
    "SELECT *\nFROM t AS file\nWHERE file.a = 1",  # an alias called file is no call
    "SELECT settings, outfile\nFROM t",  # columns with clause-like names
    "SELECT *\nFROM t\nWHERE (a = {a:Int8}) AND (s = {s:Nullable(String)})",
    "SELECT 'file(\\'/etc/passwd\\')'",  # a string is data
]


@pytest.mark.parametrize("canonical", READS)
def test_reads_pass(canonical: str) -> None:
    check_statement(canonical)


@pytest.mark.parametrize(
    ("canonical", "reason"),
    [
        ("SELECT 1\nINTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
        ("SELECT 1\nINTO OUTFILE '/tmp/x' AND STDOUT", "INTO OUTFILE"),
        ("SELECT *\nFROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT file('/etc/hostname')", "file()"),
        ("SELECT `file`('/etc/hostname')", "file()"),
        ("SELECT *\nFROM FILE('/etc/passwd')", "FILE()"),
        ("SELECT *\nFROM url('http://127.0.0.1:9/x', 'LineAsString')", "url()"),
        ("SELECT *\nFROM system.one\nWHERE 1 IN (\n    SELECT *\n    FROM url('http://x', CSV, 'a Int8')\n)", "url()"),
        ("SELECT *\nFROM t\nINNER JOIN s3('http://x/y', CSV) USING (a)", "s3()"),
        ("SELECT *\nFROM remoteSecure('h:9440', system.one)", "remoteSecure()"),
        ("SELECT format('{}', (\n    SELECT *\n    FROM mysql('h:3306', 'd', 't', 'u', 'p')\n))", "mysql()"),
        ("SELECT *\nFROM executable('x.sh', 'TSV', 'a String')", "executable()"),
        ("SELECT *\nFROM Python(rows)", "Python()"),
        ("DESCRIBE TABLE file('/etc/passwd')", "file()"),
        ("SELECT aiGenerate('tell me the balances')", "aiGenerate()"),
        ("SELECT hasColumnInTable('10.0.0.1', 'u', 'p', 'db', 't', 'c')", "hasColumnInTable()"),
        ("SELECT 1\nSETTINGS readonly = 0", "SETTINGS"),
        ("SELECT 1\nSETTINGS max_threads = 1", "SETTINGS"),
        ("INSERT INTO t FORMAT Values", "read-only"),
        ("DROP TABLE mallwatt.ledger", "read-only"),
        ("SET readonly = 0", "read-only"),
        ("SYSTEM FLUSH LOGS", "read-only"),
    ],
)
def test_attacks_are_refused_with_a_reason(canonical: str, reason: str) -> None:
    with pytest.raises(QueryRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_statement(canonical)


def test_write_flag_allows_writes_but_never_files_or_outside_calls() -> None:
    assert check_statement("OPTIMIZE TABLE mallwatt.ledger FINAL", write=True) == "OPTIMIZE"
    assert check_statement("INSERT INTO t SELECT *\nFROM format(JSONEachRow, 'a Int8', {rows:String})",
                           write=True) == "INSERT"
    with pytest.raises(QueryRefused, match="INFILE"):
        check_statement("INSERT INTO t FROM INFILE '/etc/passwd' FORMAT CSV", write=True)
    with pytest.raises(QueryRefused, match="url"):
        check_statement("INSERT INTO FUNCTION url('http://x', CSV) SELECT 1", write=True)


def test_engine_table_functions_not_reviewed_are_refused() -> None:
    check_statement("SELECT *\nFROM brandNewSource('x')")  # unknown to the guard: the engine decides
    with pytest.raises(QueryRefused, match="brandNewSource"):
        check_statement("SELECT *\nFROM brandNewSource('x')", engine_table_functions=["brandNewSource"])
    assert "numbers" not in forbidden_functions(["numbers", "file"])
    assert not SAFE_TABLE_FUNCTIONS & OUTSIDE_FUNCTIONS


def test_lexer_refuses_what_canonical_text_never_holds() -> None:
    # The engine's canonical form has no comments or heredocs; meeting one means the text
    # did not come from formatQuery, so the guard refuses instead of guessing.
    for text in ["SELECT 1 -- x", "SELECT /* x */ 1", "SELECT 1 # x", "SELECT $$x$$", "SELECT 'open"]:
        with pytest.raises(QueryRefused):
            tokenize(text)


def test_calls_are_found_through_quotes_and_escapes() -> None:
    tokens = tokenize("SELECT `fi\\`le`(1), \"url\"(2), 'file(3)', a.b, f (4)")
    assert called_functions(tokens) == ["fi`le", "url", "f"]


def test_write_role() -> None:
    assert caller_role({}) == "analyst"
    assert caller_role({"MALLWATT_ROLE": " Admin "}) == "admin"
    require_write_role("admin")
    for role in ("analyst", "operator", "finance", "merchant", "nobody"):
        with pytest.raises(QueryRefused, match="admin role"):
            require_write_role(role)


def test_a_connection_not_reporting_readonly_1_is_refused() -> None:
    from infra.warehouse_readonly import assert_read_only

    class Fake:
        def __init__(self, value: str) -> None:
            self.value = value

        def query(self, sql: str) -> object:
            return type("R", (), {"result_rows": [(self.value,)]})()

    assert_read_only(Fake("1"))
    for value in ("0", "2"):  # readonly=2 still lets file() and url() run
        with pytest.raises(RuntimeError, match=f"readonly={value}"):
            assert_read_only(Fake(value))
