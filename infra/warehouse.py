"""The ClickHouse warehouse: one client library, embedded chDB or a server.

Embedded (default): chDB on the ignored folder `var/chdb/` (or MALLWATT_CHDB_PATH).
chDB lets ONE process open a folder, so access is arbitrated by a lock file:

* the owner (the sink, `python -m infra.warehouse serve`) takes `<folder>/owner.lock`
  for its lifetime and serves a loopback query endpoint advertised in owner.json;
* `query()` and friends use that endpoint when a live owner answers, else take the lock
  themselves for the duration of one statement ("direct open"), so two direct openers
  never collide and a folder held by a process that does not answer gives a clear error.

Server: set MALLWATT_CLICKHOUSE=http(s)://user:pass@host:8123/db and every call goes to
that server; there is no lock and no endpoint. A server that is one node of a ClickHouse
cluster also gets MALLWATT_CLICKHOUSE_CLUSTER=<cluster name>: migrations then run as
rendered by infra.warehouse_cluster (ON CLUSTER, Replicated and Distributed tables).

    python -m infra.warehouse serve | migrate | status | queries | sql "SELECT 1"
    python -m infra.warehouse render-cluster --cluster mallwatt   # the cluster DDL, printed
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clickhouse_connect
import polars as pl
import pyarrow as pa
from clickhouse_connect.driver.exceptions import DatabaseError

from infra.home import data_dir
from infra.redact import install_log_redaction, redact
from infra.sql_guard import caller_role, require_write_role
from infra.warehouse_endpoint import (
    OwnerInfo,
    QueryEndpoint,
    ReadOnlyError,
    WarehouseError,
    execute_arrow,
    live_owner,
    remote_query,
    remove_owner,
    write_owner,
)
from infra.warehouse_readonly import open_reader
from infra.warehouse_sql import (
    DATABASE,
    apply_migrations,
    list_named_queries,
    named_query_text,
)

__all__ = [
    "DATABASE",
    "ReadOnlyError",
    "WarehouseError",
    "WarehouseLocked",
    "WarehouseOwner",
    "apply_migrations",
    "chdb_path",
    "cluster_name",
    "get_client",
    "get_reader",
    "load_dimensions_here",
    "open_owner",
    "query",
    "query_arrow",
    "query_df",
    "release_folder",
    "run_named_query",
    "server_url",
    "set_raw_retention",
]

log = logging.getLogger(__name__)

DEFAULT_CHDB_PATH = data_dir("chdb")
LOCK_FILE = "owner.lock"


class WarehouseLocked(WarehouseError):
    """The chDB folder is held by another process that does not serve queries."""


def server_url() -> str | None:
    return os.environ.get("MALLWATT_CLICKHOUSE") or None


def cluster_name() -> str | None:
    """The ClickHouse cluster the server belongs to (MALLWATT_CLICKHOUSE_CLUSTER), if any.

    Only meaningful with MALLWATT_CLICKHOUSE: the embedded engine is never a cluster.
    """
    name = os.environ.get("MALLWATT_CLICKHOUSE_CLUSTER") or None
    if name and not server_url():
        log.warning("MALLWATT_CLICKHOUSE_CLUSTER is ignored without MALLWATT_CLICKHOUSE")
        return None
    return name


def chdb_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The embedded data folder: `path`, else MALLWATT_CHDB_PATH, else var/chdb/."""
    raw = path or os.environ.get("MALLWATT_CHDB_PATH") or DEFAULT_CHDB_PATH
    return Path(raw).expanduser().resolve()


# --- the folder lock ------------------------------------------------------------------


@dataclass
class _Held:
    """A folder this process holds: the lock fd and the clients opened on it."""

    fd: int
    clients: list[Any] = field(default_factory=list)  # [0] is the first writer
    reader: Any | None = None  # the readonly=1 connection for reads (warehouse_readonly)


_held: dict[Path, _Held] = {}
_held_guard = threading.RLock()


def _try_lock(folder: Path) -> int | None:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)  # for the error message of others
    return fd


