"""The processes and Kafka probes of `mallwatt bench scale`.

`Processes` starts the worker and its forwarder as `mallwatt` subprocesses and stops every
one it started (`close`), also when the bench fails. `Monitor` samples, in a thread, the
worker group's lag on the readings topic and the changelog's end offsets; `RelayTail`
collects relay commands. Everything here reads Kafka; nothing writes to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from infra.kafka_security import kafka_config
from schemas import codec

ROOT = Path(__file__).resolve().parent.parent
#: Worker log lines that mean it cannot go on (it may not exit by itself)
FATAL_MARKERS = ("MessageSizeTooLarge", " CRITICAL ")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class WorkerFailed(RuntimeError):
    """The worker exited or logged a fatal error; the message says which and where."""


def _die_with_parent() -> None:
    """Runs in the child: SIGKILL it when the bench process dies (even by SIGKILL)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _WorkerProc:
    """One worker process and the part of its log already checked."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log, self.log_pos = proc, log, 0

    def problem(self) -> str | None:
        if self.log.exists():
            with open(self.log, "rb") as f:
                f.seek(self.log_pos)
                chunk = f.read()
            # keep an unfinished last line for the next look
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self.log_pos += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if any(marker in line for marker in FATAL_MARKERS):
                    return line.strip()[:400]
        code = self.proc.poll()
        if code is not None:
            return f"exited with code {code}; last log line: {_last_line(self.log)}"
        return None


class Processes:
    """The forwarder and `workers` worker processes of one group. Each worker has its own name
    (`bench-worker-<i>`: a static group member that takes its partitions back on restart),
    RocksDB directory and metrics port (only the first serves one)."""

    def __init__(self, directory: Path, env: dict[str, str], config: Path, workers: int = 1) -> None:
        self.directory, self.env, self.config = directory, env, config
        self.slots: list[_WorkerProc | None] = [None] * max(1, workers)
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.started = 0

    def _spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT,
                                    env={**os.environ, **self.env, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509

    def start_forwarder(self) -> None:
        self.forwarder = self._spawn(["forward"], self.directory / "forwarder.log")

    def _worker_env(self, index: int) -> dict[str, str]:
        if len(self.slots) == 1:
            return {}  # one worker: as configured (the name and directory of --worker-env)
        base = self.env.get("MALLWATT_WORKER_NAME", "bench-worker")
        env = {"MALLWATT_WORKER_NAME": f"{base}-{index}"}
        if "MALLWATT_FAUST_DIR" in self.env:
            env["MALLWATT_FAUST_DIR"] = f"{self.env['MALLWATT_FAUST_DIR']}-{index}"
        if index:
            env["MALLWATT_WORKER_METRICS_PORT"] = "-1"  # one metrics port per host
        return env

    def start_worker(self) -> None:
        """Start every worker that is not running (after a kill: the killed one)."""
        for index, slot in enumerate(self.slots):
            if slot is not None:
                continue
            self.started += 1
            log = self.directory / f"worker-{self.started}.log"
            proc = self._spawn(["worker", "--no-forwarder", "--config", str(self.config)], log,
                               self._worker_env(index))
            self.slots[index] = _WorkerProc(proc, log)

    @property
    def worker(self) -> subprocess.Popen[bytes] | None:
        """The first worker (the one `kill_worker` kills)."""
        slot = self.slots[0]
        return slot.proc if slot else None

    def check(self) -> None:
        """Raise WorkerFailed if a worker exited or logged a fatal error since it started."""
        for slot in self.slots:
            if slot is None:
                continue
            problem = slot.problem()
            if problem is not None:
                raise WorkerFailed(f"worker (log {slot.log}): {problem}")

    def kill_worker(self) -> float:
        """SIGKILL the first worker (of several: the others go on); returns when it died."""
        slot = self.slots[0]
        assert slot is not None
        at = time.time()
        os.killpg(slot.proc.pid, signal.SIGKILL)
        slot.proc.wait(30)
        self.slots[0] = None
        return at

    def stop_worker(self) -> None:
        """Stop every worker."""
        for index, slot in enumerate(self.slots):
            if slot is not None:
                _stop(slot.proc)
                self.slots[index] = None

    def close(self) -> None:
        self.stop_worker()
        if self.forwarder is not None:
            _stop(self.forwarder)
        self.forwarder = None

    def worker_cpu_s(self) -> float:
        """CPU seconds of the running workers, together."""
        return sum(cpu_seconds(slot.proc.pid) for slot in self.slots if slot is not None)

    def forwarder_cpu_s(self) -> float:
        return cpu_seconds(self.forwarder.pid) if self.forwarder else 0.0


def _last_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4000))
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(empty log)"


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ledger_times(bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int], ids: set[str],
                 timeout_s: float = 300.0) -> dict[str, int]:
    """When (the ledger message's timestamp, epoch ms) each of the payment `ids` was credited:
    the first entry whose source_id is the payment, between the `start` and `end` offsets.
    Only messages that contain an id's bytes are decoded (a catch-up writes millions of entries)."""
    from schemas.ledger import batch_entries

    found: dict[str, int] = {}
    needles = [(i, i.encode()) for i in ids]
    if not needles:
        return found
    for msg in records_between(bootstrap, topic, start, end, timeout_s, "bench-ledger-times", strict=False):
        value = msg.value() or b""
        hits = {i for i, needle in needles if i not in found and needle in value}
        if hits:
            for entry in batch_entries(codec.decode("LedgerBatch", value)):
                if entry["source_id"] in hits:
                    found.setdefault(entry["source_id"], msg.timestamp()[1])
    return found


def records_between(bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int], timeout_s: float,
                    group: str, strict: bool = True) -> Iterator[Any]:
    """The records of `topic` from `start` to `end` offsets (per partition). Short of the end
    within `timeout_s`: a RuntimeError if `strict`, else the records read so far."""
    todo = {p: e for p, e in end.items() if e > start.get(p, 0)}
    if not todo:
        return
    consumer = _consumer(bootstrap, group, **{"enable.partition.eof": True, "fetch.max.bytes": 52_428_800})
    consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in todo])
    deadline = time.monotonic() + timeout_s
    try:
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        todo.pop(msg.partition(), None)
                    continue
                p = msg.partition()
                if p not in todo or msg.offset() >= todo[p]:
                    continue
                if msg.offset() >= todo[p] - 1:
                    todo.pop(p, None)
                yield msg
    finally:
        consumer.close()
    if todo and strict:
        raise RuntimeError(f"scan of {topic} did not reach its end offsets within {timeout_s:.0f}s")


