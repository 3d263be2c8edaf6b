"""JSON log lines by option, and no terminal control codes in files."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines import cli
from pipelines.logsetup import configure, quiet_spinner, strip_control

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_component_context_and_exceptions() -> None:
    out = io.StringIO()
    configure("sink", json_format=True, stream=out)
    log = logging.getLogger("mallwatt.sink")
    log.warning("dead letter \x1b[31mred\x1b[0m", extra={"topic": "mallwatt.readings",
                                                       "partition": 3, "offset": 17})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("insert failed", extra={"offsets": {0: [1, 5]}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one event per line, the traceback included
    first, second = (json.loads(line) for line in lines)
    assert first["component"] == "sink" and first["level"] == "warning"
    assert (first["topic"], first["partition"], first["offset"]) == ("mallwatt.readings", 3, 17)
    assert first["msg"] == "dead letter red" and first["ts"].endswith("Z")
    assert second["offsets"] == {"0": [1, 5]} and "ValueError: bad" in second["exc"]
    assert "\x1b" not in out.getvalue()


def test_text_logs_to_a_file_have_no_control_codes_but_keep_context() -> None:
    out = io.StringIO()  # not a tty
    configure("collector", json_format=False, stream=out)
    logging.getLogger("x").warning("\x1b[?25lspin\x08\x08 done\x1b[?25h\r", extra={"gateway_id": "GW1"})
    text = out.getvalue()
    assert "spin done" in text and "gateway_id=GW1" in text
    assert not any(ch in text for ch in "\x1b\x08\r")
    assert strip_control("a\x1b]0;title\x07b\tc") == "ab\tc"


def test_environment_selects_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLWATT_LOG_FORMAT", "json")
    out = io.StringIO()
    configure("notify", stream=out)
    logging.getLogger("mallwatt.notify").info("hello", extra={"alert_id": "a1"})
    assert json.loads(out.getvalue())["alert_id"] == "a1"


def test_faust_spinner_is_dropped_off_a_terminal() -> None:
    class Worker:
        spinner: object = object()
        stdout = io.StringIO()

    w = Worker()
    quiet_spinner(w)
    assert w.spinner is None


SEEN: dict[str, Any] = {}


def fake_command(argv: list[str]) -> int:
    SEEN.update(argv=argv, fmt=os.environ.get("MALLWATT_LOG_FORMAT"))
    return 0


def test_cli_log_json_option_reaches_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLWATT_LOG_FORMAT", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fake", (__name__, "fake_command", "test"))
    assert cli.main(["fake", "--x", "1", "--log-json"]) == 0
    assert SEEN == {"argv": ["--x", "1"], "fmt": "json"}


def test_sink_process_writes_only_json_lines(tmp_path: Path) -> None:
    """A real `mallwatt sink --log-json` against an absent broker: its stderr file holds one
    JSON event per line (librdkafka's own lines included) and no control codes."""
    err = tmp_path / "sink.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLWATT_KAFKA": "127.0.0.1:1"}
    with err.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "sink", "--log-json", "--chdb-path",
             str(tmp_path / "chdb"), "--no-serve", "--metrics-port", "-1", "--close-every", "0"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "librdkafka" not in err.read_text():
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = err.read_text()
    assert "\x1b" not in text and "\x08" not in text
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert events and all(e["component"] == "sink" for e in events)
    assert any(e["logger"] == "mallwatt.sink.librdkafka" for e in events)
    assert any(e["msg"].startswith("sink started") for e in events)
