"""Offline replay: re-run the billing core over recorded readings and payments.

    python -m pipelines.core.replay --config portfolio.yaml --readings r.parquet \
        --payments p.jsonl --out DIR [--tariff what_if.yaml] [--batch-size 500000]

Inputs are JSON Lines (``.jsonl``/``.json``) or Parquet with the columns documented in
`pipelines.core.engine`; a bad file or config exits 2 with a message naming file, line and field. Readings are replayed in time order in batches; payments join the batch
whose last reading is at or after them. Writes ledger, balances, alerts, commands and rejected
rows as Parquet (``--format jsonl`` for JSON Lines) plus the final state as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from pipelines.core import cols, timeguard
from pipelines.core.claims import claim_payment_rows
from pipelines.core.context import RatingContext
from pipelines.core.engine import (
    PAYMENT_REJECT_SCHEMA,
    BatchOutputs,
    CoreState,
    gc_paused,
    payments_frame,
    process_batch,
    tick,
)
from pipelines.core.interval import REJECT_SCHEMA
from pipelines.core.models import AccountRating, CircuitConfig, Mall, Tariff
from pipelines.core.money_authority import MONEY_RECORD, refuse_unauthorised
from pipelines.core.replay_input import InputError, read_payments, read_readings
from pipelines.core.replay_jobs import JobFilter

# Rows per core call (at most): the core's cost per call is mostly per account touched, so a
# call should carry many readings per account (500k rows of a 35,000-circuit portfolio: ~14 each,
# a 3.5-hour window), while its working set bounds the replay's memory (35,000 merchants: peak
# RSS 1.5 GB at 500k rows, 1.9 GB at 1M for 10 % less CPU). Well below a day's rows, so a run of
# one day already meets full-size calls and a longer period does not raise the peak.
BATCH_ROWS = 500_000
TIME_LIMITS = "time_limits"  # RatingContext.extra key: the config's `time:` section (set by build_context)


def context_from_values(tariffs: list[Any], malls: list[Any], accounts: list[Any], circuits: list[Any],
                        **kw: Any) -> RatingContext:
    """Adapter from already-loaded portfolio values (dicts or models) to a RatingContext."""
    def models(cls: Any, items: list[Any]) -> list[Any]:
        return [x if isinstance(x, cls) else cls.model_validate(x) for x in items]
    t, m = models(Tariff, tariffs), models(Mall, malls)
    a, c = models(AccountRating, accounts), models(CircuitConfig, circuits)
    return RatingContext({x.circuit_id: x for x in c}, {x.account_id: x for x in a}, {x.id: x for x in t},
                         {x.mall_id: x for x in m}, **kw)


def load_context(path: str) -> tuple[RatingContext, CoreState]:
    """A core-native YAML (top-level ``accounts`` and ``circuits``: see docs/billing.md), else a
    portfolio (a YAML file or a directory with roster tables, docs/roster.md), through the
    stream's own builder (`pipelines.context.build_context`): the same circuits (common areas to
    the mall's LANDLORD account), register wraps, opening balances and debts, lateness and gap as
    the stream."""
    if Path(path).is_dir():
        from pipelines.context import build_context
        from pipelines.roster import load_config

        # rules plus roster frames, as the worker loads them: no model per merchant (a 35,000-
        # merchant directory builds in about a second; the same portfolio as YAML takes ~17 s)
        return build_context(load_config(path), partitions=1).rating, CoreState()
    try:
        # the C loader when there: a 50-mall portfolio loads in a fraction of the time, and once
        doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except OSError as exc:
        raise InputError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(doc, dict) and "accounts" in doc and "circuits" in doc:
        extra = {k: doc[k] for k in ("lateness_ms", "gap_ms") if k in doc}
        try:
            ctx = context_from_values(doc.get("tariffs", []), doc.get("malls", []), doc["accounts"],
                                      doc["circuits"], **extra)
            ctx.extra[TIME_LIMITS] = timeguard.TimeLimits.model_validate(doc.get("time") or {})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise InputError(f"{path}: {exc}") from None
        return ctx, CoreState()
    from pipelines.context import build_context
    from pipelines.portfolio import parse_portfolio

    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    return build_context(parse_portfolio(doc, path), partitions=1).rating, CoreState()


def read_table(path: str | None, payments: bool = False) -> pl.DataFrame | None:
    """A readings (or payments) file, checked (`replay_input`): errors name file, line, field."""
    if path is None:
        return None
    return read_payments(path) if payments else read_readings(path)


def write_table(df: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        df.write_parquet(path.with_suffix(".parquet"))
    else:
        df.write_ndjson(path.with_suffix(".jsonl"))


def time_bounds(ctx: RatingContext) -> timeguard.Bounds:
    """The stream's time bounds for this context: the config's `time:` limits (defaults when
    absent) against its tariffs, per circuit as in `pipelines.context.BillingContext`."""
    limits = ctx.extra.get(TIME_LIMITS) or timeguard.TimeLimits()
    tariff_of = {c: ctx.accounts[cfg.account_id].tariff_id for c, cfg in ctx.circuits.items()}
    return timeguard.bounds_for(limits, ctx.tariffs.values(), tariff_of)


def guard(readings: pl.DataFrame, payments: pl.DataFrame | None, bounds: timeguard.Bounds
          ) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame, pl.DataFrame]:
    """The stream's time guard over recorded inputs: (readings, payments, refused readings,
    refused payments). The future check needs each row's Kafka message time in `msg_ts_ms`;
    without that column only the absolute bounds apply (see docs/billing.md, Replay)."""
    readings, bad_r = timeguard.split_frame(readings, bounds)
    bad_p = pl.DataFrame(schema=PAYMENT_REJECT_SCHEMA)
    if payments is not None:
        payments, bad = timeguard.split_frame(payments, bounds, circuit_col="")
        if bad.height:
            bad_p = _reasons(bad, bounds, PAYMENT_REJECT_SCHEMA)
    return readings, payments, _reasons(bad_r, bounds, REJECT_SCHEMA), bad_p


def _reasons(bad: pl.DataFrame, bounds: timeguard.Bounds, schema: dict[str, Any]) -> pl.DataFrame:
    text = {c: f"{c}: {timeguard.explain(c, bounds)}" for c in (timeguard.FUTURE, timeguard.BEFORE_START,
                                                                  timeguard.ABSURD)}
    out = bad.with_columns(reason=pl.col(timeguard.REASON_COLUMN).replace_strict(text, return_dtype=pl.String))
    for name, dtype in schema.items():
        if name not in out.columns:
            out = out.with_columns(pl.lit(None, dtype).alias(name))
    return out.select(list(schema)).cast(schema)


def replay(ctx: RatingContext, readings: pl.DataFrame, payments: pl.DataFrame | None,
           batch_size: int = 100_000, state: CoreState | None = None,
           bounds: timeguard.Bounds | None = None, sink: Any = None,
           progress: Any = None, job: JobFilter | None = None) -> tuple[CoreState, dict[str, pl.DataFrame]]:
    """Bill recorded inputs in time order. They pass the stream's time guard first (``bounds``,
    default `time_bounds(ctx)`): what the stream would dead-letter is refused here with the
    same reason. With ``sink(name, frame)`` the outputs go there batch by batch and only the
    balances are returned (memory does not grow with the outputs). With ``job`` (a parallel
    replay's job, `replay_jobs`) the batches and their clocks are the whole input's, and only the
    job's accounts are billed."""
    readings, payments, refused_r, refused_p = guard(readings, payments, bounds or time_bounds(ctx))
    mine: Any = _job_share(job, ctx)
    readings = readings.sort("ts_ms", maintain_order=True)
    pays = payments.sort("ts_ms", maintain_order=True) if payments is not None else None
    state, acc = state or CoreState(), {k: [] for k in ("ledger", "alerts", "commands", "rejected_readings",
                                               "rejected_payments", "intervals")}
    acc["rejected_readings"].append(mine(refused_r))
    acc["rejected_payments"].append(mine(refused_p, "account_id"))
    if pays is not None and pays.height:  # every id claimed once, as the stream's claim step does
        frame = payments_frame(pays)
        rows = frame.to_dicts()
        if MONEY_RECORD in pays.columns:  # manual top-ups: the stream's operator-signature check first
            for row, raw in zip(rows, pays[MONEY_RECORD].to_list(), strict=True):
                row[MONEY_RECORD] = raw
        policies = {a: r.policy for a, r in ctx.accounts.items()}
        rows, unauthorised = refuse_unauthorised(rows, ctx.extra.get("security"), policies)
        accepted, refused = claim_payment_rows(rows, policies)
        refused = unauthorised + refused
        pays = pl.DataFrame(accepted, schema=frame.schema)
        acc["rejected_payments"].append(mine(pl.DataFrame(
            [{k: r[k] for k in PAYMENT_REJECT_SCHEMA} for r in refused], schema=PAYMENT_REJECT_SCHEMA), "account_id"))
    n = readings.height
    starts = list(range(0, n, batch_size)) or [0]
    for i, s in enumerate(starts):
        batch = readings.slice(s, batch_size)
        last = i == len(starts) - 1
        p = None
        if pays is not None:
            upto = batch["ts_ms"].max() if not last and batch.height else None
            sel = pays if upto is None else pays.filter(pl.col("ts_ms") <= upto)
            p, pays = sel, (pays.filter(pl.col("ts_ms") > upto) if upto is not None else None)
        now = replay_now(batch, p)  # the whole batch's clock, also in a parallel job
        batch, p = mine(batch), mine(p, "account_id")
        state, out = process_batch(state, batch, p, ctx, flush=last)
        for k in acc:
            acc[k].append(getattr(out, k))
        state, ticked = replay_tick(state, ctx, batch, p, now=now)
        if ticked is not None:
            for k in acc:
                acc[k].append(getattr(ticked, k))
        if sink is not None:
            for k, frames in acc.items():
                for frame in frames:
                    if frame.height:
                        sink(k, frame)
                frames.clear()
        if progress is not None:
            progress.add(batch.height, int(batch["ts_ms"].max()) if batch.height else None)
    from pipelines.core.arrival import balances

    tables = {} if sink is not None else {k: pl.concat(v, how="vertical_relaxed") for k, v in acc.items()}
    tables["balances"] = balances(state)
    return state, tables


def _job_share(job: JobFilter | None, ctx: RatingContext) -> Any:
    """frame, [account column] -> the job's rows of it (by the account, or by the circuit's
    account without a column); every row when there is no job."""
    if job is None:
        return lambda frame, column=None: frame
    from pipelines.core.lookup import lookup

    lk = lookup(ctx)

    def share(frame: pl.DataFrame | None, column: str | None = None) -> pl.DataFrame | None:
        if frame is None or not frame.height:
            return frame
        return job.by_account(frame, column) if column else job.readings(frame, lk)
    return share


def replay_tick(state: CoreState, ctx: RatingContext, readings: pl.DataFrame | None,
                payments: pl.DataFrame | None, reading_accounts: Any = None, *,
                now: int | None = None) -> tuple[CoreState, BatchOutputs | None]:
    """The stream's timer (pipelines.worker.power_timer) after a core call, at the newest input
    time: the standing charges and debt schedule of the local days the call's accounts' readings
    reached (0 Wh readings post nothing by themselves), and trips deferred by a friendly period
    that has ended. engine.tick decides by each account's own time, so ticking after every call
    gives what a timer ticking every second gives (same entries, ids and times).
    ``reading_accounts``: the account rank of each reading (-1: unknown circuit), when the
    caller has them (arrival replay), so the readings' circuits are not looked up again.
    ``now``: the clock when the caller knows it (a parallel job passes the whole call's clock
    with its own share of the call); default `replay_now` of these inputs."""
    if now is None:
        now = replay_now(readings if readings is not None else pl.DataFrame(), payments)
    if now is None:
        return state, None
    accounts = {a for a, s in state.accounts.items() if s.deferred or s.warn_pending}
    if readings is not None and readings.height:
        from pipelines.core.interval import _circuit_codes
        from pipelines.core.lookup import lookup

        lk = lookup(ctx)  # circuit ranks -> account ranks in numpy: one Python step per account, not per row
        acc = reading_accounts
        if acc is None:
            codes = _circuit_codes(readings.get_column("circuit_id"), lk.cindex)
            acc = lk.circ_acc[codes[codes >= 0]]
        ids = lk.account_ids
        accounts.update(ids[i] for i in cols.distinct(acc[acc >= 0], len(ids)).tolist())
    if payments is not None and payments.height:
        accounts.update(payments["account_id"].to_list())
    if not accounts:
        return state, None
    return tick(state, now, ctx, accounts)


def replay_now(batch: pl.DataFrame, payments: pl.DataFrame | None) -> int | None:
    """The time the stream's clock had reached after a batch: the newest input (the recorded
    Kafka timestamps `msg_ts_ms` when the input has them, else the readings' and payments' own)."""
    stamps = [int(v) for f in (batch, payments) if f is not None and f.height
              for c in ("ts_ms", "msg_ts_ms") if c in f.columns and (v := f[c].max()) is not None]
    return max(stamps) if stamps else None


def _load_tariff(path: str) -> Tariff:
    try:
        return Tariff.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except OSError as exc:
        raise InputError(f"{path}: cannot read tariff ({exc.strerror})") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise InputError(f"{path}: not a valid tariff: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mallwatt replay", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--readings", required=True)
    ap.add_argument("--payments")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tariff", help="YAML/JSON file with one tariff: re-rate every account under it")
    ap.add_argument("--batch-size", type=int, default=BATCH_ROWS,
                    help=f"rows per core call at most (default {BATCH_ROWS:,}); memory grows with it")
    ap.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    ap.add_argument("--arrival-order", action="store_true",
                    help="replay in the order the stream received the input (rows need partition, offset and "
                         "msg_ts_ms, as `mallwatt export-input` writes them); readings Parquet is read in chunks "
                         "of --batch-size rows; pending readings are not flushed at the end, as in the stream")
    ap.add_argument("--outcomes", help="with --arrival-order: the relay outcomes as `mallwatt export-input` writes "
                                       "them (outcomes.parquet); runs the stream's power loop too and writes "
                                       "relay_commands (retries included) and relay_alerts. Needs a portfolio config")
    ap.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    ap.add_argument("--jobs", type=int,
                    help="processes to replay in (default: MALLWATT_REPLAY_JOBS or 1; 0: the usable cores; "
                         "--outcomes needs 1, its power loop needs every account in one process). Each job costs "
                         "about 1.2x the CPU of its share (it plans the whole input), so more jobs are faster "
                         "only on cores nothing else uses. Job i bills the accounts of the stream "
                         "partitions p (account_shard(account, MALLWATT_PARTITIONS or 8)) with p %% N == i, as "
                         "the workers own them; every job reads the whole input and makes the same core calls "
                         "at the same clock, so each account's outputs and state equal --jobs 1's. The outputs "
                         "are merged into the usual files; rows of different accounts interleave differently. "
                         "Each job holds its own config and input chunk (memory: up to N times one process). "
                         "1: the single-process replay; at most one job per partition")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # i/N: a job of a parallel replay (replay_parallel)
    a = ap.parse_args(argv)
    if a.outcomes and not a.arrival_order:
        ap.error("--outcomes needs --arrival-order (outcomes are placed by their arrival)")
    if a.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if a.jobs is None:
        a.jobs = int(os.environ.get("MALLWATT_REPLAY_JOBS") or 1)
    if a.jobs < 0:
        ap.error("--jobs must be 0 (the usable cores) or more")
    if a.outcomes and (a.jobs or 1) > 1:
        ap.error("--outcomes runs the stream's power loop, which needs every account in one process: "
                 "use --jobs 1 (the default with --outcomes)")
    from pipelines.core.replay_parallel import JobFailed, usable_cores

    jobs = a.jobs or (1 if a.outcomes or a.job else usable_cores())  # 0: the usable cores
    from infra.topics import default_partitions
    from pipelines.core.arrival import OrderError, Progress
    from pipelines.core.replay_jobs import JobFilter, parse_job
    from pipelines.core.replay_output import OutputWriter
    from pipelines.portfolio import ConfigError

    job: JobFilter | None = None
    if a.job:  # a child of a parallel replay
        from pipelines.core.replay_parallel import die_with_parent

        die_with_parent()
        try:
            job = parse_job(a.job, default_partitions())
        except ValueError as exc:
            ap.error(str(exc))
    elif jobs > 1:  # a parallel replay: this process is job 0 and starts the others
        jobs = min(jobs, default_partitions())  # a job per partition group at most: more would bill nothing
        job = JobFilter(0, jobs, default_partitions()) if jobs > 1 else None
    progress = Progress(enabled=not a.quiet or bool(a.job), machine=bool(a.job))
    parallel = _Parallel(a, jobs, progress) if jobs > 1 and not a.job else None
    try:
        with gc_paused():  # builds an object per account and circuit; nothing there to collect
            ctx, state0 = load_context(a.config)
        if a.tariff:
            ctx = ctx.with_tariff(_load_tariff(a.tariff))
        payments = read_table(a.payments, payments=True)
        writer = OutputWriter(Path(a.out), a.format)
        if a.arrival_order:
            from pipelines.core.arrival import replay_arrival

            relay = _relay_replay(a.config, a.outcomes, writer) if a.outcomes else None
            if relay is not None and not a.tariff:
                ctx = relay.ctx.rating  # the same context the power loop routes by
            state = replay_arrival(ctx, read_chunks(a.readings, a.batch_size), payments, writer, state=state0,
                                   progress=progress, where=a.readings, relay=relay, job=job)
        else:
            readings = read_table(a.readings)
            assert readings is not None
            state, _ = replay(ctx, readings, payments, a.batch_size, state0, sink=writer, progress=progress,
                              job=job)
        if parallel is not None:
            parallel.wait()
        progress.hold = False
        progress.done()
    except (InputError, ConfigError, OrderError) as exc:  # a bad input is the user's to fix: no traceback
        print(f"mallwatt replay: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:  # a child's failure, named, with its own message
        progress.hold = False
        progress.done()
        print(f"mallwatt replay: {exc}", file=sys.stderr)
        return exc.code
    finally:
        if parallel is not None:
            parallel.stop()  # children still running after an error; nothing when all are done
    from pipelines.core.arrival import balances

    # before the Parquet thread is joined, so both run; no indent: json's C encoder (indented
    # output takes the pure-Python one, ~5 s at 35,000 merchants); the collector held while the
    # state's dicts are built (it would walk them all again and again: half of this step)
    with gc_paused():
        doc = state.to_dict()
        if parallel is not None:
            doc = parallel.state(doc)
        text = json.dumps(doc)
    table = balances(state)
    if parallel is not None:
        table = parallel.balances(table)
        parallel.append(writer)
    writer.write_whole("balances", table)
    rows = writer.close()
    (Path(a.out) / "state.json").write_text(text)
    if parallel is not None:
        parallel.finish()
    print(json.dumps(rows))
    return 0


class _Parallel:
    """The parent's side of --jobs N: it is job 0 itself; jobs 1..N-1 run as children writing
    part files under the output directory (`replay_parallel`), merged in when all are done."""

    def __init__(self, a: argparse.Namespace, jobs: int, progress: Any) -> None:
        from infra.topics import default_partitions
        from pipelines.core import replay_parallel as rp

        self.rp, self.fmt = rp, a.format
        self.parts = Path(a.out) / f".replay-jobs-{os.getpid()}"
        args = ["--config", a.config, "--readings", a.readings, "--batch-size", str(a.batch_size),
                "--format", a.format]
        args += ["--payments", a.payments] if a.payments else []
        args += ["--tariff", a.tariff] if a.tariff else []
        args += ["--arrival-order"] if a.arrival_order else []
        Path(a.out).mkdir(parents=True, exist_ok=True)
        self.children = rp.start_jobs(args, jobs, default_partitions(), self.parts)
        self.dirs = [rp.part_dir(self.parts, j.index) for j in self.children]
        self.progress = progress
        progress.label = f"replay ({jobs} jobs)"
        progress.hold = True  # the last line waits for the children
        progress.others = lambda: sum(j.readings for j in self.children)
        progress.watch = lambda: rp.check(self.children)  # a failed child stops the replay early

    def wait(self) -> None:
        import time

        self.rp.wait(self.children, self.progress)
        self.waited = time.monotonic()

    def stop(self) -> None:
        """Stop the children still running (after an error) and, if any failed or was stopped,
        remove the part files; after a good run `finish` removes them."""
        import shutil

        for job in self.children:
            job.stop()
        if any(j.status != 0 for j in self.children):
            shutil.rmtree(self.parts, ignore_errors=True)

    def state(self, own: dict[str, Any]) -> dict[str, Any]:
        return self.rp.merge_state(own, self.dirs)

    def balances(self, own: pl.DataFrame) -> pl.DataFrame:
        return self.rp.merge_balances(own, self.dirs, self.fmt)

    def append(self, writer: Any) -> None:
        rows: dict[str, int] = {}
        for job in self.children:
            for name, count in job.rows().items():
                rows[name] = rows.get(name, 0) + count
        writer.append_parts(self.dirs, rows)

    def finish(self) -> None:
        import shutil

        shutil.rmtree(self.parts, ignore_errors=True)
        if os.environ.get(self.rp.USAGE_ENV):
            import time

            self.rp.write_usage(os.environ[self.rp.USAGE_ENV], self.children, time.monotonic() - self.waited)


def _relay_replay(config: str, outcomes_path: str, sink: Any) -> Any:
    """The stream's power loop for replay (`pipelines.replay_relay`): needs the portfolio's
    meters and gateways, so a portfolio config (not the core-native YAML)."""
    from pipelines.context import build_context
    from pipelines.portfolio import load_portfolio, parse_portfolio
    from pipelines.replay_relay import RelayReplay

    if Path(config).is_dir():
        portfolio = load_portfolio(config)
    else:
        doc = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "accounts" in doc and "circuits" in doc:
            raise InputError(f"{config}: --outcomes needs a portfolio config (meters and gateways), "
                             f"not the core-native YAML")
        portfolio = parse_portfolio(doc, config)
    try:
        outcomes = pl.read_parquet(outcomes_path) if outcomes_path.endswith(".parquet") else pl.read_ndjson(
            outcomes_path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputError(f"{outcomes_path}: cannot read outcomes ({exc})") from None
    try:
        return RelayReplay(build_context(portfolio, partitions=1), outcomes, sink)
    except ValueError as exc:
        raise InputError(f"{outcomes_path}: {exc}") from None


def read_chunks(path: str, rows: int) -> Any:
    """(first row, frame) chunks of a readings file: Parquet in row batches (never the whole
    file in memory), JSON Lines whole; each chunk checked as `replay_input` checks a file."""
    from pipelines.core.arrival import arrival_problem, chunks_of
    from pipelines.core.replay_input import READING_FIELDS, _frame_problem

    if not path.endswith(".parquet"):
        yield from chunks_of(read_table(path), rows)  # type: ignore[arg-type]
        return
    import pyarrow.parquet as pq

    try:
        total = pq.ParquetFile(path).metadata.num_rows
    except OSError as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    # polars' own reader, a row slice at a time (only the row groups it needs): a third of the
    # time of pyarrow batches converted to polars, and no thread pool fighting the Parquet writer
    source = pl.scan_parquet(path)
    first = 0
    for start in range(0, total, rows):
        try:
            frame = source.slice(start, rows).collect()
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        problem = _frame_problem(frame, READING_FIELDS) or arrival_problem(frame)
        if problem is not None:
            raise InputError(f"{path}: rows from {first + 1}: {problem}")
        yield first, frame
        first += frame.height


if __name__ == "__main__":
    raise SystemExit(main())
