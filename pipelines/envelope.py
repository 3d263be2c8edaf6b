"""The unit of state the stream worker stores: one bucket of accounts.

Why buckets: every table write is one changelog message, so writing one value per account
would cost one Kafka message per account per batch. Accounts of a partition are spread
over a fixed number of buckets; a batch writes each touched bucket once.

Why the outbox lives inside the state: the changelog record that makes a state change
durable also carries the outputs (ledger entries, alerts, relay commands) that the change
caused. The forwarder publishes outputs from the changelog, so an output can never be lost
when its state change survived, and never be produced for a state change that did not.
The high-water marks make re-delivered input a no-op for the bucket (effects once).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipelines.core.interval import CircuitState
from pipelines.core.wallet import AccountState

BUCKETS_PER_PARTITION = 8


def bucket_key(account_id: str, partitions: int) -> str:
    """Stable bucket of an account; the shard is part of the key so a bucket never spans partitions."""
    h = zlib.crc32(account_id.encode("utf-8"))
    shard = h % partitions
    return f"p{shard}.b{(h // partitions) % BUCKETS_PER_PARTITION}"


@dataclass
class OutboxItem:
    topic: str
    key: bytes
    value: bytes


@dataclass
class Envelope:
    """One bucket: the core's per-account and per-circuit state, input high-water marks, outbox."""

    # The core's own state objects: the worker keeps envelopes between steps, so a step
    # neither parses nor rebuilds them. Treated as immutable (the core copies what it changes).
    accounts: dict[str, AccountState] = field(default_factory=dict)
    circuits: dict[str, CircuitState] = field(default_factory=dict)
    hwm: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> last applied offset
    outbox: list[OutboxItem] = field(default_factory=list)  # outputs of the LAST update only
    updates: int = 0
    holds: dict[str, list[str]] = field(default_factory=dict)  # meter id -> why its relay is held open
    extra: dict[str, Any] = field(default_factory=dict)  # per-account state of other rules (load control)

    def applied(self, source: str, offset: int) -> bool:
        return self.hwm.get(source, -1) >= offset

    def to_bytes(self) -> bytes:
        """MAGIC, outbox length, binary outbox, then the state as JSON.

        The outbox comes first and is binary, so the forwarder reads the outputs of a change
        without parsing the bucket's state.
        """
        outbox = b"".join(struct.pack(">HII", len(o.topic), len(o.key), len(o.value))
                          + o.topic.encode() + o.key + o.value for o in self.outbox)
        # orjson writes the state dataclasses as objects with their field names (= to_dict())
        state = orjson.dumps({"accounts": self.accounts, "circuits": self.circuits, "hwm": self.hwm,
                              "updates": self.updates, "holds": self.holds, "extra": self.extra})
        return MAGIC + struct.pack(">I", len(outbox)) + outbox + state

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Envelope:
        if not raw:
            return cls()
        if not raw.startswith(MAGIC):
            raise ValueError("not a mallwatt state envelope (unknown format)")
        outbox, end = _read_outbox(raw)
        data = orjson.loads(raw[end:])
        return cls({k: AccountState.from_dict(v) for k, v in data["accounts"].items()},
                   {k: CircuitState.from_dict(v) for k, v in data["circuits"].items()},
                   data["hwm"], outbox, data.get("updates", 0), data.get("holds", {}), data.get("extra", {}))


MAGIC = b"MW\x02"


def outbox_of(raw: bytes) -> list[OutboxItem]:
    """Only the outputs of a stored change (what the forwarder needs)."""
    if not raw.startswith(MAGIC):
        raise ValueError("not a mallwatt state envelope (unknown format)")
    return _read_outbox(raw)[0]


def _read_outbox(raw: bytes) -> tuple[list[OutboxItem], int]:
    (size,) = struct.unpack_from(">I", raw, len(MAGIC))
    pos = len(MAGIC) + 4
    end = pos + size
    items: list[OutboxItem] = []
    while pos < end:
        t, k, v = struct.unpack_from(">HII", raw, pos)
        pos += 10
        topic = raw[pos:pos + t].decode()
        pos += t
        key = raw[pos:pos + k]
        pos += k
        items.append(OutboxItem(topic, key, raw[pos:pos + v]))
        pos += v
    if pos != end:
        raise ValueError("corrupt state envelope: outbox length mismatch")
    return items, end


def bucket_partition(key: str) -> int:
    """The partition a bucket key belongs to (the inverse of the shard part of bucket_key)."""
    return int(key[1:key.index(".")])
