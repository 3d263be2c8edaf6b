"""`mallwatt replay --jobs N`: one replay in N processes, merged into the usual outputs.

Each job is a child `python -m pipelines.core.replay ... --job i/N` that reads the whole input,
walks the single replay's plan and bills only its own accounts (`replay_jobs`): its outputs go
to Arrow IPC part files (LZ4, cheap to write and read; Parquet is encoded once, by the merge)
and its state to a part state file. The parent then writes one file per output as a single
replay does: each output's parts in job order, a row group per ~`MERGE_ROWS` rows (bounded
memory), outputs merged on threads (pyarrow encodes without the interpreter lock); balances
sorted by account as `arrival.balances` sorts them; state.json the union of the jobs' states
(sorted, as `CoreState.to_dict` writes it). Per account every output equals ``--jobs 1``
(rows of different accounts interleave differently, as with another ``--batch-size``).

Progress: the jobs report their counts on stderr (`PROGRESS` lines), the parent shows their
sum. A job that fails stops the others; the parent names it and repeats its message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

PROGRESS = "@progress"  # a job's progress line on stderr: "@progress <readings> <calls> <last ts ms|->"
PART_SUFFIX = ".arrow"
MERGE_ROWS = 262_144  # rows per Parquet write of the merge (the row group size at most)
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
USAGE_ENV = "MALLWATT_REPLAY_USAGE"  # a file the parent writes each process's CPU s and peak RSS to (bench)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Job:
    index: int
    count: int
    proc: subprocess.Popen[bytes]
    partitions: list[int]
    readings: int = 0
    calls: int = 0
    last_ts: int | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    stdout: bytes = b""
    usage: Any = None
    status: int | None = None

    @property
    def name(self) -> str:
        parts = ", ".join(str(p) for p in self.partitions) or "none"
        return f"job {self.index + 1}/{self.count} (partitions {parts})"


class JobFailed(RuntimeError):
    """A job exited with an error; the message names the job and repeats its own."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _read_stderr(job: Job, stream: IO[bytes]) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line.startswith(PROGRESS):
            _, readings, calls, ts = line.split()
            job.readings, job.calls = int(readings), int(calls)
            job.last_ts = None if ts == "-" else int(ts)
        elif line.strip():
            job.tail.append(line)


def _read_stdout(job: Job, stream: IO[bytes]) -> None:
    job.stdout = stream.read()


