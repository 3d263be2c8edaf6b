"""Delivered-notification memory: a bounded LRU, optionally persisted as an append-only file.

Keys are "<alert_id>|<provider>|<recipient>": an alert counts as a duplicate when every
target it routes to has already been delivered, so a re-published alert retries only the
targets that failed. The file is replayed on start (last ``capacity`` keys) and rewritten
when it grows past twice the capacity.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path


class Dedup:
    def __init__(self, capacity: int = 100_000, path: str | Path | None = None) -> None:
        self.capacity = capacity
        self.path = Path(path) if path else None
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lines = 0
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    if line:
                        self._remember(line)
                        self._lines += 1
            self._file = self.path.open("a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def __len__(self) -> int:
        return len(self._keys)

    def _remember(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def add(self, key: str) -> None:
        if "\n" in key:
            raise ValueError("dedup keys are single lines")
        self._remember(key)
        if self._file is not None:
            self._file.write(key + "\n")
            self._lines += 1
            if self._lines > 2 * self.capacity:
                self._compact()

    def flush(self) -> None:
        """Make added keys durable (the service calls it before committing offsets)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _compact(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(k + "\n" for k in self._keys), encoding="utf-8")
        os.replace(tmp, self.path)
        self._lines = len(self._keys)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
