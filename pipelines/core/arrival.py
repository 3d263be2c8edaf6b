"""Replay in arrival order: the stream's own order of input, so a re-run reproduces it.

Input rows carry the Kafka position of the message that brought them: ``partition``,
``offset`` and ``msg_ts_ms`` (the message timestamp; `mallwatt export-input` writes them).
The stream's order is, per account:
- readings in the order their partition delivered them (offset order), message by message;
  a late reading is late exactly as in the stream, because the watermark moved message by
  message (see `segments` for the one case where the stream's grouping matters);
- payments claimed in the order of their payments partition (claims are per id, and an id
  lives on one partition), then applied to the wallet when they arrived: after every readings
  message (in file order) whose message time is not after the payment's, before the first
  one that is. A payment therefore lands between the same charges as in the stream when the
  stream applied the inputs in the order they arrived (`docs/billing.md`, Arrival order).

Billing message by message would be slow, so consecutive messages and payments are billed
in one core call whenever that cannot change the result (`segments`): within a call the
core orders each account's events by (ts, payments first), so a call may hold an account's
events only when that order is their arrival order. Memory holds one input chunk and the
core state, never the period: outputs go to an `OutputSink` call by call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipelines.core import timeguard
from pipelines.core.claims import ClaimBook, claim_payment_rows
from pipelines.core.context import RatingContext
from pipelines.core.engine import (
    PAYMENT_REJECT_SCHEMA,
    CoreState,
    gc_paused,
    payments_frame,
    process_batch,
)
from pipelines.core.money_authority import MONEY_RECORD, refuse_unauthorised
from pipelines.core.replay_jobs import JobFilter

ARRIVAL_COLUMNS = ("partition", "offset", "msg_ts_ms")
OUTPUTS = ("ledger", "alerts", "commands", "rejected_readings", "rejected_payments", "intervals")


class OrderError(ValueError):
    """Input not in arrival order (names the file and row)."""


@dataclass
class Progress:
    """A progress line on stderr at most once a second (and once at the end)."""

    label: str = "replay"
    every_s: float = 1.0
    enabled: bool = True
    machine: bool = False  # a parallel job: "@progress <readings> <calls> <ts|->" lines for its parent
    others: Callable[[], int] | None = None  # readings billed elsewhere (a parallel replay's other jobs)
    watch: Callable[[], None] | None = None  # called at most twice a second (a parallel replay checks its jobs)
    watched: float = 0.0
    hold: bool = False  # done() waits (a parallel replay's parent: until its children are done)
    finished: bool = False
    readings: int = 0
    calls: int = 0
    started: float = 0.0
    shown: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.shown = time.monotonic()

    def add(self, readings: int, last_ts_ms: int | None) -> None:
        self.readings += readings
        self.calls += 1
        self.tick(last_ts_ms)

    def tick(self, last_ts_ms: int | None) -> None:
        """Show the counts if the last line is old enough."""
        now = time.monotonic()
        if self.watch is not None and now - self.watched >= 0.5:
            self.watched = now
            self.watch()
        if self.enabled and now - self.shown >= self.every_s:
            self.shown = now
            self._show(now, last_ts_ms, "\r")

    def done(self) -> None:
        if self.hold or self.finished:
            return
        self.finished = True
        if self.enabled:
            self._show(time.monotonic(), None, "\r")
            if not self.machine:
                sys.stderr.write("\n")

    def _machine(self, ts_ms: int | None) -> None:
        sys.stderr.write(f"@progress {self.readings} {self.calls} {'-' if ts_ms is None else ts_ms}\n")
        sys.stderr.flush()

    def _show(self, now: float, ts_ms: int | None, end: str) -> None:
        if self.machine:
            self._machine(ts_ms)
            return
        readings = self.readings + (self.others() if self.others is not None else 0)
        rate = readings / max(now - self.started, 1e-9)
        at = "" if ts_ms is None else f", at {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(ts_ms / 1000))}"
        sys.stderr.write(f"{end}{self.label}: {readings:,} readings in {self.calls:,} core calls, "
                         f"{rate:,.0f} readings/s{at}   ")
        sys.stderr.flush()


Sink = Callable[[str, pl.DataFrame], None]  # (output name, frame) -> write it


def arrival_problem(frame: pl.DataFrame) -> str | None:
    """Why a frame cannot be replayed in arrival order (column level), or None."""
    for name in ARRIVAL_COLUMNS:
        if name not in frame.columns:
            return (f"missing column {name!r}: --arrival-order needs each row's Kafka partition, offset and "
                    f"msg_ts_ms (mallwatt export-input writes them)")
        col = frame[name]
        if not (col.dtype.is_integer() or col.dtype == pl.Null):
            return f"column {name!r}: expected integers, got {col.dtype}"
        if name != "msg_ts_ms" and col.null_count():
            return f"row {int(col.is_null().arg_max() or 0) + 1}: {name}: expected a value, got None"
    return None


def claim_in_order(payments: pl.DataFrame, ctx: RatingContext, bounds: timeguard.Bounds,
                   book: ClaimBook | None = None) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(accepted payments in wallet arrival order, refused by time, refused by claim).

    Claims go in (partition, offset) order, as the claims agent reads them; the accepted ones
    reach the wallet in (msg_ts_ms, partition, offset) order."""
    frame = payments.sort("partition", "offset", maintain_order=True)
    ok, bad = timeguard.split_frame(frame, bounds, circuit_col="")
    keep = [c for c in ARRIVAL_COLUMNS if c in ok.columns]
    rows = payments_frame(ok).hstack(ok.select(keep)).to_dicts() if ok.height else []
    if MONEY_RECORD in ok.columns:  # manual top-ups: the stream's operator-signature check first
        for row, raw in zip(rows, ok[MONEY_RECORD].to_list(), strict=True):
            row[MONEY_RECORD] = raw
    policies = {a: r.policy for a, r in ctx.accounts.items()}
    rows, unauthorised = refuse_unauthorised(rows, ctx.extra.get("security"), policies)
    accepted, refused = claim_payment_rows(rows, policies, book)
    refused = unauthorised + refused
    schema = {**payments_frame(None).schema, **{c: pl.Int64 for c in keep}}
    acc = pl.DataFrame(accepted, schema=schema).sort("msg_ts_ms", "partition", "offset", maintain_order=True)
    from pipelines.core.replay import _reasons  # the stream's wording for time refusals

    refused_frame = pl.DataFrame([{k: r.get(k) for k in PAYMENT_REJECT_SCHEMA} for r in refused],
                                 schema=PAYMENT_REJECT_SCHEMA)
    return acc, (_reasons(bad, bounds, PAYMENT_REJECT_SCHEMA) if bad.height
                 else pl.DataFrame(schema=PAYMENT_REJECT_SCHEMA)), refused_frame


