"""The SQL attacks of issue 16 against the real embedded engine (chDB, no Kafka needed).

Each attack goes through the three routes analyst SQL takes: a direct open of the folder,
the folder held by this process (the sink's own process), and `mallwatt sql` in another
process answered by the owner's loopback endpoint. Every attack must fail with a clear
message, and its effect (a file written, a file read, a request made) must not happen.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import warehouse as wh
from infra.sql_guard import OUTSIDE_FUNCTIONS, SAFE_TABLE_FUNCTIONS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"hi\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_target() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server recording every request (url() must never reach it)."""
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _Recorder.hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chdb"
    with wh.open_owner(path, serve=False):
        pass  # the schema, then no owner
    yield path
    wh.release_folder(path)


def attacks(port: int, out: Path) -> list[tuple[str, str]]:
    """(statement, words the refusal must contain)."""
    return [
        (f"SELECT 1 INTO OUTFILE '{out}'", "INTO OUTFILE"),
        (f"select 1 into /* c */ outfile '{out}' -- trailing", "INTO OUTFILE"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT line FROM FiLe('/etc/passwd','LineAsString')", "refused"),
        ("SELECT file('/etc/hostname')", "file()"),  # scalar: readonly=1 alone lets it run
        ('SELECT "file"   /* */ (\'/etc/hostname\')', "file()"),
        ("SELECT `file`\n# x\n('/etc/hostname')", "file()"),
        (f"SELECT * FROM url('http://127.0.0.1:{port}/a', 'LineAsString')", "url()"),
        (f"SELECT $$'$$, * FROM url('http://127.0.0.1:{port}/b', 'LineAsString')", "url()"),
        (f"SELECT * FROM mallwatt.ledger AS l JOIN url('http://127.0.0.1:{port}/c', 'LineAsString') "
         "AS u ON 1 = 1", "url()"),
        (f"SELECT count() FROM system.one WHERE dummy IN (SELECT 0 FROM url('http://127.0.0.1:{port}/d', "
         "'LineAsString'))", "url()"),
        ("SELECT format('{}', (SELECT count() FROM file('/etc/passwd', 'LineAsString')))", "file()"),
        ("SELECT * FROM remote('127.0.0.1:9000', system.one)", "remote()"),
        ("SELECT * FROM executable('id', 'TSV', 'a String')", "executable()"),
        ("SELECT 1 SETTINGS readonly = 0", "SETTINGS"),
        ("SELECT 1; DROP TABLE mallwatt.ledger", "Multi-statements"),
        ("DROP TABLE mallwatt.ledger", "read-only"),
        ("/* SELECT */ INSERT INTO mallwatt.ledger (entry_id) VALUES ('x')", "read-only"),
    ]


def assert_no_effect(out: Path, hits: list[str]) -> None:
    assert not out.exists(), "INTO OUTFILE wrote a file"
    assert hits == [], f"url() reached the test server: {hits}"


def test_engine_table_functions_are_all_reviewed(folder: Path) -> None:
    """Every table function of this engine is either reviewed safe or refused statically."""
    reader = wh.get_reader(folder)
    names = {r[0].lower() for r in reader.query("SELECT name FROM system.table_functions").result_rows}
    assert names - SAFE_TABLE_FUNCTIONS - OUTSIDE_FUNCTIONS == set()


def test_attacks_fail_on_a_direct_open(folder: Path, tmp_path: Path, http_target: tuple[int, list[str]]) -> None:
    port, hits = http_target
    out = tmp_path / "pwn.txt"
    for sql, words in attacks(port, out):
        with pytest.raises((wh.ReadOnlyError, wh.WarehouseError), match=words.replace("(", r"\(").replace(")", r"\)")):
            wh.query(sql, path=folder)
    assert_no_effect(out, hits)
    assert wh.query("SELECT count() FROM mallwatt.ledger", path=folder)[1] == [(0,)]


def test_attacks_fail_where_the_process_holds_the_folder(
    folder: Path, tmp_path: Path, http_target: tuple[int, list[str]]
) -> None:
    port, hits = http_target
    out = tmp_path / "pwn.txt"
    with wh.open_owner(folder, serve=False) as owner:
        for sql, _ in attacks(port, out):
            with pytest.raises((wh.ReadOnlyError, wh.WarehouseError)):
                wh.query(sql, path=folder)
        # The owner's own connection is not made read-only by the analyst's (chDB keeps
        # settings per handle): the sink can still write.
        owner.client.command("INSERT INTO mallwatt.ledger (entry_id) VALUES ('still-writable')")
        assert wh.query("SELECT count() FROM mallwatt.ledger", path=folder)[1] == [(1,)]
        assert wh.query("SELECT toString(getSetting('readonly'))", path=folder)[1] == [("1",)]
    assert_no_effect(out, hits)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_attacks_fail_through_mallwatt_sql_and_the_endpoint(
    folder: Path, tmp_path: Path, http_target: tuple[int, list[str]]
) -> None:
    port, hits = http_target
    out = tmp_path / "pwn.txt"
    chosen = [a for a in attacks(port, out) if a[1] in ("INTO OUTFILE", "file()", "url()", "SETTINGS")][:6]
    with wh.open_owner(folder) as owner:
        assert wh.live_owner(folder) is not None
        code = "\n".join([
            "from infra import warehouse as wh",
            "for sql in %r:" % [s for s, _ in chosen],
            "    try:",
            f"        wh.query(sql, path={str(folder)!r})",
            "        print('RAN', sql)",
            "    except wh.WarehouseError as exc:",
            "        print('REFUSED', type(exc).__name__, exc)",
        ])
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == len(chosen) and all(x.startswith("REFUSED ReadOnlyError refused:") for x in lines), lines
        for (_, words), line in zip(chosen, lines, strict=True):
            assert words in line
        # The CLI: a clear message on stderr, exit 1, nothing printed as a result.
        cli = run_cli("sql", "SELECT * FROM file('/etc/passwd', 'LineAsString')", "--path", str(folder))
        assert cli.returncode == 1 and "file() is refused" in cli.stderr and "root:" not in cli.stdout
        cli = run_cli("sql", "OPTIMIZE TABLE mallwatt.ledger FINAL", "--path", str(folder))
        assert cli.returncode == 1 and "read-only" in cli.stderr
        cli = run_cli("sql", "OPTIMIZE TABLE mallwatt.ledger FINAL", "--write", "--path", str(folder))
        assert cli.returncode == 1 and "admin role" in cli.stderr
        cli = run_cli("sql", "OPTIMIZE TABLE mallwatt.ledger FINAL", "--write", "--path", str(folder),
                      env={"MALLWATT_ROLE": "admin"})
        assert cli.returncode == 0, cli.stderr
        cli = run_cli("sql", "SELECT count() AS n FROM mallwatt.ledger", "--path", str(folder))
        assert cli.returncode == 0 and "│ 0" in cli.stdout, cli.stdout + cli.stderr
        assert owner.port is not None
    assert_no_effect(out, hits)


def test_a_process_holding_only_a_reader_reads_and_cannot_write(folder: Path) -> None:
    reader = wh.get_reader(folder)
    assert reader.query("SELECT toString(getSetting('readonly'))").result_rows == [("1",)]
    assert wh.query("SELECT count() FROM mallwatt.ledger", path=folder)[1] == [(0,)]
    with pytest.raises(wh.ReadOnlyError, match="cannot write"):
        wh.query("OPTIMIZE TABLE mallwatt.ledger FINAL", path=folder, allow_write=True)
