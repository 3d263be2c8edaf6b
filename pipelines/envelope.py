"""The unit of state the stream worker stores: one account, under its own key.

Why one key per account: a step writes the accounts it touched and nothing else, so the
changelog bytes, the encoding time and the largest value follow the change, not the size of
the portfolio (a bucket of hundreds of accounts was rewritten whole for one reading and
outgrew the producer's 1 MB request at 35,000 merchants).

Why the outbox lives inside the state: the changelog record that makes a state change
durable also carries the outputs (ledger entries, alerts, relay commands) that the change
caused. The forwarder publishes outputs from the changelog, so an output can never be lost
when its state change survived, and never be produced for a state change that did not.
The high-water marks make re-delivered input a no-op for the account (effects once).

The value is binary: MAGIC, the outbox (length-prefixed, so the forwarder never parses the
state; the claims table frames its values the same way), then the state as msgpack arrays in a fixed field order (no field names: an account
with one circuit is about 200 bytes).
"""

from __future__ import annotations

import operator
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pipelines.core.interval import CircuitState
from pipelines.core.wallet import AccountState

MAGIC = b"MW\x03"

#: Largest changelog value (state + outbox) a step may write. Kafka's default request limit is
#: 1 MB; a step splits its input per account so that a value stays far below this (see
#: pipelines.batching.ROWS_PER_ACCOUNT), and a value above it is refused with a clear error.
MAX_VALUE_BYTES = int(os.environ.get("MALLWATT_MAX_VALUE_BYTES", 256 * 1024))


class ValueTooLarge(ValueError):
    """A state value would exceed MAX_VALUE_BYTES (the step is split or the input refused)."""


def state_key(account_id: str) -> str:
    """The table key of an account's state (its partition is the account's shard)."""
    return account_id


@dataclass
class OutboxItem:
    topic: str
    key: bytes
    value: bytes
    partition: int = -1  # -1: the producer's partitioner picks it from the key


def frame_value(outbox: list[OutboxItem], state: bytes) -> bytes:
    """MAGIC, outbox length, the binary outbox, then the state bytes (any table's)."""
    parts = [MAGIC, b""]
    size = 0
    topics = _TOPICS
    for o in outbox:  # runs for every account a step writes: topic names encoded once per process
        topic = topics.get(o.topic)
        if topic is None:
            topic = topics[o.topic] = o.topic.encode()
        key, value = o.key, o.value
        parts.append(_ITEM.pack(len(topic), len(key), len(value), o.partition))
        parts.append(topic)
        parts.append(key)
        parts.append(value)
        size += _ITEM.size + len(topic) + len(key) + len(value)
    parts[1] = _LENGTH.pack(size)
    parts.append(state)
    return b"".join(parts)


_ITEM = struct.Struct(">HIIi")
_LENGTH = struct.Struct(">I")
_TOPICS: dict[str, bytes] = {}


def unframe_value(raw: bytes) -> tuple[list[OutboxItem], bytes]:
    """The outbox and the state bytes of a framed value."""
    if not raw.startswith(MAGIC):
        raise ValueError("not a mallwatt state value of this version (unknown format)")
    outbox, end = _read_outbox(raw)
    return outbox, raw[end:]


_PACKERS = threading.local()


def pack_state(value: Any) -> bytes:
    """msgpack bytes of `value`, as `msgpack.packb(value, use_bin_type=True)`, from one Packer
    per thread: packb makes a Packer, and so allocates its 256 kB buffer, per call; this runs
    for every account a step writes."""
    packer = getattr(_PACKERS, "packer", None)
    if packer is None:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(value)  # autoreset: each call returns its own bytes


_ACCOUNT_FIELDS = AccountState.__slots__  # type: ignore[attr-defined]
_CIRCUIT_FIELDS = ("circuit_id", "meter_id", "last_ts_ms", "last_reg_wh", "max_seen_ts_ms", "spike_streak",
                   "billed_wh", "pending")
# C-level getters: this runs for every account a step writes
_account_row = operator.attrgetter(*_ACCOUNT_FIELDS)
_circuit_row = operator.attrgetter(*_CIRCUIT_FIELDS)


def _account_from(row: list[Any]) -> AccountState:
    return AccountState(*row)


def _circuit_from(row: list[Any]) -> CircuitState:
    return CircuitState(*row[:7], pending=[tuple(p) for p in row[7]])  # type: ignore[misc]