def segments(entries: pl.DataFrame) -> list[int]:
    """Where to cut a sequence of items (readings messages and payments, column ``pos``) into
    core calls, as the positions that start a new call.

    Each entry is (pos, account, kmin, kmax): a readings message's rows of one account have
    kmin = 2*min(ts), kmax = 2*max(ts)+1; a payment kmin = 2*ts-1, kmax = 2*ts. Within one core
    call an account's events run in (ts, payments first) order; that equals arrival order iff
    every item's kmin is at least the largest kmax of the account's earlier items in the call.
    So: a reading not newer than one already in the call (a late reading, a re-sent one), a
    payment older than a reading in the call, or a reading older than a payment in the call,
    starts a new call. (A late reading then meets the watermark of the messages before it, as
    in the stream when those were billed in an earlier step; see docs/billing.md.)"""
    if not entries.height:
        return []
    codes = entries["account_id"].rank("dense").fill_null(0).cast(pl.Int64).to_numpy()
    return segment_cuts(entries["pos"].to_numpy(), codes, entries["kmin"].to_numpy(), entries["kmax"].to_numpy())


def segment_cuts(pos: np.ndarray, acc: np.ndarray, kmin: np.ndarray, kmax: np.ndarray) -> list[int]:
    """`segments` over integer columns (``acc``: any integer code per account). Sorted once by
    (account, pos); each pass finds the first item older than its account's newest earlier item
    since the last cut (a cumulative maximum per account) and restarts there."""
    order = _order_by(acc, pos)
    pos, acc, kmin, kmax = pos[order], acc[order], kmin[order], kmax[order]
    cuts: list[int] = []
    while pos.size > 1:
        first = np.r_[True, acc[1:] != acc[:-1]]
        prior = _grouped_cummax(kmax, first)
        flagged = ~first
        flagged[1:] &= kmin[1:] < prior[:-1]
        if not flagged.any():
            break
        cut = int(pos[flagged].min())
        cuts.append(cut)
        keep = pos >= cut
        pos, acc, kmin, kmax = pos[keep], acc[keep], kmin[keep], kmax[keep]
    return cuts


