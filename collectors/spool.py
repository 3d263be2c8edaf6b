"""A durable local spool between the collector and Kafka.

Every message is appended here (fsync per flush) BEFORE it is produced, so a broker
outage or a crash loses nothing. Layout of a spool folder (one per collector id):

    00000000000000000000.seg   append-only segments, named by their first position
    state.json                 acked position, per-stream seq counters, Kafka frontiers
    lock                       flock: one process per spool

A record is `<u32 length><u32 crc32>` + payload; positions count records from 0 for
the life of the spool. A torn last record (crash mid-write) is cut off at open: it was
never produced, because only flushed records are handed to the drainer.

The acked position only moves forward, in order, over records whose delivery Kafka
confirmed; segments entirely below it are deleted. Re-sent records are read back from
disk, so they carry the same bytes (same batch_id and seq) as the first attempt.
Sequence counters live in state.json and are re-derived from the unacked records at
open, so a seq is never handed out twice with different contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import struct
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_FIXED = struct.Struct("<BiqI")  # version, partition, seq, value length
_VERSION = 1
STATE_FILE = "state.json"
SEGMENT_SUFFIX = ".seg"


class SpoolError(RuntimeError):
    """The spool folder is corrupt (beyond a torn last record) or already in use."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One message to produce: where it goes and its stable identity."""

    topic: str
    partition: int
    key: bytes
    value: bytes
    ident: str  # globally unique id, sent as the `mallwatt-id` header (batch_id, event id)
    stream: str = ""  # seq counter name, e.g. "readings/3"
    seq: int = -1
    position: int = -1  # filled in by the spool

    def encode(self) -> bytes:
        strings = b"".join(_short(s.encode()) for s in (self.topic, self.stream, self.ident))
        return (_FIXED.pack(_VERSION, self.partition, self.seq, len(self.value)) + strings
                + _short(self.key) + self.value)

    @classmethod
    def decode(cls, payload: bytes, position: int) -> SpoolRecord:
        version, partition, seq, vlen = _FIXED.unpack_from(payload, 0)
        if version != _VERSION:
            raise SpoolError(f"record {position}: unknown version {version}")
        at = _FIXED.size
        topic, at = _read_short(payload, at)
        stream, at = _read_short(payload, at)
        ident, at = _read_short(payload, at)
        key, at = _read_short(payload, at)
        value = payload[at:at + vlen]
        if len(value) != vlen:
            raise SpoolError(f"record {position}: value truncated")
        return cls(topic.decode(), partition, key, value, ident.decode(), stream.decode(), seq,
                   position)


def _short(b: bytes) -> bytes:
    return struct.pack("<H", len(b)) + b


