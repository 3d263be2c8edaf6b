"""The persistent command log: restart memory of executed relay command ids."""

from __future__ import annotations

from pathlib import Path

from collectors.commands import CommandLog
from collectors.relay import CONFIRMED, FAILED, RelayOutcome


def _o(i: int, status: str = CONFIRMED) -> RelayOutcome:
    return RelayOutcome(f"cmd-{i}", f"M{i}", "TRIP", status, "OPEN", 1, 1000 + i, "ok",
                        duplicate=True)


def test_outcomes_survive_a_restart_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "commands.jsonl"
    log = CommandLog(path)
    log.append(_o(1))
    log.append(_o(2, FAILED))
    with open(path, "a") as fh:
        fh.write('{"command_id": "cmd-3", "met')  # crash mid-append
    again = CommandLog(path)
    assert list(again.entries) == ["cmd-1", "cmd-2"]
    assert again.entries["cmd-2"].status == FAILED
    assert again.entries["cmd-1"].duplicate is False  # stored as a first outcome
    again.append(_o(3))
    assert list(CommandLog(path).entries) == ["cmd-1", "cmd-2", "cmd-3"]


def test_log_is_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "commands.jsonl"
    log = CommandLog(path, remember=5)
    for i in range(23):
        log.append(_o(i))
    assert len(path.read_text().splitlines()) <= 10  # compacted at 2x remember
    assert list(CommandLog(path, remember=5).entries) == [f"cmd-{i}" for i in range(18, 23)]
