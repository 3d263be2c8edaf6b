"""Process logging: plain text or JSON lines, never terminal control codes in files.

    from pipelines.logsetup import configure
    configure("sink", level="INFO")          # JSON when MALLWATT_LOG_FORMAT=json
    log.warning("dead letter", extra={"topic": t, "partition": p, "offset": o})

`mallwatt COMMAND --log-json ...` sets MALLWATT_LOG_FORMAT=json for the command
(pipelines/cli.py). A JSON line holds `ts` (UTC, ms), `level`, `component`, `logger`,
`msg` and every `extra=` field (partition, offset, topic, alert_id, collector_id, ...), so a
log shipper can index them; an exception goes into `exc` on the same line.

Control codes (ANSI escapes, backspaces, carriage returns) are removed from every message
unless the stream is a terminal: faust's start-up spinner and coloured loggers otherwise
leave `ESC[?25l` and friends in log files. `quiet_spinner(worker)` switches the spinner off.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from typing import IO, Any

ENV_FORMAT = "MALLWATT_LOG_FORMAT"
# CSI / OSC escape sequences, other ESC pairs, and C0 controls except tab and newline
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]"
                      r"|[\x00-\x08\x0b-\x1f\x7f]")
# LogRecord's own attributes: everything else on a record came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                      "component"}


def strip_control(text: str) -> str:
    return _CONTROL.sub("", text)


def json_enabled(explicit: bool | None = None) -> bool:
    if explicit is not None:
        return explicit
    return os.environ.get(ENV_FORMAT, "").strip().lower() == "json"


class _ComponentFilter(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = getattr(record, "component", None) or self.component
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; non-JSON values are written with str()."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "component": getattr(record, "component", None),
            "logger": record.name,
            "msg": strip_control(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = strip_control(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value...`; control codes removed unless on a tty."""

    def __init__(self, tty: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tty = tty

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items()
                          if k not in _STANDARD and not k.startswith("_"))
        if extras:
            text = f"{text} [{extras}]"
        return text if self.tty else strip_control(text)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure(component: str, *, level: str | int = "INFO", json_format: bool | None = None,
              stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one handler on `stream` (stderr)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ComponentFilter(component))
    handler.setFormatter(JsonFormatter() if json_enabled(json_format)
                         else TextFormatter(_isatty(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def kafka_logger(component: str) -> dict[str, Any]:
    """confluent-kafka config that routes librdkafka's own log lines (`%4|...|` on stderr)
    through Python logging, so they are JSON too; empty in text mode."""
    if not json_enabled():
        return {}
    return {"logger": logging.getLogger(f"mallwatt.{component}.librdkafka")}


def quiet_spinner(worker: Any, stream: IO[str] | None = None) -> None:
    """faust.Worker draws a spinner (cursor hide/show codes) even into files; drop it
    unless its stream is a terminal."""
    out = stream or getattr(worker, "stdout", None) or sys.stdout
    if not _isatty(out):
        worker.spinner = None


__all__ = ["JsonFormatter", "TextFormatter", "configure", "json_enabled", "kafka_logger",
           "quiet_spinner", "strip_control"]