def _lock_holder(folder: Path) -> str:
    try:
        return (folder / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        return "?"


def _acquire(folder: Path, wait: float) -> _Held:
    """Hold `folder` for this process (re-entrant), waiting up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        with _held_guard:
            if folder in _held:
                return _held[folder]
            fd = _try_lock(folder)
            if fd is not None:
                _held[folder] = _Held(fd)
                return _held[folder]
        if time.monotonic() >= deadline:
            raise WarehouseLocked(
                f"chDB folder {folder} is held by pid {_lock_holder(folder)}, which does not "
                "answer a query endpoint; wait for it, stop it, or use its endpoint"
            )
        time.sleep(0.1)


def release_folder(path: str | os.PathLike[str] | None = None) -> None:
    """Close every client this process opened on the folder and drop its lock."""
    folder = chdb_path(path)
    with _held_guard:
        held = _held.pop(folder, None)
    if held is None:
        return
    for client in [*held.clients, *([held.reader] if held.reader is not None else [])]:
        with contextlib.suppress(Exception):
            client.close()
    os.close(held.fd)  # closing the fd releases the flock


def _open_chdb(folder: Path) -> Any:
    return clickhouse_connect.get_client(dsn=f"chdb://{folder}")


def _open_chdb_reader(folder: Path) -> Any:
    """A second handle on the same engine whose session is readonly=1 for good."""
    return open_reader(f"chdb://{folder}")


def _reader_of(held: _Held, folder: Path) -> Any:
    with _held_guard:
        if held.reader is None:
            held.reader = _open_chdb_reader(folder)
        return held.reader


def get_client(path: str | os.PathLike[str] | None = None, *, wait: float = 0.0) -> Any:
    """A clickhouse-connect client: the server of MALLWATT_CLICKHOUSE, else embedded chDB.

    Embedded, the calling process becomes the folder's holder until `release_folder()`
    (or exit); raises WarehouseLocked if another process holds it after `wait` seconds.
    Passing `path` forces embedded mode even when MALLWATT_CLICKHOUSE is set.
    """
    url = server_url()
    if url and path is None:
        return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
    folder = chdb_path(path)
    held = _acquire(folder, wait)
    client = _open_chdb(folder)
    held.clients.append(client)
    return client


def get_reader(path: str | os.PathLike[str] | None = None, *, wait: float = 0.0) -> Any:
    """A read-only (readonly=1, verified) client: the server of MALLWATT_CLICKHOUSE, else
    the embedded folder, held by this process as for `get_client` (one shared reader)."""
    url = server_url()
    if url and path is None:
        return open_reader(url, autogenerate_session_id=False)
    folder = chdb_path(path)
    return _reader_of(_acquire(folder, wait), folder)


# --- the owner ------------------------------------------------------------------------


class WarehouseOwner:
    """Holds the chDB folder (or a server client) and serves the loopback endpoint."""

    def __init__(
        self, path: str | os.PathLike[str] | None, serve: bool, wait: float, migrate: bool
    ):
        self.embedded = path is not None or server_url() is None
        self.folder = chdb_path(path) if self.embedded else None
        self.client = get_client(self.folder, wait=wait) if self.embedded else get_client()
        self.endpoint: QueryEndpoint | None = None
        try:
            if migrate:
                applied = apply_migrations(
                    self.client, cluster=None if self.embedded else cluster_name())
                if applied:
                    log.info("warehouse migrations applied: %s", ", ".join(applied))
            if serve and self.folder is not None:
                # Its own client: a long report must not queue behind the sink's inserts.
                self.endpoint = QueryEndpoint(
                    get_client(self.folder), reader=get_reader(self.folder)).start()
                write_owner(
                    self.folder,
                    OwnerInfo(
                        os.getpid(),
                        self.endpoint.port,
                        self.endpoint.token,
                        str(self.folder),
                        time.time(),
                    ),
                )
                log.info(
                    "warehouse %s: query endpoint on 127.0.0.1:%d", self.folder, self.endpoint.port
                )
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int | None:
        return self.endpoint.port if self.endpoint else None

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
        if self.folder is not None:
            remove_owner(self.folder, os.getpid())
            release_folder(self.folder)
        else:
            with contextlib.suppress(Exception):
                self.client.close()

    def __enter__(self) -> WarehouseOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_owner(
    path: str | os.PathLike[str] | None = None,
    *,
    serve: bool = True,
    wait: float = 30.0,
    migrate: bool = True,
) -> WarehouseOwner:
    """Become the warehouse owner: lock the folder, migrate, serve the endpoint.

    Waits up to `wait` seconds for a short-lived direct opener (`mallwatt sql`) to finish.
    """
    return WarehouseOwner(path, serve=serve, wait=wait, migrate=migrate)


# --- queries from anywhere ------------------------------------------------------------


def query_arrow(
    sql: str,
    params: dict[str, Any] | None = None,
    *,
    allow_write: bool = False,
    path: str | os.PathLike[str] | None = None,
    wait: float = 10.0,
) -> pa.Table:
    """Run one statement wherever the warehouse is; see the module doc for the routing.

    Reads run on a readonly=1 connection after the guard of `infra.sql_guard`; statements
    other than SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS raise ReadOnlyError unless
    `allow_write`. Parameters bind server-side: `{name:Type}` in the SQL.
    """
    if path is None and server_url():
        reader = get_reader()
        writer = None
        try:
            writer = get_client() if allow_write else None
            return execute_arrow(reader, sql, params, allow_write, writer)
        finally:
            reader.close()
            if writer is not None:
                writer.close()
    folder = chdb_path(path)
    deadline = time.monotonic() + wait
    while True:
        with _held_guard:
            held = _held.get(folder)
        if held is not None and (held.clients or held.reader is not None):
            writer = held.clients[0] if held.clients else None
            return execute_arrow(_reader_of(held, folder), sql, params, allow_write, writer)
        owner = live_owner(folder)
        if owner is not None:
            return remote_query(owner, sql, params, allow_write)
        # A private lock, not registered as held: an owner starting meanwhile in another
        # thread of this process must wait for it rather than share (and lose) the client.
        fd = _try_lock(folder)
        if fd is None:
            if time.monotonic() >= deadline:
                raise WarehouseLocked(
                    f"chDB folder {folder} is held by pid {_lock_holder(folder)}, which does "
                    "not answer a query endpoint; wait for it, stop it, or use its endpoint"
                )
            time.sleep(0.2)
            continue
        try:
            reader = _open_chdb_reader(folder)
            writer = None
            try:
                writer = _open_chdb(folder) if allow_write else None
                return execute_arrow(reader, sql, params, allow_write, writer)
            finally:
                reader.close()
                if writer is not None:
                    writer.close()
        finally:
            os.close(fd)


def query(
    sql: str, params: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, rows as tuples); keyword arguments as for `query_arrow`."""
    table = query_arrow(sql, params, **kwargs)
    columns = [col.to_pylist() for col in table.columns]
    return list(table.column_names), list(zip(*columns, strict=True))


def query_df(sql: str, params: dict[str, Any] | None = None, **kwargs: Any) -> pl.DataFrame:
    frame = pl.from_arrow(query_arrow(sql, params, **kwargs))
    assert isinstance(frame, pl.DataFrame)
    return frame


def run_named_query(name: str, params: dict[str, Any] | None = None, **kwargs: Any) -> pl.DataFrame:
    """Run `sql/queries/<name>.sql` with `{name:Type}` parameters bound server-side."""
    return query_df(named_query_text(name), params, **kwargs)


def load_dimensions_here(portfolio: Any, path: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Load the portfolio's dimension tables wherever the warehouse is (see warehouse_dims).

    Through the server, this process's client, the live owner's endpoint, or a direct open
    (which also applies missing migrations first).
    """
    from infra.warehouse_dims import load_dimensions

    if path is None and server_url():
        client = get_client()
        try:
            return load_dimensions(client, portfolio)
        finally:
            client.close()
    folder = chdb_path(path)
    with _held_guard:
        held = _held.get(folder)
    if held is not None and held.clients:
        return load_dimensions(held.clients[0], portfolio)
    if live_owner(folder) is not None:
        return load_dimensions(
            lambda sql, params, allow_write=False: query_arrow(
                sql, params, allow_write=allow_write, path=folder
            ),
            portfolio,
        )
    with open_owner(folder, serve=False) as owner:
        return load_dimensions(owner.client, portfolio)


def set_raw_retention(client: Any, days: int, cluster: str | None = None) -> None:
    """Keep raw readings `days` days (whole monthly parts are dropped after that)."""
    if days <= 0:
        raise ValueError("days must be positive")
    statement = (
        f"ALTER TABLE {DATABASE}.readings MODIFY TTL toDateTime(ts) + INTERVAL {int(days)} DAY DELETE"
    )
    if cluster is not None:  # readings_local on every node
        from infra.warehouse_cluster import all_tables, render_statement

        for rendered in render_statement(statement, cluster=cluster, tables=all_tables()):
            client.command(rendered)
        return
    client.command(statement)


# --- command line ---------------------------------------------------------------------


def _print_table(table: pa.Table, out: Any = sys.stdout) -> None:
    with pl.Config(tbl_rows=200, tbl_cols=40, fmt_str_lengths=60):
        print(pl.from_arrow(table) if table.num_columns else "ok", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.warehouse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--path", help="chDB folder (default MALLWATT_CHDB_PATH or var/chdb)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="own the chDB folder, migrate and serve queries until Ctrl-C")
    sub.add_parser("migrate", help="apply missing migrations")
    sub.add_parser("status", help="who owns the folder")
    sub.add_parser("queries", help="list named queries")
    render = sub.add_parser(
        "render-cluster", help="print the migrations as rendered for a ClickHouse cluster")
    render.add_argument("--cluster", default=os.environ.get("MALLWATT_CLICKHOUSE_CLUSTER"),
                        help="cluster name of the servers' remote_servers (default "
                        "MALLWATT_CLICKHOUSE_CLUSTER)")
    render.add_argument("--shard-key", action="append", default=[], metavar="TABLE=EXPR",
                        help="sharding expression of one table's Distributed table")
    dims = sub.add_parser("dims", help="load the dimension tables from a portfolio config")
    dims.add_argument("--config", required=True, help="portfolio YAML (pipelines.portfolio)")
    sql = sub.add_parser("sql", help="run one statement and print the result")
    sql.add_argument("statement")
    sql.add_argument("--write", action="store_true",
                     help="allow a non-SELECT statement (needs MALLWATT_ROLE=admin)")
    sql.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    named = sub.add_parser("run", help="run a named query from sql/queries/")
    named.add_argument("name")
    named.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()
    params = dict(p.split("=", 1) for p in getattr(args, "param", []))
    try:
        if args.cmd == "serve":
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            with open_owner(args.path) as owner:
                print(
                    f"serving {owner.folder} on 127.0.0.1:{owner.port} (Ctrl-C stops)", flush=True
                )
                stop.wait()
        elif args.cmd == "migrate":
            if args.path is None and server_url():
                client = get_client()
                print("applied:", apply_migrations(client, cluster=cluster_name()) or "nothing")
            else:
                with open_owner(args.path, serve=False, migrate=False) as owner:
                    print("applied:", apply_migrations(owner.client) or "nothing")
        elif args.cmd == "status":
            folder = chdb_path(args.path)
            owner = live_owner(folder)
            print(
                f"server {redact(server_url())}"
                if server_url()
                else f"{folder}: "
                + (
                    f"owned by pid {owner.pid} on port {owner.port}"
                    if owner
                    else f"no live owner (lock file pid {_lock_holder(folder)})"
                )
            )
        elif args.cmd == "dims":
            from pipelines.portfolio import load_portfolio

            written = load_dimensions_here(load_portfolio(args.config), args.path)
            print(", ".join(f"{table} {rows}" for table, rows in written.items()))
        elif args.cmd == "render-cluster":
            from infra.warehouse_cluster import render_all

            if not args.cluster:
                raise ValueError("render-cluster needs --cluster (or MALLWATT_CLICKHOUSE_CLUSTER)")
            keys = dict(k.split("=", 1) for k in args.shard_key)
            sys.stdout.write(render_all(args.cluster, sharding_keys=keys or None))
        elif args.cmd == "queries":
            print("\n".join(list_named_queries()))
        elif args.cmd == "sql":
            if args.write:
                require_write_role(caller_role())
            _print_table(
                query_arrow(args.statement, params or None, allow_write=args.write, path=args.path)
            )
        elif args.cmd == "run":
            _print_table(query_arrow(named_query_text(args.name), params or None, path=args.path))
    except (WarehouseError, DatabaseError, KeyError, ValueError) as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