def run_jobs(child_args: list[str], jobs: int, partitions: int, parts: Path, progress: Any) -> list[Job]:
    """Start the jobs (child argv without --job/--out), wait for all; JobFailed on the first
    failure (the others are stopped). ``progress``: an `arrival.Progress` to show the sum on."""
    from pipelines.core.replay_jobs import JobFilter

    running: list[Job] = []
    threads: list[threading.Thread] = []
    # the children import this same code, wherever the parent found it
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    for i in range(jobs):
        cmd = [sys.executable, "-m", "pipelines.core.replay", *child_args, "--job", f"{i}/{jobs}",
               "--out", str(parts / f"job-{i}")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        job = Job(i, jobs, proc, JobFilter(i, jobs, partitions).owned_partitions())
        running.append(job)
        for target, stream in ((_read_stderr, proc.stderr), (_read_stdout, proc.stdout)):
            t = threading.Thread(target=target, args=(job, stream), daemon=True)
            t.start()
            threads.append(t)
    failed: Job | None = None
    try:
        while any(j.status is None for j in running):
            for job in running:
                if job.status is None:
                    pid, status, usage = os.wait4(job.proc.pid, os.WNOHANG)
                    if pid:
                        job.status, job.usage = os.waitstatus_to_exitcode(status), usage
                        job.proc.returncode = job.status
                        if job.status != 0 and failed is None:
                            failed = job
            if failed is not None:
                break
            _show(progress, running)
            time.sleep(0.1)
    finally:
        for job in running:  # stop the others (a failure, or an interrupt of the parent)
            if job.status is None:
                job.proc.kill()
                _, status, job.usage = os.wait4(job.proc.pid, 0)
                job.status = os.waitstatus_to_exitcode(status)
        for t in threads:
            t.join(timeout=5)
    if failed is not None:
        said = [line.removeprefix("mallwatt replay: ") for line in failed.tail]
        message = said[-1] if said else "no message"
        if any(line.startswith("Traceback") for line in failed.tail):  # an unexpected error: its last line
            message = said[-1]
        what = f"killed by signal {-failed.status}" if (failed.status or 0) < 0 else f"exit {failed.status}"
        raise JobFailed(f"{failed.name} failed ({what}): {message}", 2 if failed.status == 2 else 1)
    _show(progress, running)
    return running


def _show(progress: Any, jobs: list[Job]) -> None:
    progress.readings = sum(j.readings for j in jobs)
    progress.calls = max((j.calls for j in jobs), default=0)  # every job makes the same calls
    stamps = [j.last_ts for j in jobs if j.last_ts is not None]
    progress.tick(min(stamps) if stamps else None)


def merge(parts: Path, jobs: int, out: Path, fmt: str) -> dict[str, int]:
    """The jobs' part files -> one file per output in ``out`` (job order) and their row counts
    (-1: JSON Lines, copied as they are: the jobs' own counts apply)."""
    from pipelines.core.replay_output import NO_STATISTICS, SCHEMAS

    dirs = [parts / f"job-{i}" for i in range(jobs)]
    names = sorted(SCHEMAS, key=lambda n: n not in ("ledger", "intervals"))  # the big ones first

    def one(name: str) -> int:
        if fmt != "parquet":
            with (out / f"{name}.jsonl").open("wb") as target:
                for d in dirs:
                    with (d / f"{name}.jsonl").open("rb") as source:
                        shutil.copyfileobj(source, target, 1 << 20)
            return -1  # counted by the jobs
        writer: pq.ParquetWriter | None = None
        rows, pending, held = 0, [], 0
        schema: pa.Schema | None = None

        def flush() -> None:
            nonlocal writer, pending, held
            table = pa.Table.from_batches(pending, schema=schema)
            if writer is None:
                writer = pq.ParquetWriter(out / f"{name}.parquet", table.schema, use_dictionary=False,
                                          write_statistics=[c for c in table.schema.names if c not in NO_STATISTICS])
            writer.write_table(table)
            pending, held = [], 0

        for d in dirs:
            with pa.memory_map(str(d / f"{name}{PART_SUFFIX}")) as source:
                reader = pa.ipc.open_stream(source)
                schema = schema or reader.schema
                for batch in reader:
                    if batch.num_rows:
                        pending.append(batch)
                        held += batch.num_rows
                        rows += batch.num_rows
                        if held >= MERGE_ROWS:
                            flush()
        if pending or writer is None:  # an output no job wrote to still gets its (empty) file
            flush()
        assert writer is not None
        writer.close()
        return rows

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(names)))) as pool:
        counts = dict(zip(names, pool.map(one, names), strict=True))
    return {n: counts[n] for n in SCHEMAS}


def merge_balances(parts: Path, jobs: int, out: Path, fmt: str) -> int:
    frames = [pl.read_ipc(parts / f"job-{i}" / f"balances{PART_SUFFIX}") if fmt == "parquet"
              else pl.read_ndjson(parts / f"job-{i}" / "balances.jsonl") for i in range(jobs)]
    frame = pl.concat(frames, how="vertical_relaxed").sort("account_id")
    if fmt == "parquet":
        frame.write_parquet(out / "balances.parquet")
    else:
        frame.write_ndjson(out / "balances.jsonl")
    return frame.height


def merge_state(parts: Path, jobs: int) -> str:
    """The union of the jobs' states as `CoreState.to_dict` orders it (keys sorted)."""
    circuits: dict[str, Any] = {}
    accounts: dict[str, Any] = {}
    for i in range(jobs):
        doc = json.loads((parts / f"job-{i}" / "state.json").read_text())
        circuits.update(doc["circuits"])
        accounts.update(doc["accounts"])
    return json.dumps({"circuits": dict(sorted(circuits.items())), "accounts": dict(sorted(accounts.items()))})


def write_usage(path: str, jobs: list[Job]) -> None:
    """Each process's CPU seconds and peak RSS (the parent's own too), for the bench."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    procs = [{"job": j.index, "cpu_s": round(j.usage.ru_utime + j.usage.ru_stime, 2),
              "peak_rss_mb": round(j.usage.ru_maxrss / 1024, 1)} for j in jobs]
    procs.append({"job": "parent", "cpu_s": round(me.ru_utime + me.ru_stime, 2),
                  "peak_rss_mb": round(me.ru_maxrss / 1024, 1)})
    Path(path).write_text(json.dumps(procs))
