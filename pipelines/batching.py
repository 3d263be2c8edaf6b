"""Billing steps over many input messages at once, from one or more partitions.

Why: the core, the state (de)serialisation and every changelog write cost mostly per call,
so the readings agent bills everything one `take` brought in a single step. Every row
keeps the partition and offset of its message, and every state bucket belongs to one
partition, so the high-water marks still work per message: a bucket skips the messages at
or below its mark for its partition (a redelivery after a crash) and records the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from infra import topics as T
from pipelines.billing import payment_row, step
from pipelines.context import BillingContext
from pipelines.core import timeguard
from pipelines.envelope import Envelope


def source_of(topic: str, partition: int) -> str:
    """The name of an input partition in the high-water marks."""
    return f"{topic}:{partition}"


@dataclass
class Routed:
    """Readings that can be billed here, and the buckets they touch."""

    frame: pl.DataFrame  # the batch's columns plus `partition`, `offset` (input message), `shard`, `bucket`
    buckets: list[str]
    rejected: list[tuple[int, int, str]]  # (partition, offset, why some readings of that message are refused)


def messages_frame(messages: list[tuple[int, int, pl.DataFrame]] | list[tuple[int, int, pl.DataFrame, int | None]]
                   ) -> pl.DataFrame:
    """The readings of (partition, offset, frame[, message timestamp ms]) messages as one frame,
    each row tagged with the partition and offset of its message, and with `msg_ts_ms` (the
    Kafka message timestamp, the reference of the time guard) when the tuples carry it."""
    frame = pl.concat([m[2] for m in messages], how="vertical_relaxed")
    heights = [m[2].height for m in messages]
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
    joined = frame.join(ctx.circuit_routes, on="circuit_id", how="left")
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


def apply_readings_many(envs: dict[str, Envelope], routed: Routed, ctx: BillingContext,
                        topic: str = T.READINGS) -> dict[str, Envelope]:
    """One core call for every bucket the routed readings touch. Returns the changed envelopes."""
    if not routed.frame.height:
        return {}
    per_bucket = routed.frame.group_by("bucket").agg(pl.col("partition").first(), pl.col("offset").min().alias("first"),
                                                     pl.col("offset").max())
    positions = {key: (source_of(topic, part), last) for key, part, _, last in per_bucket.iter_rows()}
    marks = {key: envs[key].hwm.get(source, -1) for key, (source, _) in positions.items()}
    frame = routed.frame
    # offsets are per partition: only a bucket whose own mark reaches its first row replays
    if any(marks[key] >= first for key, _, first, _ in per_bucket.iter_rows()):
        frame = frame.filter(pl.col("offset") > pl.col("bucket").replace_strict(marks, return_dtype=pl.Int64))
    todo = frame["bucket"].unique().to_list()
    if not todo:
        return {}
    return step({k: envs[k] for k in todo}, frame, None, ctx, {k: positions[k] for k in todo})


def apply_payments_many(envs: dict[str, Envelope], payments: list[tuple[int, int, dict[str, Any]]],
                        ctx: BillingContext, topic: str = T.PAYMENTS) -> dict[str, Envelope]:
    """(partition, offset, Payment) messages whose accounts own `envs`, in one core call.
    A bucket skips payments at or below its mark (the wallet also refuses a payment id twice)."""
    rows: list[dict[str, Any]] = []
    positions: dict[str, tuple[str, int]] = {}
    for part, offset, payment in payments:
        key = ctx.bucket_of(payment["account_id"])
        source = source_of(topic, part)
        if envs[key].applied(source, offset):
            continue
        positions[key] = (source, max(offset, positions.get(key, (source, -1))[1]))
        rows.append(payment_row(payment))
    if not rows:
        return {}
    return step({k: envs[k] for k in positions}, None, rows, ctx, positions)
