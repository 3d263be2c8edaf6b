"""Loopback query endpoint of the process that owns an embedded chDB folder.

chDB lets one process open a data folder. The owner (the sink, or `python -m
infra.warehouse serve`) runs this endpoint and advertises it in `<folder>/owner.json`, so
`mallwatt sql` and reports keep working while the pipeline writes. Results travel as an
Arrow IPC stream, which keeps ClickHouse types (DateTime64 with zone, arrays, maps,
nullables) intact on the other side.

Only 127.0.0.1 is bound, and every request must carry the random token from owner.json
(written 0600), so other local users cannot reach the data through it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa

from infra.sql_guard import QueryRefused
from infra.warehouse_readonly import SqlSyntaxError, run_guarded

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
TOKEN_HEADER = "X-Mallwatt-Token"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
MAX_BODY = 1 << 20


class WarehouseError(RuntimeError):
    """A warehouse query failed or the warehouse could not be reached."""


class ReadOnlyError(WarehouseError):
    """The read-only guard refused the statement (a write without the write flag, INTO
    OUTFILE, a function reaching outside the warehouse, a SETTINGS clause)."""


@dataclass(frozen=True)
class OwnerInfo:
    pid: int
    port: int
    token: str
    path: str
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def read_owner(folder: Path) -> OwnerInfo | None:
    try:
        raw = json.loads((folder / OWNER_FILE).read_text())
        return OwnerInfo(**{k: raw[k] for k in OwnerInfo.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_owner(folder: Path, info: OwnerInfo) -> None:
    tmp = folder / f".{OWNER_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(info), fh)
    os.replace(tmp, folder / OWNER_FILE)  # readers never see half a file


def remove_owner(folder: Path, pid: int) -> None:
    info = read_owner(folder)
    if info is not None and info.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            (folder / OWNER_FILE).unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- executing ------------------------------------------------------------------------


def execute_arrow(
    reader: Any, sql: str, params: dict[str, Any] | None, allow_write: bool, writer: Any | None = None
) -> pa.Table:
    """Run one statement; reads return their rows, writes an empty table.

    Reads run on `reader`, a readonly=1 connection (`warehouse_readonly.open_reader`);
    writes need `allow_write` and run on `writer`. Refusals raise ReadOnlyError.
    """
    try:
        return run_guarded(reader, sql, params, allow_write, writer)
    except QueryRefused as exc:
        raise ReadOnlyError(f"refused: {exc}") from None
    except SqlSyntaxError as exc:
        raise WarehouseError(str(exc)) from None


def _jsonable(value: Any) -> Any:
    # ClickHouse parses these spellings for {name:DateTime64}/{name:Date} parameters.
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# --- server ---------------------------------------------------------------------------


class QueryEndpoint:
    """A threaded HTTP server on 127.0.0.1 answering /ping and /query for one client."""

    def __init__(self, client: Any, token: str | None = None, port: int = 0, *, reader: Any) -> None:
        self.client = client  # writes (with the write flag)
        self.reader = reader  # everything else: a readonly=1 connection
        self.token = token or secrets.token_hex(16)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> QueryEndpoint:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="warehouse-endpoint", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("endpoint: " + format, *args)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, kind: str = "error") -> None:
                body = json.dumps({"error": message, "kind": kind}).encode()
                self._reply(status, body, "application/json")

            def _authorized(self) -> bool:
                sent = self.headers.get(TOKEN_HEADER, "")
                if secrets.compare_digest(sent, endpoint.token):
                    return True
                self._error(403, "bad or missing token")
                return False

            def do_GET(self) -> None:
                if self.path != "/ping":
                    self._error(404, "not found")
                elif self._authorized():
                    self._reply(200, json.dumps({"pid": os.getpid()}).encode(), "application/json")

            def do_POST(self) -> None:
                if self.path != "/query":
                    self._error(404, "not found")
                    return
                if not self._authorized():
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY:
                    self._error(400, "body missing or too large")
                    return
                try:
                    request = json.loads(self.rfile.read(length))
                    sql, params = request["sql"], request.get("params") or None
                    allow_write = bool(request.get("write", False))
                except (ValueError, KeyError, TypeError) as exc:
                    self._error(400, f"bad request: {exc}")
                    return
                try:
                    table = execute_arrow(endpoint.reader, sql, params, allow_write, endpoint.client)
                except ReadOnlyError as exc:
                    self._error(403, str(exc), "read_only")
                    return
                except Exception as exc:  # the caller gets ClickHouse's message
                    self._error(400, str(exc))
                    return
                self._reply(200, table_to_ipc(table), ARROW_STREAM)

        return Handler


# --- client ---------------------------------------------------------------------------


def _request(owner: OwnerInfo, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(
        owner.url + path,
        data=body,
        method="POST" if body is not None else "GET",
        headers={TOKEN_HEADER: owner.token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ping(owner: OwnerInfo, timeout: float = 1.0) -> bool:
    try:
        status, body = _request(owner, "/ping", None, timeout)
        return status == 200 and json.loads(body).get("pid") == owner.pid
    except (OSError, ValueError):
        return False


def live_owner(folder: Path, timeout: float = 1.0) -> OwnerInfo | None:
    """The folder's owner if its process is alive and its endpoint answers."""
    info = read_owner(folder)
    if info is None or not pid_alive(info.pid):
        return None
    return info if ping(info, timeout) else None


def remote_query(
    owner: OwnerInfo,
    sql: str,
    params: dict[str, Any] | None = None,
    allow_write: bool = False,
    timeout: float = 300.0,
) -> pa.Table:
    body = json.dumps(
        {"sql": sql, "params": _jsonable(params or {}), "write": allow_write}
    ).encode()
    try:
        status, payload = _request(owner, "/query", body, timeout)
    except OSError as exc:
        raise WarehouseError(f"query endpoint of pid {owner.pid} failed: {exc}") from exc
    if status == 200:
        return pa.ipc.open_stream(payload).read_all()
    try:
        error = json.loads(payload)
    except ValueError:
        error = {"error": payload[:500].decode(errors="replace")}
    cls = ReadOnlyError if error.get("kind") == "read_only" else WarehouseError
    raise cls(error.get("error", f"HTTP {status}"))


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