def _read_short(buf: bytes, at: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<H", buf, at)
    return buf[at + 2:at + 2 + n], at + 2 + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


class _Segment:
    def __init__(self, path: Path, first: int) -> None:
        self.path = path
        self.first = first
        self.offsets = array("q")  # file offset of each record
        self.size = 0

    @property
    def end(self) -> int:
        return self.first + len(self.offsets)


class Spool:
    def __init__(self, directory: str | Path, *, segment_bytes: int = 16 << 20,
                 fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock_fh = open(self.dir / "lock", "a")  # noqa: SIM115 - held for the spool's life
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise SpoolError(f"{self.dir} is in use by another collector process") from None
        self._segments: list[_Segment] = []
        self._writer: Any = None
        self._readers: dict[Path, Any] = {}
        self.seqs: dict[str, int] = {}  # stream -> last seq handed out
        self.meta: dict[str, Any] = {}  # saved with the acked position (Kafka frontiers)
        self.torn_bytes = 0  # bytes cut off a torn last record at open
        self._open()

    # --- open / recovery ---------------------------------------------------------------
    def _open(self) -> None:
        state: dict[str, Any] = {}
        path = self.dir / STATE_FILE
        if path.exists():
            state = json.loads(path.read_text())
        self.acked = int(state.get("acked", 0))
        self.seqs = {k: int(v) for k, v in state.get("seqs", {}).items()}
        self.meta = dict(state.get("meta", {}))
        files = sorted(self.dir.glob("*" + SEGMENT_SUFFIX))
        for i, f in enumerate(files):
            seg = _Segment(f, int(f.stem))
            if self._segments and seg.first != self._segments[-1].end:
                raise SpoolError(f"{f}: starts at {seg.first}, previous segment ends at "
                                 f"{self._segments[-1].end}")
            self._scan(seg, last=i == len(files) - 1)
            self._segments.append(seg)
        if self._segments and self._segments[0].first > self.acked:
            raise SpoolError(f"{self.dir}: records {self.acked}..{self._segments[0].first} "
                             "are missing")
        start = self._segments[-1].end if self._segments else self.acked
        self.end = self.durable_end = max(start, self.acked)
        self._drop_acked_segments()

    def _scan(self, seg: _Segment, *, last: bool) -> None:
        data = seg.path.read_bytes()
        at = 0
        while at < len(data):
            ok = at + _HEADER.size <= len(data)
            if ok:
                n, crc = _HEADER.unpack_from(data, at)
                payload = data[at + _HEADER.size:at + _HEADER.size + n]
                ok = len(payload) == n and zlib.crc32(payload) == crc
            if not ok:
                if not last:
                    raise SpoolError(f"{seg.path}: corrupt record at byte {at}")
                self.torn_bytes = len(data) - at
                with open(seg.path, "r+b") as fh:
                    fh.truncate(at)
                    os.fsync(fh.fileno())
                break
            rec = SpoolRecord.decode(payload, seg.end)
            if rec.stream and rec.seq > self.seqs.get(rec.stream, -1):
                self.seqs[rec.stream] = rec.seq
            seg.offsets.append(at)
            at += _HEADER.size + n
        seg.size = at

    # --- writing -------------------------------------------------------------------------
    def next_seq(self, stream: str) -> int:
        """The next sequence number of a stream (0, 1, ...); persisted across restarts."""
        seq = self.seqs.get(stream, -1) + 1
        self.seqs[stream] = seq
        return seq

    def append(self, record: SpoolRecord) -> int:
        """Buffer one record; it becomes readable (and durable) at the next flush()."""
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.size >= self.segment_bytes and seg.end > seg.first):
            seg = self._roll()
        payload = record.encode()
        if self._writer is None:
            self._writer = open(seg.path, "ab")  # noqa: SIM115 - closed on roll/close
        self._writer.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        seg.offsets.append(seg.size)
        seg.size += _HEADER.size + len(payload)
        self.end += 1
        return self.end - 1

    def _roll(self) -> _Segment:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None
        seg = _Segment(self.dir / f"{self.end:020d}{SEGMENT_SUFFIX}", self.end)
        self._segments.append(seg)
        seg.path.touch()
        if self.fsync:
            _fsync_dir(self.dir)
        return seg

    def flush(self) -> None:
        """Make every appended record durable and visible to readers."""
        if self._writer is not None:
            self._writer.flush()
            if self.fsync:
                os.fsync(self._writer.fileno())
        self.durable_end = self.end

    # --- reading -------------------------------------------------------------------------
    def _segment_of(self, position: int) -> _Segment:
        for seg in self._segments:
            if seg.first <= position < seg.end:
                return seg
        raise IndexError(f"position {position} is not in the spool")

    def read(self, position: int, limit: int = 1000) -> list[SpoolRecord]:
        """Up to `limit` durable records from `position` on, in order."""
        out: list[SpoolRecord] = []
        while position < self.durable_end and len(out) < limit:
            seg = self._segment_of(position)
            fh = self._readers.get(seg.path)
            if fh is None:
                fh = self._readers[seg.path] = open(seg.path, "rb")  # noqa: SIM115
            fh.seek(seg.offsets[position - seg.first])
            while position < min(seg.end, self.durable_end) and len(out) < limit:
                n, crc = _HEADER.unpack(fh.read(_HEADER.size))
                payload = fh.read(n)
                if zlib.crc32(payload) != crc:
                    raise SpoolError(f"{seg.path}: record {position} changed on disk")
                out.append(SpoolRecord.decode(payload, position))
                position += 1
        return out

    def __iter__(self) -> Iterator[SpoolRecord]:
        """Every unacked durable record (tests, inspection)."""
        pos = self.acked
        while batch := self.read(pos):
            yield from batch
            pos = batch[-1].position + 1

    # --- acknowledging -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Records appended but not yet confirmed by Kafka."""
        return self.end - self.acked

    def ack(self, upto: int, meta: dict[str, Any] | None = None) -> None:
        """Records below `upto` are delivered: persist that and delete finished segments."""
        if upto < self.acked:
            raise ValueError(f"acked position cannot go back ({upto} < {self.acked})")
        if upto > self.durable_end:
            raise ValueError(f"cannot ack {upto}: only {self.durable_end} records are durable")
        self.acked = upto
        if meta is not None:
            self.meta = meta
        self.save_state()
        self._drop_acked_segments()

    def save_state(self) -> None:
        state = {"acked": self.acked, "seqs": self.seqs, "meta": self.meta}
        write_atomic(self.dir / STATE_FILE, json.dumps(state, sort_keys=True).encode(),
                     fsync=self.fsync)

    def _drop_acked_segments(self) -> None:
        # the active (last) segment stays: it is where the next append goes
        while len(self._segments) > 1 and self._segments[0].end <= self.acked:
            seg = self._segments.pop(0)
            fh = self._readers.pop(seg.path, None)
            if fh is not None:
                fh.close()
            seg.path.unlink(missing_ok=True)
        if (len(self._segments) == 1 and self._segments[0].end <= self.acked
                and self._segments[0].size >= self.segment_bytes):
            self._roll()
            self._drop_acked_segments()

    def segment_files(self) -> list[Path]:
        return [s.path for s in self._segments]

    def close(self) -> None:
        """Flush, persist the counters and release the folder."""
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None
        self.save_state()
        for fh in self._readers.values():
            fh.close()
        self._readers.clear()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        self._lock_fh.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- draining to Kafka ---------------------------------------------------------------------

ID_HEADER = "mallwatt-id"


class ProducerLike(Protocol):
    def produce(self, topic: str, value: bytes, key: bytes, partition: int,
                headers: list[tuple[str, bytes]], on_delivery: Callable[..., None]) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


# (topic, partition, first offset to look at or None, idents) -> idents already in Kafka;
# raises when the broker cannot be asked (the outage is not over).
FindWritten = Callable[[str, int, int | None, set[str]], set[str]]


@dataclass(eq=False)
class _Lane:
    """One (topic, partition): stop-and-wait, so a failure never reorders a partition."""

    topic: str
    partition: int
    queue: deque[SpoolRecord] = field(default_factory=deque)
    inflight: SpoolRecord | None = None
    suspect: bool = False  # the head may already be in Kafka: check before re-sending
    checking: bool = False
    retry_at: float = 0.0
    backoff_s: float = 0.0
    found: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"{self.topic}:{self.partition}"


class Drainer:
    """Sends spooled records in order and moves the acked position on confirmation.

    Each partition has at most one record in flight. librdkafka can leave a gap when
    queued messages time out during an outage (1, 4, 5 written, 2, 3 failed); with one
    in flight per partition nothing behind a failed record has been sent, so re-sending
    it keeps the partition in order. The price is one round trip per batch per partition,
    plenty for batches that each carry a second of a shard's readings.

    After a failure (and at start, for records a crash may have sent without the ack
    reaching state.json) the partition is scanned from the last confirmed offset for the
    records' `mallwatt-id` headers: a record the broker kept although its confirmation was
    lost counts as delivered, so nothing is written twice.
    """

    def __init__(self, spool: Spool, producer_factory: Callable[[], ProducerLike], *,
                 find_written: FindWritten | None = None, window: int = 10_000,
                 retry_min_s: float = 1.0, retry_max_s: float = 10.0,
                 save_every_s: float = 0.5) -> None:
        self.spool = spool
        self._factory = producer_factory
        self.producer = producer_factory()
        self.find_written = find_written
        self.window = window
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.save_every_s = save_every_s
        self.lanes: dict[tuple[str, int], _Lane] = {}
        self.cursor = spool.acked  # next position to hand to a lane
        self.acked = spool.acked
        self.delivered: set[int] = set()
        self.frontier: dict[str, int] = dict(spool.meta.get("frontier", {}))
        self._saved_at = 0.0
        self._fatal = False
        self._dirty = False
        # records a previous run may have sent without its ack reaching state.json
        self._suspect_below = spool.end if find_written is not None else spool.acked
        self.sent = self.failures = self.found_written = 0
        self.last_error = ""
        self.failed_since: float | None = None  # monotonic time of the first unresolved failure

    # --- delivery reports (called from producer.poll, in the pumping thread) -------------
    def _on_delivery(self, lane: _Lane, rec: SpoolRecord, err: Any, msg: Any) -> None:
        if lane.inflight is not rec:
            return  # a report from a producer we have replaced
        lane.inflight = None
        if err is None:
            lane.queue.popleft()
            self.delivered.add(rec.position)
            self.frontier[lane.key] = max(self.frontier.get(lane.key, -1), msg.offset())
            lane.backoff_s = 0.0
            if not any(la.suspect for la in self.lanes.values()):
                self.failed_since = None
            return
        self.failures += 1
        self.last_error = f"{lane.key}: {err}"
        if self.failed_since is None:
            self.failed_since = time.monotonic()
        if getattr(err, "fatal", lambda: False)():
            self._fatal = True
        lane.suspect = True
        lane.backoff_s = min(max(lane.backoff_s * 2, self.retry_min_s), self.retry_max_s)
        lane.retry_at = time.monotonic() + lane.backoff_s

    # --- pumping -----------------------------------------------------------------------
    def pump(self) -> None:
        """Non-blocking: serve delivery reports, route new records, send lane heads."""
        self.producer.poll(0)
        if self._fatal and not any(la.inflight for la in self.lanes.values()):
            # a fatal producer accepts nothing more; a replaced one is not asked again
            self.producer = self._factory()
            self._fatal = False
        limit = self.acked + self.window
        while self.cursor < min(self.spool.durable_end, limit):
            for rec in self.spool.read(self.cursor, min(1000, limit - self.cursor)):
                lane = self.lanes.get((rec.topic, rec.partition))
                if lane is None:
                    lane = self.lanes[(rec.topic, rec.partition)] = _Lane(rec.topic, rec.partition)
                    lane.suspect = rec.position < self._suspect_below
                lane.queue.append(rec)
                self.cursor = rec.position + 1
        now = time.monotonic()
        for lane in self.lanes.values():
            if self._fatal:
                break  # let the old producer's in-flight reports arrive, then replace it
            if lane.inflight is not None or not lane.queue or lane.checking:
                continue
            if lane.suspect:
                if now < lane.retry_at or self.find_written is not None:
                    continue  # run() checks Kafka first; without a checker, just re-send
                lane.suspect = False
            rec = lane.queue[0]
            lane.inflight = rec
            self.sent += 1
            try:
                self.producer.produce(rec.topic, value=rec.value, key=rec.key,
                                      partition=rec.partition,
                                      headers=[(ID_HEADER, rec.ident.encode())],
                                      on_delivery=lambda err, msg, la=lane, r=rec:
                                      self._on_delivery(la, r, err, msg))
            except BufferError:
                lane.inflight = None
                self.sent -= 1
            except Exception as exc:  # KafkaException from a producer in a fatal state
                lane.inflight = None
                self.sent -= 1
                self.last_error = f"produce: {exc}"
                self._fatal = True
        self._advance()

    def _advance(self, force: bool = False) -> None:
        moved = False
        while self.acked in self.delivered:
            self.delivered.remove(self.acked)
            self.acked += 1
            moved = True
        now = time.monotonic()
        if (moved or force) and (force or now - self._saved_at >= self.save_every_s):
            self.spool.ack(self.acked, {"frontier": self.frontier})
            self._saved_at = now
        elif moved:
            self._dirty = True  # saved by a later tick: one fsync per save_every_s

    def _check_sync(self, lane: _Lane) -> None:
        """Blocking (runs in a thread): which queued records are already in Kafka."""
        assert self.find_written is not None
        idents = {r.ident for r in list(lane.queue)[:1000]}
        found = self.find_written(lane.topic, lane.partition, self.frontier.get(lane.key),
                                  idents)
        lane.found = found

    async def _check(self, lane: _Lane) -> None:
        lane.checking = True
        try:
            await asyncio.to_thread(self._check_sync, lane)
        except Exception as exc:  # broker still unreachable: try again later
            self.last_error = f"{lane.key}: check failed: {exc}"
            lane.backoff_s = min(max(lane.backoff_s * 2, self.retry_min_s), self.retry_max_s)
            lane.retry_at = time.monotonic() + lane.backoff_s
            return
        finally:
            lane.checking = False
        found, lane.found = lane.found, set()
        kept: deque[SpoolRecord] = deque()
        for rec in lane.queue:
            if rec.ident in found:
                self.delivered.add(rec.position)  # the broker has it: sending again duplicates
                self.found_written += 1
            else:
                kept.append(rec)
        lane.queue = kept
        lane.suspect = False
        if not any(la.suspect for la in self.lanes.values()):
            self.failed_since = None
        self._advance()

    async def run(self, stop: asyncio.Event, tick_s: float = 0.05) -> None:
        """Pump until `stop` is set (then call drain() to finish)."""
        while not stop.is_set():
            self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick_s)

    def tick(self) -> None:
        self.pump()
        now = time.monotonic()
        for lane in self.lanes.values():
            if (lane.suspect and not lane.checking and lane.inflight is None
                    and now >= lane.retry_at and self.find_written is not None):
                if lane.queue:
                    lane.checking = True
                    asyncio.ensure_future(self._check(lane))
                else:
                    lane.suspect = False
        if self._dirty and now - self._saved_at >= self.save_every_s:
            self._dirty = False
            self._advance(force=True)

    async def drain(self, timeout_s: float) -> bool:
        """Try to deliver everything spooled within timeout_s; persist progress either way."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.acked < self.spool.durable_end:
            self.tick()
            await asyncio.sleep(0.02)
        self.producer.poll(0)
        self._advance(force=True)
        return self.acked >= self.spool.durable_end

    def reset_producer(self) -> None:
        """Build a new producer once nothing is in flight (new address, fatal error)."""
        self._fatal = True

    @property
    def depth(self) -> int:
        return self.spool.end - self.acked

    @property
    def healthy(self) -> bool:
        return self.failed_since is None
