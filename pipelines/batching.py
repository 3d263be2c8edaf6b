"""Billing steps over many input messages at once, from one or more partitions.

Why: the core and the state handling cost mostly per call and per account touched, so the
readings agent bills everything one `take` brought in a single step. Every row keeps the
partition and offset of its message, and every account's state belongs to one partition, so
the high-water marks still work per message: an account skips the messages at or below its
mark for its partition (a redelivery after a crash) and records the last one.

Bounded steps: a step gives an account at most ROWS_PER_ACCOUNT readings per round (whole
messages, so a mark never covers half a message). A backlog that brings more (a restart
behind hours of input) is billed in several rounds, each written before the next, so no
state value or output carries more than a round's outputs of one account.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from infra import topics as T
from pipelines.billing import payment_row, step
from pipelines.context import BillingContext
from pipelines.core import timeguard
from pipelines.core.priority import near_relay
from pipelines.envelope import Envelope, state_key
from schemas.keys import account_shard
from schemas.readings import batches_to_frame

#: Readings of one account per round of a step (bounds each state value's outbox).
ROWS_PER_ACCOUNT = int(os.environ.get("MALLWATT_ROWS_PER_ACCOUNT", 64))
#: Payments of one account per round of a step.
PAYMENTS_PER_ACCOUNT = 16
#: Accounts per part of a readings step (`parts`): the worker bills a step part by part and
#: lets its event loop run between parts. About 2 s of billing at 350,000 merchants; a live
#: step there (about 9,000 accounts) stays one part: each core call has a fixed cost (polars
#: plans; roughly 50 ms per call under cProfile at 35,000 merchants), so parts are for catch-up.
PART_ACCOUNTS = max(1, int(os.environ.get("MALLWATT_PART_ACCOUNTS", 16384)))
#: From this many accounts a step bills the accounts near their relay level in a first part
#: (`parts(first=...)`). A smaller step takes well under half a second, less than a second core
#: call's fixed cost would save the trips in it.
FIRST_MIN_ACCOUNTS = max(1, int(os.environ.get("MALLWATT_FIRST_MIN_ACCOUNTS", 4096)))


def source_of(topic: str, partition: int) -> str:
    """The name of an input partition in the high-water marks."""
    return f"{topic}:{partition}"


@dataclass
class Routed:
    """Readings that can be billed here, and the state keys (accounts) they touch."""

    frame: pl.DataFrame  # the batch's columns plus `partition`, `offset` (input message), `shard`, `bucket` (state key)
    buckets: list[str]
    rejected: list[tuple[int, int, str]]  # (partition, offset, why some readings of that message are refused)


def messages_frame(messages: list[tuple[int, int, Any]] | list[tuple[int, int, Any, int | None]]) -> pl.DataFrame:
    """The readings of (partition, offset, readings[, message timestamp ms]) messages as one
    frame, each row tagged with the partition and offset of its message, and with `msg_ts_ms`
    (the Kafka message timestamp, the reference of the time guard) when the tuples carry it.
    `readings`: a frame, or (the worker's) a decoded ReadingBatch that passed
    `schemas.readings.checked_batch`: then the step's frame is built once for all messages."""
    parts = [m[2] for m in messages]
    if parts and all(isinstance(p, dict) for p in parts):
        frame = batches_to_frame(parts)
        heights = [len(p["circuit_id"]) for p in parts]
    else:
        frame = pl.concat(parts, how="vertical_relaxed")
        heights = [p.height for p in parts]
    cols = {"partition": pl.Series(np.repeat(np.array([m[0] for m in messages], dtype=np.int64), heights)),
            "offset": pl.Series(np.repeat(np.array([m[1] for m in messages], dtype=np.int64), heights))}
    if messages and all(len(m) > 3 for m in messages):
        stamps = [m[3] for m in messages]  # type: ignore[misc]
        cols["msg_ts_ms"] = pl.Series([t for t, n in zip(stamps, heights, strict=True) for _ in range(n)],
                                      dtype=pl.Int64) if None in stamps else \
            pl.Series(np.repeat(np.array(stamps, dtype=np.int64), heights))
    return frame.with_columns(**cols)


def message_ts_ms(timestamp: float | None) -> int | None:
    """A faust/aiokafka message timestamp (float seconds) as epoch ms; None if the broker gave none."""
    return None if timestamp is None or timestamp <= 0 else int(round(timestamp * 1000))


def time_problem(ts_ms: int | None, msg_ts_ms: int | None, ctx: BillingContext) -> str | None:
    """Why a payment or posting (or operator command) stamped ``ts_ms`` must not reach the core,
    carried by a message stamped ``msg_ts_ms``; None when its time is acceptable."""
    return timeguard.problem(ts_ms, msg_ts_ms, ctx.time_bounds)


def guard_readings(frame: pl.DataFrame, ctx: BillingContext) -> tuple[pl.DataFrame, list[tuple[int, int, str]]]:
    """Readings whose time can be billed, and (partition, offset, reason) for messages with
    readings that cannot (future, before the tariff, absurd: pipelines.core.timeguard)."""
    ok, bad = timeguard.split_frame(frame, ctx.time_bounds)
    if not bad.height:
        return ok, []
    rejected = [(int(part), int(offset), "; ".join(timeguard.summarise(group, ctx.time_bounds)))
                for (part, offset), group in bad.partition_by("partition", "offset", as_dict=True,
                                                              maintain_order=True).items()]
    return ok, rejected


def route_readings(frame: pl.DataFrame, ctx: BillingContext, partition: int | None = None) -> Routed:
    """Join readings with their account's shard and bucket. A reading of an unknown circuit,
    one that arrived on a partition not owning its account, or one whose time cannot be true
    (`guard_readings`) is refused (per message); the rest of its message is billed."""
    if "offset" not in frame.columns:
        frame = frame.with_columns(offset=pl.lit(-1, pl.Int64))
    if partition is not None or "partition" not in frame.columns:
        frame = frame.with_columns(partition=pl.lit(partition if partition is not None else -1, pl.Int64))
    frame, rejected = guard_readings(frame, ctx)
    joined = _with_routes(frame, ctx)
    unknown = joined.filter(pl.col("bucket").is_null())
    wrong = joined.filter(pl.col("bucket").is_not_null() & (pl.col("shard") != pl.col("partition")))
    if not unknown.height and not wrong.height:
        return Routed(joined, joined["bucket"].unique().to_list(), rejected)
    for (part, offset), group in unknown.partition_by("partition", "offset", as_dict=True,
                                                      maintain_order=True).items():
        ids = group["circuit_id"].unique().sort().to_list()
        rejected.append((int(part), int(offset), f"{group.height} reading(s) of unknown circuit(s) {ids[:10]}"))
    for (part, offset), group in wrong.partition_by("partition", "offset", as_dict=True,
                                                    maintain_order=True).items():
        ids = group["circuit_id"].unique().sort().to_list()
        rejected.append((int(part), int(offset), f"{group.height} reading(s) on partition {part} belong to "
                                                 f"another shard: {ids[:10]}"))
    ok = joined.filter(pl.col("shard") == pl.col("partition"))
    return Routed(ok, ok["bucket"].unique().to_list(), sorted(rejected))


def near_relay_keys(keys: list[str], load: Callable[[str], Envelope], rating: Any) -> set[str]:
    """The step's state keys whose accounts a charge may soon trip (pipelines.core.priority),
    for `parts(first=...)`; none in a step under FIRST_MIN_ACCOUNTS (one part: nothing to put
    ahead, and the check costs a few microseconds per account)."""
    if len(keys) < FIRST_MIN_ACCOUNTS:
        return set()
    return {key for key in keys if any(near_relay(s, rating) for s in load(key).accounts.values())}


def parts(routed: Routed, max_accounts: int = PART_ACCOUNTS, first: frozenset[str] | set[str] = frozenset()
          ) -> list[tuple[frozenset[int], Routed]]:
    """A step's routed readings as parts of at most `max_accounts` accounts (as even as can
    be), with the input partitions of each part; every account's rows whole and in their
    order, without `rejected` (the caller reports the step's). In a step of FIRST_MIN_ACCOUNTS
    or more, the accounts of `first` (state keys) come first, in a part of their own (pipelines.core.priority:
    accounts whose relay may open soon). Accounts are billed independently (one state key
    each), so billing the parts one after another gives every account what one call would.

    Why: a catch-up step holds several cycles of a portfolio (several readings per account, so
    the per-account cost is shared), which at 350,000 merchants is a minute of billing; billed
    in one call it held the worker's event loop that long (timers, top-ups and the consumer's
    rebalance callbacks waited). Between parts the worker checks that it still owns their
    partitions."""
    frame = routed.frame
    if not frame.height:
        return []
    head: list[tuple[frozenset[int], Routed]] = []
    buckets = routed.buckets
    urgent = [key for key in buckets if key in first] if first and len(buckets) >= FIRST_MIN_ACCOUNTS else []
    if urgent and len(urgent) < len(buckets):
        chosen = frame["bucket"].is_in(urgent)
        ahead = frame.filter(chosen)
        head = [(frozenset(ahead["shard"].unique().to_list()), Routed(ahead, urgent, []))]
        frame = frame.filter(~chosen)
        taken = set(urgent)
        buckets = [key for key in buckets if key not in taken]
    accounts = len(buckets)
    if accounts <= max_accounts:
        return head + [(frozenset(frame["shard"].unique().to_list()), Routed(frame, buckets, []) if head else routed)]
    count = -(-accounts // max_accounts)
    # each account's number (by key) spread over `count` parts of nearly equal size
    frame = frame.with_columns(_part=(pl.col("bucket").rank("dense") - 1) * count // accounts)
    out = head
    for part in frame.partition_by("_part", maintain_order=True, include_key=False):
        out.append((frozenset(part["shard"].unique().to_list()), Routed(part, part["bucket"].unique().to_list(), [])))
    return out


#: Up to this many readings a step looks its circuits up one by one; above, it joins the
#: portfolio's route table (a join hashes all of it: ~50 ms per step at 350,000 circuits).
ROUTE_LOOKUP_ROWS = 100_000


def _with_routes(frame: pl.DataFrame, ctx: BillingContext) -> pl.DataFrame:
    """`frame` with the `shard` and `bucket` of each reading's circuit (null: unknown circuit),
    as `frame.join(ctx.circuit_routes, on="circuit_id", how="left")`."""
    if frame.height > ROUTE_LOOKUP_ROWS:
        return frame.join(ctx.circuit_routes, on="circuit_id", how="left")
    routes, parts = ctx.circuit_meter, ctx.partitions
    found: dict[str, tuple[int, str] | None] = {}  # per distinct circuit of the step
    for circuit in frame["circuit_id"].unique().to_list():
        route = routes.get(circuit)
        found[circuit] = None if route is None else (account_shard(route.account_id, parts),
                                                     state_key(route.account_id))
    rows = [found[c] for c in frame["circuit_id"].to_list()]
    return frame.with_columns(
        shard=pl.Series([r[0] if r else None for r in rows], dtype=pl.Int64),
        bucket=pl.Series([r[1] if r else None for r in rows], dtype=pl.String))


def apply_readings_many(envs: dict[str, Envelope], routed: Routed, ctx: BillingContext,
                        topic: str = T.READINGS, rows_per_account: int | None = None
                        ) -> list[dict[str, Envelope]]:
    """Bill the routed readings in rounds; returns the changed envelopes of each round, in the
    order they must be written (a later round builds on the earlier ones)."""
    if not routed.frame.height:
        return []
    limit = rows_per_account or ROWS_PER_ACCOUNT
    per_key = routed.frame.group_by("bucket").agg(pl.col("partition").first(), pl.col("offset").min().alias("first"),
                                                  pl.col("offset").max().alias("last"), pl.len().alias("rows"))
    # column-wise, one source name per partition: this runs for every account a step touches
    keys, parts = per_key["bucket"].to_list(), per_key["partition"].to_list()
    names = {part: source_of(topic, part) for part in set(parts)}
    key_sources = list(map(names.__getitem__, parts))
    sources = dict(zip(keys, key_sources, strict=True))
    marks = [envs[key].hwm.get(source, -1) for key, source in zip(keys, key_sources, strict=True)]
    frame = routed.frame
    # offsets are per partition: only an account whose own mark reaches its first row replays
    replays = bool((np.array(marks, dtype=np.int64) >= per_key["first"].to_numpy()).any()) if keys else False
    if replays:
        frame = frame.filter(pl.col("offset") > pl.col("bucket").replace_strict(
            dict(zip(keys, marks, strict=True)), return_dtype=pl.Int64))
    if not frame.height:
        return []
    reordered = _reordered(frame)
    if int(per_key["rows"].max()) <= limit and reordered is None:  # the live shape: one round
        if replays:
            return [_round(envs, frame, sources, ctx)]
        # every key keeps all its rows: its mark is its last offset
        positions = dict(zip(keys, zip(key_sources, per_key["last"].to_list(), strict=True), strict=True))
        mine = envs if len(envs) == len(positions) else {k: envs[k] for k in positions}  # (keys of envs, all)
        return [step(mine, frame, None, ctx, positions, now_ms=step_now(frame))]
    # whole messages per account and round: `before` counts the account's rows in earlier messages
    sizes = reordered if reordered is not None else (
        frame.group_by("bucket", "offset").len().sort("bucket", "offset")
        .with_columns(round=((pl.col("len").cum_sum().over("bucket") - pl.col("len")) // limit)))
    if reordered is not None:
        sizes = _arrival_rounds(reordered, limit)
    frame = frame.join(sizes.select("bucket", "offset", "round"), on=["bucket", "offset"], how="left",
                       maintain_order="left")
    rounds: list[dict[str, Envelope]] = []
    current = dict(envs)
    for (_,), part in frame.partition_by("round", as_dict=True, maintain_order=True, include_key=False).items():
        changed = _round(current, part, sources, ctx)
        current.update(changed)
        rounds.append(changed)
    return rounds


def _reordered(frame: pl.DataFrame) -> pl.DataFrame | None:
    """Per (account, message), its rows, min and max ts, when some message of an account is not
    newer than an earlier message of that account in this step (a late or re-sent reading);
    None otherwise (the common case).

    Why: one core call orders an account's readings by time and judges late and duplicate
    readings against the watermark of the whole call, so a straggler billed in the same call
    as the message before it would be billed, and refused as late one step later: the result
    would depend on how many messages a take brought. Such a message starts a new round, so a
    step bills exactly as message by message would, and `mallwatt replay --arrival-order`
    (pipelines.core.arrival.segments, the same rule) reproduces it."""
    if frame["offset"].n_unique() < 2:
        return None
    per = (frame.group_by("bucket", "offset").agg(pl.len(), lo=pl.col("ts_ms").min(), hi=pl.col("ts_ms").max())
           .sort("bucket", "offset"))
    prior = per.select(pl.col("hi").cum_max().shift(1).over("bucket"))["hi"]
    if not (per["lo"] <= prior).any():
        return None
    return per


def _arrival_rounds(per: pl.DataFrame, limit: int) -> pl.DataFrame:
    """Rounds of whole messages per account: a new one at `limit` rows or before a message
    not newer than the round's readings of that account (see `_reordered`)."""
    rounds: list[int] = []
    bucket, r, rows, newest = None, 0, 0, 0
    for b, length, lo, hi in per.select("bucket", "len", "lo", "hi").iter_rows():
        if b != bucket:
            bucket, r, rows, newest = b, 0, 0, hi
        elif rows + length > limit or lo <= newest:
            r, rows, newest = r + 1, 0, hi
        rows += length
        newest = max(newest, hi)
        rounds.append(r)
    return per.select("bucket", "offset").with_columns(round=pl.Series(rounds, dtype=pl.Int64))


def _round(envs: dict[str, Envelope], frame: pl.DataFrame, sources: dict[str, str], ctx: BillingContext
           ) -> dict[str, Envelope]:
    """One core call; each account records the last offset of its rows here as its mark."""
    last = frame.group_by("bucket").agg(pl.col("offset").max())
    positions = {key: (sources[key], offset) for key, offset in last.iter_rows()}
    return step({k: envs[k] for k in positions}, frame, None, ctx, positions, now_ms=step_now(frame))


def step_now(frame: pl.DataFrame) -> int | None:
    """A step's time: the newest Kafka message timestamp of its readings (None without one).
    Relay commands are stamped with it (pipelines.powerloop), never with a clock."""
    if "msg_ts_ms" not in frame.columns or frame["msg_ts_ms"].null_count() == frame.height:
        return None
    return int(frame["msg_ts_ms"].max())  # type: ignore[arg-type]


def apply_payments_many(envs: dict[str, Envelope], payments: list[tuple[int, int, dict[str, Any]]],
                        ctx: BillingContext, topic: str = T.PAYMENTS, now_ms: int | None = None
                        ) -> list[dict[str, Envelope]]:
    """(partition, offset, Payment) messages whose accounts own `envs`, in rounds of at most
    PAYMENTS_PER_ACCOUNT per account. An account skips payments at or below its mark.
    `now_ms` (the newest Kafka timestamp of the step's messages) stamps the relay commands."""
    rounds: list[list[dict[str, Any]]] = []
    positions: list[dict[str, tuple[str, int]]] = []
    count: dict[str, int] = {}
    taken: dict[tuple[str, str], int] = {}  # (account, source) -> last offset taken in this call
    for part, offset, payment in sorted(payments, key=lambda p: (p[0], p[1])):
        key = ctx.bucket_of(payment["account_id"])
        source = source_of(topic, part)
        # at or below the mark: applied before, or the same claimed payment published twice
        if envs[key].applied(source, offset) or taken.get((key, source), -1) >= offset:
            continue
        taken[key, source] = offset
        index = count.get(key, 0) // PAYMENTS_PER_ACCOUNT
        count[key] = count.get(key, 0) + 1
        if index == len(rounds):
            rounds.append([])
            positions.append({})
        positions[index][key] = (source, max(offset, positions[index].get(key, (source, -1))[1]))
        rounds[index].append(payment_row(payment))
    out: list[dict[str, Envelope]] = []
    current = dict(envs)
    for rows, where in zip(rounds, positions, strict=True):
        changed = step({k: current[k] for k in where}, None, rows, ctx, where, now_ms=now_ms)
        current.update(changed)
        out.append(changed)
    return out