def _order_by(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """``np.lexsort((minor, major))`` for non-negative integer columns: one stable sort of a
    combined key (timsort gains from runs already in order, such as rows in message order:
    several times faster than lexsort's two passes)."""
    if not major.size:
        return np.zeros(0, dtype=np.int64)
    span = int(minor.max()) + 1
    if int(major.min()) < 0 or int(minor.min()) < 0 or (int(major.max()) + 1) * span >= 2**62:
        return np.lexsort((minor, major))
    return np.argsort(major * span + minor, kind="stable")


def _grouped_cummax(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running maximum of ``values`` restarting where ``first`` is set."""
    lo = int(values.min())
    span = int(values.max()) - lo + 1
    group = np.cumsum(first) - 1
    if int(group[-1]) * span < 2**62:  # each group lifted above the previous ones: one accumulate
        lift = group * span
        return np.maximum.accumulate(values - lo + lift) - lift + lo
    out = values.copy()
    starts = np.flatnonzero(first).tolist() + [values.size]
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        out[s:e] = np.maximum.accumulate(values[s:e])
    return out


def _message_index(chunk: pl.DataFrame) -> pl.Series:
    """0-based index of each row's message (rows of a message are consecutive)."""
    new = (pl.col("partition") != pl.col("partition").shift(1)) | (pl.col("offset") != pl.col("offset").shift(1))
    return chunk.select(new.fill_null(True).cast(pl.Int64).cum_sum().alias("msg") - 1)["msg"]


class ArrivalReplay:
    """Bill chunks of readings (in arrival order) with the accepted payments merged in."""

    def __init__(self, ctx: RatingContext, accepted: pl.DataFrame, sink: Sink, *, state: CoreState | None = None,
                 bounds: timeguard.Bounds | None = None, progress: Progress | None = None, relay: Any = None,
                 job: JobFilter | None = None) -> None:
        from pipelines.core.replay import _reasons, time_bounds

        self.ctx, self.sink, self.state = ctx, sink, state or CoreState()
        self.job = job  # a parallel replay's job: the whole plan, its own accounts billed (`replay_jobs`)
        self.relay = relay  # pipelines.replay_relay.RelayReplay: the stream's power loop, or None
        self.bounds = bounds or time_bounds(ctx)
        self._reasons = _reasons
        self.progress = progress or Progress(enabled=False)
        self.pay = accepted
        self.pay_ts = accepted["msg_ts_ms"].to_numpy() if accepted.height else np.zeros(0, dtype=np.int64)
        self.next_pay = 0
        self.last_offset: dict[int, int] = {}  # partition -> last offset seen (order check)
        self._unknown: dict[str, int] = {}  # payment account ids the context does not know

    def feed(self, chunk: pl.DataFrame, where: str = "readings", first_row: int = 0) -> None:
        """A chunk of whole messages in arrival order (rows carry partition, offset, msg_ts_ms)."""
        if not chunk.height:
            return
        self._check_order(chunk, where, first_row)
        chunk = chunk.with_columns(msg=_message_index(chunk))
        ok, bad = timeguard.split_frame(chunk, self.bounds)
        if bad.height and self.job is not None:
            from pipelines.core.lookup import lookup

            bad = self.job.readings(bad, lookup(self.ctx))
        if bad.height:
            from pipelines.core.interval import REJECT_SCHEMA

            self.sink("rejected_readings", self._reasons(bad, self.bounds, REJECT_SCHEMA))
        firsts = chunk.group_by("msg", maintain_order=True).agg(pl.col("msg_ts_ms").first())
        msg_ts = firsts["msg_ts_ms"].fill_null(0).to_numpy()
        # the payments that arrived before each message: before the first later message
        pay_before: list[tuple[int, int, int]] = []  # (msg index, first payment, end payment)
        for m, ts in enumerate(msg_ts.tolist()):
            end = self.next_pay
            while end < self.pay_ts.size and self.pay_ts[end] < ts:
                end += 1
            if end > self.next_pay:
                pay_before.append((m, self.next_pay, end))
                self.next_pay = end
        self._bill(ok, len(msg_ts), pay_before)

    def finish(self) -> CoreState:
        """The payments that arrived after the last reading; returns the final state."""
        if self.next_pay < self.pay_ts.size:
            self._call(None, self.pay.slice(self.next_pay))
            self.next_pay = int(self.pay_ts.size)
        return self.state

    def _check_order(self, chunk: pl.DataFrame, where: str, first_row: int) -> None:
        problem = arrival_problem(chunk)
        if problem is not None:
            raise OrderError(f"{where}: {problem}")
        # in numpy, rows grouped by partition in file order (one stable sort): an offset lower
        # than the row before it in its partition, or a partition's first offset lower than the
        # last one an earlier chunk had, is out of order
        part = chunk.get_column("partition").cast(pl.Int64).to_numpy()
        off = chunk.get_column("offset").cast(pl.Int64).to_numpy()
        order = np.argsort(part, kind="stable")
        p_s, o_s = part[order], off[order]
        head = np.r_[True, p_s[1:] != p_s[:-1]]
        bad = np.zeros(part.size, dtype=bool)
        bad[1:] = ~head[1:] & (o_s[1:] < o_s[:-1])
        heads = np.flatnonzero(head)
        ends = np.r_[heads[1:], part.size]
        for h in heads.tolist():
            if o_s[h] < self.last_offset.get(int(p_s[h]), -1):
                bad[h] = True
        if bad.any():
            row = int(order[bad].min())
            raise OrderError(f"{where}: row {first_row + row + 1}: partition {part[row]} offset {off[row]} comes after "
                             f"a later offset: not in arrival order")
        for h, e in zip(heads.tolist(), ends.tolist(), strict=True):
            p = int(p_s[h])
            self.last_offset[p] = max(int(o_s[h:e].max()), self.last_offset.get(p, -1))

    def _bill(self, rows: pl.DataFrame, messages: int, pay_before: list[tuple[int, int, int]]) -> None:
        # one position per item in arrival order: the payments that arrived before message m, then m
        msg_pos = np.empty(messages, dtype=np.int64)
        pay_idx: list[int] = []  # index into self.pay of the chunk's payments, in order
        pay_pos: list[int] = []
        pos, j = 0, 0
        for m in range(messages):
            if j < len(pay_before) and pay_before[j][0] == m:
                for k in range(pay_before[j][1], pay_before[j][2]):
                    pay_idx.append(k)
                    pay_pos.append(pos)
                    pos += 1
                j += 1
            msg_pos[m] = pos
            pos += 1
        # entries per (message, account) and per payment, on integer account codes
        msg = rows.get_column("msg").to_numpy()
        codes, acc = self._codes(rows.get_column("circuit_id"))
        ts = rows.get_column("ts_ms").to_numpy()
        known = acc >= 0
        m_k, a_k, t_k = msg[known], acc[known], ts[known]
        order = _order_by(m_k, a_k)
        m_k, a_k, t_k = m_k[order], a_k[order], t_k[order]
        heads = np.flatnonzero(np.r_[True, (m_k[1:] != m_k[:-1]) | (a_k[1:] != a_k[:-1])]) if m_k.size else m_k
        e_pos = [msg_pos[m_k[heads]]] if m_k.size else []
        e_acc = [a_k[heads]] if m_k.size else []
        e_min = [np.minimum.reduceat(t_k, heads) * 2] if m_k.size else []
        e_max = [np.maximum.reduceat(t_k, heads) * 2 + 1] if m_k.size else []
        pays = self.pay[pay_idx] if pay_idx else self.pay.clear()
        if pays.height:
            p_ts = pays.get_column("ts_ms").to_numpy()
            e_pos.append(np.asarray(pay_pos, dtype=np.int64))
            e_acc.append(np.array([self._pay_code(x) for x in pays.get_column("account_id").to_list()], dtype=np.int64))
            e_min.append(p_ts * 2 - 1)
            e_max.append(p_ts * 2)
        found = segment_cuts(*(np.concatenate(x) for x in (e_pos, e_acc, e_min, e_max))) if e_pos else []
        cuts = [0, *found, pos]
        pay_pos_arr = np.asarray(pay_pos, dtype=np.int64)
        row_of_msg = np.searchsorted(msg, np.arange(messages + 1))  # rows are in message order
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            if lo >= hi:
                continue
            m0, m1 = (int(x) for x in np.searchsorted(msg_pos, [lo, hi]))
            p0, p1 = (int(x) for x in np.searchsorted(pay_pos_arr, [lo, hi]))
            r0, r1 = int(row_of_msg[m0]), int(row_of_msg[m1])
            readings = rows.slice(r0, r1 - r0) if r1 > r0 else None
            self._call(readings, pays.slice(p0, p1 - p0) if p1 > p0 else None, acc[r0:r1], codes[r0:r1])

    def _codes(self, circuits: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """(circuit rank, account rank) of each reading in the core's lookup, -1 for an unknown
        circuit: worked out once per chunk, for the cuts, a job's share and the core calls."""
        from pipelines.core.interval import _circuit_codes
        from pipelines.core.lookup import lookup

        lk = lookup(self.ctx)
        codes = _circuit_codes(circuits, lk.cindex)
        out = np.full(codes.size, -1, dtype=np.int64)
        known = codes >= 0
        out[known] = lk.circ_acc[codes[known]]
        return codes, out

    def _pay_code(self, account_id: str) -> int:
        """A payment's account code: its rank, or a code of its own past the ranks (unknown id)."""
        from pipelines.core.lookup import lookup

        lk = lookup(self.ctx)
        rank = lk.account_rank.get(account_id)
        if rank is None:
            rank = self._unknown.setdefault(account_id, len(lk.account_ids) + len(self._unknown))
        return rank

    def _call(self, readings: pl.DataFrame | None, payments: pl.DataFrame | None,
              accounts: np.ndarray | None = None, codes: np.ndarray | None = None) -> None:
        # the collector held for the whole call, as process_batch holds it for its own part: the
        # timer step and the outputs allocate per account too, and a collection they trigger walks
        # the whole state (about 2 s of a 35,000-merchant day)
        with gc_paused():
            self._call_held(readings, payments, accounts, codes)

    def _call_held(self, readings: pl.DataFrame | None, payments: pl.DataFrame | None,
                   accounts: np.ndarray | None, codes: np.ndarray | None) -> None:
        from pipelines.core.replay import replay_now, replay_tick

        if readings is None or not readings.height:
            from pipelines.core.interval import READING_SCHEMA

            readings = pl.DataFrame(schema=READING_SCHEMA)
        now = replay_now(readings, payments)  # the whole call's clock, also in a parallel job
        outs = []
        if self.job is not None:  # this job's accounts of the call
            from pipelines.core.lookup import lookup

            lk = lookup(self.ctx)
            if readings.height:
                if accounts is None:
                    readings = self.job.readings(readings, lk)
                else:
                    mask = self.job.accounts_mask(accounts, lk)
                    if not mask.all():
                        readings, accounts = readings.filter(pl.Series(mask)), accounts[mask]
                        codes = codes[mask] if codes is not None else None
            payments = self.job.by_account(payments)
            if payments is not None and not payments.height:
                payments = None
        if self.job is None or readings.height or payments is not None:  # a job's empty share changes nothing
            if codes is not None and codes.size != readings.height:
                codes = None
            self.state, out = process_batch(self.state, readings, payments, self.ctx, flush=False,
                                            circuit_codes=codes)
            outs.append(out)
        # the stream's timer: day postings and deferred trips due by the newest input time
        self.state, ticked = replay_tick(self.state, self.ctx, readings, payments, accounts, now=now)
        if ticked is not None:
            outs.append(ticked)
        if self.relay is not None:  # the relay commands, retries and ops alerts of this call's inputs
            self.relay.call(readings, payments, [o.commands for o in outs if o.commands.height],
                            now if now is not None else self.relay.clock)
            self.relay.flush()
        for name in OUTPUTS:
            for o in outs:
                frame = getattr(o, name)
                if frame.height:
                    self.sink(name, frame)
        self.progress.add(readings.height, int(readings["ts_ms"].max()) if readings.height else None)


def chunks_of(frame: pl.DataFrame, rows: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """(first row, chunk) of whole messages of about `rows` rows (a message is never split)."""
    yield from whole_messages((i, frame.slice(i, rows)) for i in range(0, frame.height, rows))


def whole_messages(chunks: Iterable[tuple[int, pl.DataFrame]]) -> Iterator[tuple[int, pl.DataFrame]]:
    """Re-cut chunks so that none ends inside a message (the last message waits for the next chunk)."""
    carry: pl.DataFrame | None = None
    carry_row = 0
    for first, chunk in chunks:
        if carry is not None:
            chunk, first = pl.concat([carry, chunk], how="vertical_relaxed"), carry_row
            carry = None
        if not chunk.height:
            continue
        last_p, last_o = chunk["partition"][-1], chunk["offset"][-1]
        tail = chunk.select(((pl.col("partition") == last_p) & (pl.col("offset") == last_o)).alias("t"))["t"]
        # the trailing run of the last message
        n_tail = int(tail.to_numpy()[::-1].argmin()) if not tail.all() else chunk.height
        if n_tail == chunk.height:
            carry, carry_row = chunk, first
            continue
        yield first, chunk.head(chunk.height - n_tail)
        carry, carry_row = chunk.tail(n_tail), first + chunk.height - n_tail
    if carry is not None and carry.height:
        yield carry_row, carry


def replay_arrival(ctx: RatingContext, readings: Iterable[tuple[int, pl.DataFrame]], payments: pl.DataFrame | None,
                   sink: Sink, *, state: CoreState | None = None, bounds: timeguard.Bounds | None = None,
                   progress: Progress | None = None, where: str = "readings", relay: Any = None,
                   job: JobFilter | None = None) -> CoreState:
    """Bill readings chunks (first row, frame) in arrival order with the payments merged in.
    With `relay` (a `pipelines.replay_relay.RelayReplay` over the recorded relay outcomes) the
    stream's power loop runs beside: relay commands with their retries, and ops alerts."""
    from pipelines.core.replay import time_bounds

    bounds = bounds or time_bounds(ctx)
    accepted = pl.DataFrame(schema={**payments_frame(None).schema, **{c: pl.Int64 for c in ARRIVAL_COLUMNS}})
    if payments is not None and payments.height:
        problem = arrival_problem(payments)
        if problem is not None:
            raise OrderError(f"payments: {problem}")
        accepted, late, refused = claim_in_order(payments, ctx, bounds)
        for frame in (late, refused):
            frame = job.by_account(frame) if job is not None else frame
            if frame.height:
                sink("rejected_payments", frame)
    if job is not None and relay is not None:
        raise ValueError("a parallel replay job cannot run the power loop (--outcomes)")
    run = ArrivalReplay(ctx, accepted, sink, state=state, bounds=bounds, progress=progress, relay=relay, job=job)
    for first, chunk in whole_messages(readings):
        run.feed(chunk, where, first)
    state = run.finish()
    if relay is not None:
        relay.finish()  # the outcomes that arrived after the last input
    run.progress.done()
    return state


def balances(state: CoreState) -> pl.DataFrame:
    ids = sorted(state.accounts)
    got = [state.accounts[a] for a in ids]
    # column by column (a frame from row tuples converts every value on its own: ~0.4 s at 35,000)
    return pl.DataFrame({
        "account_id": pl.Series(ids, dtype=pl.String),
        "balance_minor": pl.Series([s.balance for s in got], dtype=pl.Int64),
        "ec_owed_minor": pl.Series([s.ec_owed for s in got], dtype=pl.Int64),
        "debt_minor": pl.Series([s.debt for s in got], dtype=pl.Int64),
        "relay": pl.Series([s.relay for s in got], dtype=pl.String)})


def collect() -> tuple[dict[str, list[pl.DataFrame]], Sink]:
    """An in-memory sink (tests): name -> frames written."""
    store: dict[str, list[pl.DataFrame]] = {}

    def sink(name: str, frame: pl.DataFrame) -> None:
        store.setdefault(name, []).append(frame)
    return store, sink


def tables(store: dict[str, list[pl.DataFrame]]) -> dict[str, Any]:
    return {k: pl.concat(v, how="vertical_relaxed") for k, v in store.items()}