def _consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    return Consumer(kafka_config(bootstrap, **{"group.id": group, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **extra}))


def end_offsets(consumer: Consumer, topic: str) -> dict[int, int]:
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}


class Offsets:
    """End offsets and a group's committed offsets (without joining the group)."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.probe = _consumer(bootstrap, f"{group}-bench-probe")
        self.group = _consumer(bootstrap, group)

    def ends(self, topic: str) -> dict[int, int]:
        try:
            return end_offsets(self.probe, topic)
        except (KafkaException, KeyError):  # a changelog the worker has not created yet
            return {}

    def lag(self, topic: str, ends: dict[int, int] | None = None) -> int:
        ends = self.ends(topic) if ends is None else ends
        committed = self.group.committed([TopicPartition(topic, p) for p in ends], timeout=10)
        return sum(max(0, ends[tp.partition] - max(tp.offset, 0)) for tp in committed)

    def close(self) -> None:
        self.probe.close()
        self.group.close()


@dataclass
class Sample:
    at: float  # epoch seconds
    lag: int  # readings messages not yet committed by the worker
    changelog_end: int  # records in the changelog so far


class Monitor(threading.Thread):
    """Samples lag and changelog growth every `interval` s until stopped."""

    def __init__(self, bootstrap: str, group: str, readings_topic: str, changelog: str,
                 interval: float = 0.25) -> None:
        super().__init__(name="bench-monitor", daemon=True)
        self.offsets = Offsets(bootstrap, group)
        self.readings_topic, self.changelog, self.interval = readings_topic, changelog, interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    lag = self.offsets.lag(self.readings_topic)
                    changelog = sum(self.offsets.ends(self.changelog).values())
                    self.samples.append(Sample(time.time(), lag, changelog))
                except KafkaException:
                    pass  # a sample missed while the broker is busy
                self._stop_event.wait(self.interval)
        finally:
            self.offsets.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)

    def since(self, at: float) -> list[Sample]:
        return [s for s in list(self.samples) if s.at >= at]


@dataclass
class Command:
    command_id: str
    action: str
    account_id: str | None
    cause_ts_ms: int
    produced_ms: int  # the command's Kafka timestamp (the forwarder's produce time)
    size: int


class RelayTail(threading.Thread):
    """Every relay command published from now on."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="bench-relay-tail", daemon=True)
        self.consumer = _consumer(bootstrap, "bench-relay-tail")
        self.consumer.assign([TopicPartition(topic, p, o) for p, o in end_offsets(self.consumer, topic).items()])
        self.commands: list[Command] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for msg in self.consumer.consume(500, 0.1):
                    if msg.error() or msg.value() is None:
                        continue
                    cmd = codec.decode("RelayCommand", msg.value())
                    self.commands.append(Command(cmd["command_id"], cmd["action"], cmd["account_id"],
                                                 cmd["cause_ts_ms"], msg.timestamp()[1], len(msg.value())))
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


@dataclass
class TopicScan:
    records: int = 0
    bytes: int = 0  # key + value, uncompressed
    max_value: int = 0
    first_ts_ms: int | None = None  # earliest create time seen
    last_ts_ms: int | None = None  # latest create time seen


def scan(bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int],
         timeout_s: float = 600.0) -> TopicScan:
    """Read a topic from `start` to `end` offsets (per partition) and add up its records."""
    out = TopicScan()
    for msg in records_between(bootstrap, topic, start, end, timeout_s, "bench-scan"):
        value = msg.value() or b""
        out.records += 1
        out.bytes += len(value) + len(msg.key() or b"")
        out.max_value = max(out.max_value, len(value))
        ts = msg.timestamp()[1]
        out.first_ts_ms = ts if out.first_ts_ms is None else min(out.first_ts_ms, ts)
        out.last_ts_ms = ts if out.last_ts_ms is None else max(out.last_ts_ms, ts)
    return out
