"""The SMS adapter's send journal: the last state of each message key, optionally on disk.

An SMS API has no idempotency of its own (a request retried after a lost answer is a second
message), so the adapter decides what to resend from this journal:

    deferred  held for quiet hours; the record carries the rendered request and ``due_ms``
    sending   written and fsynced before each request: found on start, the outcome is unknown
    refused   the API answered with a refusal that retrying can fix (throttled, 5xx)
    sent      the API accepted it; a repeat of the key is a duplicate and sends nothing
    unknown   the request may have reached the API (timeout after sending); never resent
    failed    a permanent refusal, or retries exhausted; a later send of the key tries again

Append-only JSON lines, last record per key wins on replay; bounded to ``capacity`` keys
(oldest forgotten) and rewritten when it grows past twice that. The file holds phone
numbers: it is created with mode 0600.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

STATES = frozenset({"deferred", "sending", "refused", "sent", "unknown", "failed"})


class SendJournal:
    def __init__(self, path: str | Path | None = None, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.path = Path(path) if path else None
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lines = 0
        self._file: Any = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._remember(record["key"], record)
                except (ValueError, KeyError, TypeError):  # only a torn last line (a crash) is expected
                    if number != len(lines):
                        raise ValueError(f"{self.path}:{number}: not a journal record") from None
                self._lines += 1
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            if lines and not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # close a torn line so the next record starts clean

    def _remember(self, key: str, record: dict[str, Any]) -> None:
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def state(self, key: str) -> str | None:
        record = self._records.get(key)
        return None if record is None else record["state"]

    def put(self, key: str, state: str, *, sync: bool = False, **fields: Any) -> dict[str, Any]:
        """Record ``state`` for ``key``; ``sync`` fsyncs before returning (before a send)."""
        if state not in STATES:
            raise ValueError(f"unknown journal state {state!r}")
        record = {"key": key, "state": state, **fields}
        self._remember(key, record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            self._lines += 1
            if sync:
                self._file.flush()
                os.fsync(self._file.fileno())
            if self._lines > 2 * self.capacity:
                self._compact()
        return record

    def deferred(self) -> list[dict[str, Any]]:
        return [r for r in self._records.values() if r["state"] == "deferred"]

    def _compact(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in self._records.values())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._records)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
