"""`mallwatt replay --jobs N`: one replay in N processes, merged into the usual outputs.

The parent process is job 0 and writes the usual output files itself (Parquet on its writer
thread, as a single replay). Jobs 1..N-1 are children `python -m pipelines.core.replay ...
--job i/N` writing the same files in a part directory under the output; every job reads the
whole input, walks the single replay's plan and bills only its own accounts (`replay_jobs`).
When all are done the parent appends each output's part files after its own rows, in job
order: JSON Lines as bytes, Parquet row groups as bytes with a new footer (`parquet_concat`:
no decode and re-encode, so the merge costs a file copy); balances sorted by account as
`arrival.balances` sorts them; state.json the union of the states (keys sorted, as
`CoreState.to_dict` writes them). Per account every output equals ``--jobs 1`` (rows of
different accounts interleave differently, as with another ``--batch-size``).

Progress: the children report their counts on stderr (`PROGRESS` lines), the parent shows the
sum with its own. A child that fails stops the replay: the parent stops the other children,
names the job and repeats its message (its exit code 2, a bad input, is kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import polars as pl

PROGRESS = "@progress"  # a job's progress line on stderr: "@progress <readings> <calls> <last ts ms|->"
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
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    stdout: bytes = b""
    usage: Any = None
    status: int | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def name(self) -> str:
        return job_name(self.index, self.count, self.partitions)

    def poll(self) -> bool:
        """True once the child has exited (its status and resource usage kept)."""
        if self.status is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.status, self.usage = os.waitstatus_to_exitcode(status), usage
                self.proc.returncode = self.status
        return self.status is not None

    def stop(self) -> None:
        if self.status is None:
            self.proc.kill()
            _, status, self.usage = os.wait4(self.proc.pid, 0)
            self.status = self.proc.returncode = os.waitstatus_to_exitcode(status)
        for t in self.threads:
            t.join(timeout=5)

    def failure(self) -> JobFailed:
        said = [line.removeprefix("mallwatt replay: ") for line in self.tail]
        what = f"killed by signal {-(self.status or 0)}" if (self.status or 0) < 0 else f"exit {self.status}"
        return JobFailed(f"{self.name} failed ({what}): {said[-1] if said else 'no message'}",
                         2 if self.status == 2 else 1)

    def rows(self) -> dict[str, int]:
        """The row counts the child printed (its last stdout line)."""
        lines = self.stdout.decode("utf-8", "replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else {}


def job_name(index: int, count: int, partitions: list[int]) -> str:
    return f"job {index + 1}/{count} (partitions {', '.join(str(p) for p in partitions) or 'none'})"


class JobFailed(RuntimeError):
    """A job exited with an error; the message names the job and repeats its own."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _read_stderr(job: Job, stream: IO[bytes]) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line.startswith(PROGRESS):
            _, readings, calls, _ts = line.split()
            job.readings, job.calls = int(readings), int(calls)
        elif line.strip():
            job.tail.append(line)


def _read_stdout(job: Job, stream: IO[bytes]) -> None:
    job.stdout = stream.read()


def die_with_parent() -> None:
    """In a child: ask the kernel to end this process when its parent dies (Linux), so a parent
    killed outright leaves no job running on; elsewhere nothing."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_jobs(child_args: list[str], count: int, partitions: int, parts: Path) -> list[Job]:
    """Jobs 1..count-1 as children (argv without --job/--out), each writing to parts/job-<i>."""
    from pipelines.core.replay_jobs import JobFilter

    # the children import this same code, wherever the parent found it
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    started: list[Job] = []
    for i in range(1, count):
        cmd = [sys.executable, "-m", "pipelines.core.replay", *child_args, "--job", f"{i}/{count}",
               "--out", str(part_dir(parts, i))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        job = Job(i, count, proc, JobFilter(i, count, partitions).owned_partitions())
        for target, stream in ((_read_stderr, proc.stderr), (_read_stdout, proc.stdout)):
            t = threading.Thread(target=target, args=(job, stream), daemon=True)
            t.start()
            job.threads.append(t)
        started.append(job)
    return started


def part_dir(parts: Path, index: int) -> Path:
    return parts / f"job-{index}"


def check(jobs: list[Job]) -> None:
    """Raise JobFailed for a child that has exited with an error."""
    for job in jobs:
        if job.poll() and job.status != 0:
            raise job.failure()


def wait(jobs: list[Job], progress: Any) -> None:
    """Until every child has exited; JobFailed on the first failure."""
    while True:
        check(jobs)
        if all(j.status is not None for j in jobs):
            return
        progress.tick(None)
        time.sleep(0.05)


def merge_balances(own: pl.DataFrame, parts: list[Path], fmt: str) -> pl.DataFrame:
    frames = [own, *(pl.read_parquet(d / "balances.parquet") if fmt == "parquet"
                     else pl.read_ndjson(d / "balances.jsonl", schema=own.schema) for d in parts)]
    return pl.concat(frames, how="vertical_relaxed").sort("account_id")


def merge_state(own: dict[str, Any], parts: list[Path]) -> dict[str, Any]:
    """The union of the jobs' states as `CoreState.to_dict` orders it (keys sorted)."""
    circuits, accounts = dict(own["circuits"]), dict(own["accounts"])
    for d in parts:
        doc = json.loads((d / "state.json").read_text())
        circuits.update(doc["circuits"])
        accounts.update(doc["accounts"])
    return {"circuits": dict(sorted(circuits.items())), "accounts": dict(sorted(accounts.items()))}


def write_usage(path: str, jobs: list[Job], merge_s: float) -> None:
    """Each process's CPU seconds and peak RSS (the parent, job 0, first), and the seconds from
    the last job's end to the merged outputs (``merge_s``), for the bench."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    procs = [{"job": 0, "cpu_s": round(me.ru_utime + me.ru_stime, 2), "peak_rss_mb": round(me.ru_maxrss / 1024, 1)}]
    procs += [{"job": j.index, "cpu_s": round(j.usage.ru_utime + j.usage.ru_stime, 2),
               "peak_rss_mb": round(j.usage.ru_maxrss / 1024, 1)} for j in jobs if j.usage is not None]
    Path(path).write_text(json.dumps({"processes": procs, "merge_s": round(merge_s, 2)}))