@dataclass
class Envelope:
    """One account's stored state: the core's account and circuit state, input high-water
    marks, relay holds of its meters, other rules' state, and the outbox of its last change.

    `accounts`/`circuits` are maps (of one account, and of that account's circuits) so the
    billing step can merge any number of envelopes into one core call.
    """

    # The core's own state objects: the worker keeps envelopes between steps, so a step
    # neither parses nor rebuilds them. Treated as immutable (the core copies what it changes).
    accounts: dict[str, AccountState] = field(default_factory=dict)
    circuits: dict[str, CircuitState] = field(default_factory=dict)
    hwm: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> last applied offset
    outbox: list[OutboxItem] = field(default_factory=list)  # outputs of the LAST update only
    updates: int = 0
    holds: dict[str, list[str]] = field(default_factory=dict)  # meter id -> why its relay is held open
    extra: dict[str, Any] = field(default_factory=dict)  # per-account state of other rules (load control)
    # meter id -> pipelines.core.relay.MeterRelay row: the power loop of meters not at rest
    relays: dict[str, list[Any]] = field(default_factory=dict)

    def applied(self, source: str, offset: int) -> bool:
        return self.hwm.get(source, -1) >= offset

    def without_outbox(self) -> Envelope:
        """This envelope as the worker caches it once its value is written: the outbox (the
        outputs of its last change) is in the written value, and no step reads it again (a
        step's envelope gets a new one). Kept, it held two output messages per cached account:
        at 350,000 accounts about 3 M allocated blocks and 250 MB, and the growth from the
        first readings (baselines, no outputs) to billed ones made the step collector take it
        for garbage (pipelines/gc_policy.py). The same object when it has no outbox."""
        if not self.outbox:
            return self
        return Envelope(self.accounts, self.circuits, self.hwm, [], self.updates, self.holds, self.extra,
                        self.relays)

    def to_bytes(self, limit: int | None = None) -> bytes:
        """MAGIC, outbox length, binary outbox, then the state as msgpack arrays.

        Raises ValueTooLarge above `limit` (default MAX_VALUE_BYTES), naming the account."""
        state = pack_state([  # map, not comprehensions: no frame per call (this runs for every write)
            list(map(_account_row, self.accounts.values())),
            list(map(_circuit_row, self.circuits.values())),
            self.hwm, self.updates, self.holds, self.extra, self.relays])
        raw = frame_value(self.outbox, state)
        cap = MAX_VALUE_BYTES if limit is None else limit
        if len(raw) > cap:
            raise ValueTooLarge(f"state value of {sorted(self.accounts)[:3]} would be {len(raw)} bytes "
                                f"({len(raw) - len(state)} bytes of outbox in {len(self.outbox)} outputs), "
                                f"above the limit of {cap} bytes (MALLWATT_MAX_VALUE_BYTES)")
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes | None, outbox: bool = True) -> Envelope:
        """The stored envelope; without `outbox` the outputs of its last change are skipped
        (the worker never needs them again: a step's envelope gets a new outbox, and the
        forwarder reads outputs with `outbox_of`)."""
        if not raw:
            return cls()
        if outbox:
            items, state = unframe_value(raw)
        else:
            if not raw.startswith(MAGIC):
                raise ValueError("not a mallwatt state value of this version (unknown format)")
            items, state = [], memoryview(raw)[len(MAGIC) + 4 + _LENGTH.unpack_from(raw, len(MAGIC))[0]:]
        fields = msgpack.unpackb(state, raw=False, strict_map_key=False)
        accounts, circuits, hwm, updates, holds, extra = fields[:6]
        relays = fields[6] if len(fields) > 6 else {}  # added at the end: older values still read
        accs = [_account_from(r) for r in accounts]
        circs = [_circuit_from(r) for r in circuits]
        return cls({s.account_id: s for s in accs}, {c.circuit_id: c for c in circs}, hwm, items, updates,
                   holds, extra, relays)


def outbox_of(raw: bytes) -> list[OutboxItem]:
    """Only the outputs of a stored change (what the forwarder needs)."""
    if not raw.startswith(MAGIC):
        raise ValueError("not a mallwatt state value of this version (unknown format)")
    return _read_outbox(raw)[0]


def outbox_tuples(raw: bytes) -> list[tuple[str, bytes, bytes, int]]:
    """`outbox_of` as (topic, key, value, partition) tuples: the forwarder reads one outbox per
    changelog record, and a dataclass per item costs it more than the rows."""
    if not raw.startswith(MAGIC):
        raise ValueError("not a mallwatt state value of this version (unknown format)")
    return _scan_outbox(raw)[0]


def _scan_outbox(raw: bytes) -> tuple[list[tuple[str, bytes, bytes, int]], int]:
    """The outbox items of a framed value as tuples, and where the state bytes begin."""
    (size,) = _LENGTH.unpack_from(raw, len(MAGIC))
    pos = len(MAGIC) + 4
    end = pos + size
    items: list[tuple[str, bytes, bytes, int]] = []
    names = _TOPIC_NAMES
    while pos < end:
        t, k, v, partition = _ITEM.unpack_from(raw, pos)
        pos += 14
        name = raw[pos:pos + t]
        topic = names.get(name)
        if topic is None:
            topic = name.decode()
            if len(names) < 1024:  # a few topics in practice; a corrupt value must not grow it
                names[name] = topic
        pos += t
        key = raw[pos:pos + k]
        pos += k
        items.append((topic, key, raw[pos:pos + v], partition))
        pos += v
    if pos != end:
        raise ValueError("corrupt state value: outbox length mismatch")
    return items, end


_TOPIC_NAMES: dict[bytes, str] = {}


def _read_outbox(raw: bytes) -> tuple[list[OutboxItem], int]:
    items, end = _scan_outbox(raw)
    return [OutboxItem(*item) for item in items], end
