"""The worker's readings step in-process, on live-shaped input at portfolio scale (a harness).

`python -m bench.worker_step --merchants 350000 --messages 256 --steps 6` builds (and caches)
the bench-scale portfolio, then bills steps of `--messages` ReadingBatch messages of the live
shape (bench/scale_input.py: one reading per circuit per cycle) exactly as the worker's
`bill_readings` does: decode, route, load each account's envelope (the worker's cache, or
RocksDB after a restart), bill in rounds, encode, write the changelog (with `--kafka`, through
pipelines.durable_table.ChangelogWriter to a private broker, waiting for the acks) and put the
acknowledged values into a RocksDB store (rocksdict, as faust's store). Prints readings/s and
microseconds per touched account; `--profile FILE` writes cProfile stats of the timed steps.

`--backlog N` stacks N cycles of the same messages into one step (a catch-up step: many
readings per account); `--cold` empties the cache before each timed step (a restart).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pickle
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from bench.scale_input import (
    LiveInput,
    Roster,
    choose_trip_accounts,
    opening_payments,
    write_portfolio,
)
from pipelines import batching, billing, powerloop
from pipelines.durable_table import ChangelogWriter, store_many
from pipelines.envelope import Envelope
from pipelines.gc_policy import StepCollector
from schemas import codec
from schemas.readings import batch_to_frame, checked_batch

CACHE = Path("/tmp/perf350k-portfolio")


def roster_of(merchants: int) -> Roster:
    where = CACHE / str(merchants)
    pick = where / "roster.pkl"
    if pick.exists():
        return pickle.loads(pick.read_bytes())
    roster = write_portfolio(merchants, where)
    pick.write_bytes(pickle.dumps(roster))
    return roster


class StepStore:
    """The worker's load/store/store_all and DurableTable's write path, without faust: each
    changed account is encoded, written to its partition, cached and its timer work noted
    (powerloop.next_due), and acknowledged values reach RocksDB as one batch per partition."""

    def __init__(self, directory: str, kafka: str | None, topic: str) -> None:
        from rocksdict import Options, Rdict

        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.dbs = {p: Rdict(f"{directory}/{p}", options=opts) for p in range(8)}
        self.data = _Data(self.dbs)
        self.parsed: dict[str, Envelope] = {}
        self.writer = ChangelogWriter(kafka) if kafka else None
        self.topic = topic
        self.unsent: dict[int, list[tuple[bytes, bytes | None]]] = {}  # without a broker: "acked" at written()
        self.due: dict[str, int] = {}

    def load(self, key: str) -> Envelope:
        hit = self.parsed.get(key)
        if hit is not None:
            return hit
        env = Envelope.from_bytes(self.data.get(key.encode()), outbox=False)
        self.parsed[key] = env
        return env

    def store_all(self, changed: dict[str, Envelope], ctx: Any) -> None:
        for key, env in changed.items():
            raw = env.to_bytes()
            k = key.encode()
            part = ctx.partition_of_key(key)
            if self.writer is None:
                self.unsent.setdefault(part, []).append((k, raw))
            else:
                self.writer.produce(self.topic, part, k, raw)
            self.parsed[key] = env.without_outbox()  # as the worker caches it
            when = powerloop.next_due(env, ctx)
            if when is None:
                self.due.pop(key, None)
            else:
                self.due[key] = when

    async def written(self) -> None:
        if self.writer is not None:
            await self.writer.wait(self.writer.mark())
            for (_, part), (writes, _) in self.writer.acked().items():
                store_many(self.data, part, writes)
        for part, writes in self.unsent.items():
            store_many(self.data, part, writes)
        self.unsent = {}

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class _Data:
    """faust's RocksDB store as store_locally and load use it."""

    def __init__(self, dbs: dict[int, Any]) -> None:
        self._dbs = dbs
        self._key_index: dict[bytes, int] = {}
        self.use_rocksdict = True

    def _db_for_partition(self, partition: int) -> Any:
        return self._dbs[partition]

    def get(self, key: bytes) -> bytes | None:
        part = self._key_index.get(key)
        return None if part is None else self._dbs[part].get(key)


