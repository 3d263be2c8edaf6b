"""Read-only warehouse connections and the guarded way to run a statement on them.

Two layers, because neither is enough alone (both measured on chDB 26.9):
* the engine: every analyst statement runs on a connection whose session is readonly=1
  (a chDB handle of its own, or readonly=1 on every HTTP request to a server). readonly=1
  refuses writes, DDL, SET/SETTINGS and table functions (file, url, s3, remote, mysql,
  executable, ...), and cannot be lowered from inside. readonly=2 would still let
  file() and url() run, and a per-call readonly setting on a shared chDB handle sticks
  (clickhouse-connect cannot restore it), hence the dedicated connection.
* the statement: readonly=1 does not stop `INTO OUTFILE` (chDB writes the file) nor the
  scalar file() function, so `infra.sql_guard` checks ClickHouse's own canonical text of
  the statement (formatQuery) and that canonical text is what runs.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import Any

import clickhouse_connect
import pyarrow as pa

from infra.sql_guard import READ_KEYWORDS, QueryRefused, check_statement, first_keyword, tokenize

READONLY_SETTINGS = {"readonly": 1}
MAX_SQL_BYTES = 256 * 1024  # ClickHouse's default max_query_size

CANONICAL_CACHE = 1024  # statements; small ones, so well under a few MB

_table_functions: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()
_canonical: OrderedDict[tuple[str, str], str] = OrderedDict()
_canonical_lock = threading.Lock()


class SqlSyntaxError(ValueError):
    """ClickHouse could not parse the text as exactly one statement."""


def open_reader(dsn: str, **kwargs: Any) -> Any:
    """A clickhouse-connect client whose every statement runs with readonly=1 (verified)."""
    client = clickhouse_connect.get_client(dsn=dsn, settings=dict(READONLY_SETTINGS), **kwargs)
    try:
        assert_read_only(client)
    except BaseException:
        client.close()
        raise
    return client


def assert_read_only(client: Any) -> None:
    value = client.query("SELECT toString(getSetting('readonly'))").result_rows[0][0]
    if str(value) != "1":
        raise RuntimeError(f"the analyst connection runs with readonly={value}, not 1; refusing to use it")


def table_functions(client: Any) -> frozenset[str]:
    """The engine's table function names (cached per client: one query per connection)."""
    try:
        return _table_functions[client]
    except (KeyError, TypeError):
        pass
    names = frozenset(r[0] for r in client.query("SELECT name FROM system.table_functions").result_rows)
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        _table_functions[client] = names
    return names


def canonical_statement(client: Any, sql: str) -> str:
    """ClickHouse's own formatting of `sql` (comments gone, heredocs and quoted names
    normalised); SqlSyntaxError unless it is exactly one statement.

    Cached by text (the form depends only on the parser): reports and dashboards repeat
    their statements, and the round trip is most of the guard's cost on a small query.
    """
    size = len(sql.encode())
    if size > MAX_SQL_BYTES:
        raise QueryRefused(f"statement of {size} bytes is over the {MAX_SQL_BYTES}-byte limit")
    key = (type(client).__name__, sql)
    with _canonical_lock:
        cached = _canonical.get(key)
        if cached is not None:
            _canonical.move_to_end(key)
            return cached
    try:
        rows = client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).result_rows
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SqlSyntaxError(f"ClickHouse cannot parse it as one statement: {message}") from None
    canonical = str(rows[0][0])
    with _canonical_lock:
        _canonical[key] = canonical
        while len(_canonical) > CANONICAL_CACHE:
            _canonical.popitem(last=False)
    return canonical


def run_guarded(
    reader: Any, sql: str, params: dict[str, Any] | None, allow_write: bool, writer: Any | None
) -> pa.Table:
    """Run one statement: reads (canonical text) on the read-only `reader`, writes (only
    with `allow_write`) on `writer`. QueryRefused says what was refused and why."""
    canonical = canonical_statement(reader, sql)
    is_read = first_keyword(tokenize(canonical)) in READ_KEYWORDS
    check_statement(canonical, write=allow_write and not is_read,
                    engine_table_functions=table_functions(reader))
    if is_read:
        return reader.query_arrow(canonical, parameters=params or None)
    if writer is None:
        raise QueryRefused("this connection cannot write")
    # The original text: the canonical form of INSERT ... VALUES drops the data.
    writer.command(sql, parameters=params or None)
    return pa.table({})