class Msg:
    """What the step reads of a faust event."""

    def __init__(self, partition: int, offset: int, value: bytes, ts_ms: int) -> None:
        self.partition, self.offset, self.value, self.timestamp = partition, offset, value, ts_ms / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--merchants", type=int, default=350_000)
    p.add_argument("--messages", type=int, default=256, help="messages per step (of one cycle)")
    p.add_argument("--backlog", type=int, default=1, help="cycles of the same messages per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--kafka", default=None, help="bootstrap of a private broker for the changelog")
    p.add_argument("--profile", default=None)
    p.add_argument("--dir", default="/tmp/perf350k-store")
    p.add_argument("--cold", action="store_true",
                   help="empty the envelope cache before each timed step (a restarted worker: "
                        "every account read from RocksDB and parsed)")
    args = p.parse_args(argv)

    roster = roster_of(args.merchants)
    holder = billing.ContextHolder(roster.config, 8)
    ctx = holder.current()
    live = LiveInput(roster, 8, 60.0, choose_trip_accounts(roster, 100))
    shutil.rmtree(args.dir, ignore_errors=True)
    store = StepStore(args.dir, args.kafka, "perf350k-changelog")
    offsets = [0] * 8
    collector = StepCollector(entries=lambda: len(store.parsed))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def messages(cycle: int) -> list[Msg]:
        out = []
        for m in live.cycle(cycle)[:args.messages]:
            out.append(Msg(m.partition, offsets[m.partition], m.value, m.ts_ms))
            offsets[m.partition] += 1
        return out

    def bill(msgs: list[Msg]) -> tuple[int, int]:
        return loop.run_until_complete(bill_async(msgs))

    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.process_time()
        phases[name] = phases.get(name, 0.0) + now - since
        return now

    async def bill_async(msgs: list[Msg]) -> tuple[int, int]:
        t = time.process_time()
        decoded = [(m, checked_batch(codec.decode("ReadingBatch", m.value))) for m in msgs]
        frame = batching.messages_frame([(m.partition, m.offset, f, int(m.timestamp * 1000)) for m, f in decoded])
        t = lap("decode", t)
        routed = batching.route_readings(frame, ctx)
        t = lap("route", t)
        with collector.step():  # as the worker: a cold step's loads with the cycle collector off
            first = batching.near_relay_keys(routed.buckets, store.load, ctx.rating)
        for _, part in batching.parts(routed, first=first):  # as the worker: part by part (no await here)
            with collector.step():
                envs = {key: store.load(key) for key in part.buckets}
                t = lap("load", t)
                for changed in batching.apply_readings_many(envs, part, ctx):
                    t = lap("bill", t)
                    store.store_all(changed, ctx)
                    t = lap("store_all", t)
        await store.written()
        lap("written", t)
        return frame.height, len(routed.buckets)

    # opening credit for the accounts of the step's messages (as the bench's setup does)
    first = live.cycle(0)[:args.messages]
    accounts = set(pl.concat([batch_to_frame(codec.decode("ReadingBatch", m.value)) for m in first])["account_id"])
    pays = [(ctx.partition_of_key(p["account_id"]), i, p) for i, p in enumerate(opening_payments(live))
            if p["account_id"] in accounts]
    envs = {ctx.bucket_of(p[2]["account_id"]): store.load(ctx.bucket_of(p[2]["account_id"])) for p in pays}
    async def opening() -> None:
        for changed in batching.apply_payments_many(envs, pays, ctx, now_ms=None):
            store.store_all(changed, ctx)
        await store.written()
    loop.run_until_complete(opening())
    bill(messages(0))  # baselines
    cycle = 1
    prof = cProfile.Profile() if args.profile else None
    results = []
    phases.clear()
    for step_no in range(args.steps):
        if step_no == 1:
            phases.clear()  # the first timed step warms up: report the rest
        msgs = []
        for _ in range(args.backlog):
            msgs += messages(cycle)
            cycle += 1
        if args.cold:
            store.parsed.clear()
        t0 = time.process_time()
        if prof:
            prof.enable()
        readings, touched = bill(msgs)
        if prof:
            prof.disable()
        dt = time.process_time() - t0
        results.append((readings, touched, dt))
        print(f"step: {readings} readings, {touched} accounts, {dt * 1000:.0f} ms, {readings / dt:.0f} readings/s, "
              f"{dt / touched * 1e6:.0f} us/account", file=sys.stderr)
    if prof:
        prof.dump_stats(args.profile)
    steady = results[1:] or results
    readings = sum(r for r, _, _ in steady)
    secs = sum(d for _, _, d in steady)
    touched = sum(t for _, t, _ in steady)
    print(json.dumps({"readings_per_s": round(readings / secs), "us_per_account": round(secs / touched * 1e6, 1),
                      "readings_per_step": readings // len(steady), "accounts_per_step": touched // len(steady),
                      "us_per_account_by_phase": {k: round(v / touched * 1e6, 1) for k, v in phases.items()},
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
