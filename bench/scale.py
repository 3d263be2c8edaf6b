"""`mallwatt bench scale --merchants N --cadence-s S --json`: the stream at portfolio scale.

One run on a private broker: an N-merchant portfolio (one circuit each, malls of 700
stalls), the worker and its forwarder as in production (`mallwatt worker --no-forwarder`,
`mallwatt forward`), and live-shaped input: every circuit once per cadence, one
ReadingBatch per (mall, account shard) per poll cycle, spread over the cadence, so N/S
readings/s arrive; some top-ups each cycle; a few accounts with little credit that trip,
are topped up when their trip command appears, and trip again.

Phases (--phases, in this order):
- steady: --cadences cycles after one warm-up cycle. `sustained` when the worker group's
  lag on the readings topic (committed vs end offsets) stays below one cycle of messages
  and drains after the last cycle. Trip latency: produce time of a trip account's reading
  -> the Kafka time of the TRIP it causes on mallwatt.relay-commands. Changelog bytes (key +
  value) per reading and the worker's CPU (/proc) per 1,000 readings over these cycles.
- kill: SIGKILL the worker half-way through a cycle, restart it at once; `recovery_s` runs
  from the kill to the first changelog write of the new worker (its first billed step).
- catchup: stop the worker, produce --backlog-minutes of input at the live shape, start
  it; `catchup_readings_per_s` is the backlog over the time from its first changelog
  write to lag 0 (`catchup_startup_s` is the time before that first write).
- year: in-process, no Kafka: one account's stored state after 365 daily top-ups.
`max_value_bytes` is the largest changelog value or ledger/alert/relay-command message of
the run. `config_load_s` and `config_change_stall_ms` come from pipelines.roster_bench.

A worker that exits or logs a fatal error (e.g. MessageSizeTooLargeError) ends the Kafka
phases: the JSON says so in `failure`, the figures measured so far stay, and every process
the bench started is stopped. Progress goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from bench.scale_input import (
    T0,
    LiveInput,
    Message,
    choose_trip_accounts,
    opening_payments,
    payment,
    state_value_bytes_after_year,
    write_portfolio,
)
from bench.scale_kafka import (
    Monitor,
    Offsets,
    Processes,
    RelayTail,
    WorkerFailed,
    ledger_times,
    scan,
)
from collectors.publish import PRODUCER_DEFAULTS
from infra import broker
from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.core.claims import claim_key, claim_partition
from pipelines.forwarder import changelog_topic
from schemas import codec
from schemas.keys import shard_key

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("steady", "kill", "catchup", "year")
KAFKA_PHASES = ("steady", "kill", "catchup")
OUTPUT_TOPICS = (T.LEDGER, T.ALERTS, T.RELAY_COMMANDS)
APP_ID = "bench-scale"
KEYS = ("merchants", "workers", "circuits", "cadence_s", "offered_readings_per_s", "sustained", "steady_cadences",
        "max_lag_messages", "lag_limit_messages", "trip_samples", "trip_latency_ms_p50", "trip_latency_ms_p99",
        "trip_latency_ms_top",
        "changelog_bytes_per_reading", "max_value_bytes", "max_value_topic", "state_bytes_per_account",
        "recovery_s", "catchup_readings_per_s", "catchup_drained", "catchup_backlog_readings", "catchup_startup_s",
        "catchup_topups", "catchup_topup_ms_p50", "catchup_topup_ms_max",
        "worker_cpu_s_per_1k_readings", "forwarder_cpu_s_per_1k_readings", "worker_ready_s",
        "config_load_s", "config_change_stall_ms", "phases", "failure", "notes")


def first_attempt(command_id: str) -> bool:
    """Not a retry (`<root>:r<attempt>`, pipelines/core/relay.py). The bench's meters never
    report their relay open, so the power loop re-issues each trip after its ack timeout (60 s)
    with the same cause: counted as a trip, one such retry made a p99 of 60.5 s."""
    return RETRY_ID.search(command_id) is None


RETRY_ID = re.compile(r":r\d+$")


def log(text: str) -> None:
    print(f"[bench scale] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None


@dataclass
class Run:
    """One bench run against a running broker and worker."""

    args: argparse.Namespace
    bootstrap: str
    live: LiveInput
    procs: Processes
    result: dict[str, Any]
    producer: Producer = field(init=False)
    offsets: Offsets = field(init=False)
    monitor: Monitor = field(init=False)
    tail: RelayTail = field(init=False)
    changelog: str = changelog_topic(APP_ID)
    cycle: int = 0  # the next poll cycle to produce
    sent_ms: dict[tuple[str, int], float] = field(default_factory=dict)  # trip account, reading ts -> produce time
    recording: bool = False
    handled_trips: set[str] = field(default_factory=set)  # trip command ids already answered with a top-up
    payments_sent: int = 0
    largest: tuple[int, str | None] = (0, None)
    _checked_at: float = 0.0

    def __post_init__(self) -> None:
        self.producer = Producer(kafka_config(self.bootstrap, **{**PRODUCER_DEFAULTS}))
        self.offsets = Offsets(self.bootstrap, APP_ID)
        self.rng = random.Random(13)
        self.tripping = set(self.live.trip_accounts)

    def start_watchers(self) -> None:
        self.monitor = Monitor(self.bootstrap, APP_ID, T.READINGS, self.changelog)
        self.monitor.start()
        self.tail = RelayTail(self.bootstrap, T.RELAY_COMMANDS)
        self.tail.start()

    def close(self) -> None:
        for part in ("monitor", "tail"):
            if hasattr(self, part):
                getattr(self, part).stop()
        self.producer.flush(10)
        del self.producer  # before the broker stops, or librdkafka keeps reconnecting until exit
        self.offsets.close()

    # --- input -------------------------------------------------------------------------
    def send_payment(self, record: dict[str, Any]) -> None:
        # to the partition of its claim, as every producer of money input (pipelines/money_input.py)
        self._produce(T.PAYMENTS, claim_partition(record, self.live.partitions), claim_key(record).encode(),
                      codec.encode("Payment", record))
        self.payments_sent += 1

    def _produce(self, topic: str, partition: int, key: bytes, value: bytes, timestamp_ms: int = 0) -> None:
        while True:
            try:  # timestamp 0: the producer's clock, now
                self.producer.produce(topic, key=key, value=value, partition=partition, timestamp=timestamp_ms)
                return
            except BufferError:  # a backlog produced faster than the broker takes it
                self.producer.poll(0.05)

    def topups(self, n: int) -> None:
        """This cycle's top-ups: a few ordinary ones, and one for every trip account whose
        trip command has appeared since the last cycle (so it trips again a cycle later)."""
        ts = T0 + int(n * self.args.cadence_s * 1000)
        merchants = self.live.roster.merchants
        for i in range(max(1, len(merchants) // 2000)):
            account = self.rng.choice(merchants)
            self.send_payment(payment(f"bench-{n}-{i}", account, 5_000, ts))
        for cmd in list(self.tail.commands):
            if cmd.action == "TRIP" and cmd.account_id in self.tripping and cmd.command_id not in self.handled_trips:
                self.handled_trips.add(cmd.command_id)
                amount = 2 * self.live.cost_per_cycle_minor(cmd.account_id)
                self.send_payment(payment(f"bench-{n}-{cmd.command_id}", cmd.account_id, amount, ts))

    def send_reading(self, msg: Message, timestamp_ms: int = 0) -> None:
        self._produce(T.READINGS, msg.partition, shard_key(msg.partition), msg.value, timestamp_ms)
        if self.recording:
            now = time.time() * 1000
            for account in msg.trip_accounts:
                self.sent_ms[(account, msg.ts_ms)] = now
        self.producer.poll(0)

    def stream(self, cycles: int, *, paced: bool = True, during: Callable[[int, float], None] | None = None,
               stamped_from: float | None = None) -> int:
        """Produce `cycles` poll cycles; paced: each cycle's messages spread over the cadence,
        cycle k of this call starting k cadences after the call. Returns the readings sent.
        `during(cycle, fraction)` runs between messages; the worker is checked twice a second.
        `stamped_from` (epoch s): unpaced messages carry the Kafka timestamps they would have had
        produced live from then on (a backlog of N minutes is N minutes old at its start)."""
        cadence = self.args.cadence_s
        start = time.time()
        readings = 0
        for k in range(cycles):
            n = self.cycle
            self.cycle += 1
            if paced:
                self.topups(n)
            for msg in self.live.messages(n):
                if paced:
                    delay = start + (k + msg.slot) * cadence - time.time()
                    if delay > 0:
                        time.sleep(delay)
                stamp = 0 if stamped_from is None else int((stamped_from + (k + msg.slot) * cadence) * 1000)
                self.send_reading(msg, stamp)
                readings += msg.readings
                if paced:
                    self.tick()
                    if during:
                        during(k, msg.slot)
        self.producer.flush(60)
        return readings

    def tick(self) -> None:
        if time.monotonic() - self._checked_at >= 0.5:
            self._checked_at = time.monotonic()
            self.procs.check()

    def wait_drained(self, timeout_s: float, during: Callable[[], None] | None = None) -> float | None:
        """Until the worker group has committed every readings message produced so far;
        returns when (epoch s), or None after `timeout_s`. `during()` runs every 0.2 s."""
        ends = self.offsets.ends(T.READINGS)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.procs.check()
            if during:
                during()
            if self.offsets.lag(T.READINGS, ends) == 0:
                return time.time()
            time.sleep(0.2)
        return None

    def note(self, text: str) -> None:
        log(text)
        self.result["notes"].append(text)

    def see_values(self, topic: str, max_value: int) -> None:
        if max_value > self.largest[0]:
            self.largest = (max_value, topic)

    # --- phases ------------------------------------------------------------------------
    def setup(self) -> None:
        started = time.time()
        self.procs.start_forwarder()
        self.procs.start_worker()
        for record in opening_payments(self.live):
            self.send_payment(record)
        self.producer.flush(60)
        deadline = time.monotonic() + self.args.ready_timeout_s
        # claimed first (mallwatt.payments), then applied to the wallets (payments-accepted)
        for topic in (T.PAYMENTS, T.PAYMENTS_ACCEPTED):
            if topic == T.PAYMENTS_ACCEPTED:
                while self.offsets.ends(topic) == {} or sum(self.offsets.ends(topic).values()) < self.payments_sent:
                    self.procs.check()
                    if time.monotonic() > deadline:
                        raise WorkerFailed("the claims did not pass the opening top-ups on within "
                                           f"{self.args.ready_timeout_s}s")
                    time.sleep(0.5)
            ends = self.offsets.ends(topic)
            while self.offsets.lag(topic, ends):
                self.procs.check()
                if time.monotonic() > deadline:
                    raise WorkerFailed(f"the worker did not apply the opening top-ups within "
                                       f"{self.args.ready_timeout_s}s")
                time.sleep(0.5)
        self.result["worker_ready_s"] = round(time.time() - started, 1)
        log(f"worker ready after {self.result['worker_ready_s']} s (opening top-ups applied)")
        self.start_watchers()

    def steady(self) -> None:
        args, live = self.args, self.live
        log(f"steady: 1 warm-up + {args.cadences} cycles of {live.messages_per_cycle} messages "
            f"({live.readings_per_cycle} readings) every {args.cadence_s} s")
        self.stream(1)
        cl_start = self.offsets.ends(self.changelog)
        cpu0, fcpu0 = self.procs.worker_cpu_s(), self.procs.forwarder_cpu_s()
        began = time.time()
        self.recording = True
        readings = self.stream(args.cadences)
        self.recording = False
        ended = time.time()
        drained = self.wait_drained(max(60.0, 4 * args.cadence_s))
        cpu1, fcpu1 = self.procs.worker_cpu_s(), self.procs.forwarder_cpu_s()
        cl_end = self.offsets.ends(self.changelog)
        lags = [s.lag for s in self.monitor.since(began) if s.at <= ended]
        limit = live.messages_per_cycle
        r = self.result
        r.update(steady_cadences=args.cadences, lag_limit_messages=limit,
                 max_lag_messages=max(lags) if lags else None,
                 sustained=bool(drained is not None and lags and max(lags) < limit),
                 worker_cpu_s_per_1k_readings=round((cpu1 - cpu0) / readings * 1000, 4),
                 forwarder_cpu_s_per_1k_readings=round((fcpu1 - fcpu0) / readings * 1000, 4))
        if drained is None:
            self.note(f"steady: the worker had not caught up {max(60.0, 4 * args.cadence_s):.0f} s after the last cycle")
        time.sleep(min(3.0, args.cadence_s))  # the last trips reach the relay topic
        latencies, seen, slowest = [], set(), []
        for cmd in list(self.tail.commands):
            sent = self.sent_ms.get((cmd.account_id or "", cmd.cause_ts_ms))
            if cmd.action == "TRIP" and sent is not None and cmd.command_id not in seen and first_attempt(cmd.command_id):
                seen.add(cmd.command_id)
                latencies.append(cmd.produced_ms - sent)
                slowest.append((cmd.produced_ms - sent, round(sent / 1000, 1)))
        # the slowest trips with when their reading was sent (epoch s): to find them in the
        # worker's step log (MALLWATT_LOG_STEPS) when the tail is to be explained
        r.update(trip_samples=len(latencies), trip_latency_ms_p50=percentile(latencies, 0.5),
                 trip_latency_ms_p99=percentile(latencies, 0.99),
                 trip_latency_ms_top=[list(t) for t in sorted(slowest, reverse=True)[:5]])
        changelog = scan(self.bootstrap, self.changelog, cl_start, cl_end)
        self.see_values(self.changelog, changelog.max_value)
        r["changelog_bytes_per_reading"] = round(changelog.bytes / readings, 1)
        log(f"steady: max lag {r['max_lag_messages']} of {limit} messages, sustained={r['sustained']}, "
            f"trip p50/p99 {r['trip_latency_ms_p50']}/{r['trip_latency_ms_p99']} ms ({len(latencies)} trips), "
            f"changelog {r['changelog_bytes_per_reading']} B/reading, largest value {changelog.max_value} B")

    def kill(self) -> None:
        """SIGKILL the worker half-way through a live cycle and restart it at once."""
        cadence = self.args.cadence_s
        state: dict[str, Any] = {}

        def during(k: int, fraction: float) -> None:
            if k == 0 and fraction >= 0.5 and "killed_at" not in state:
                state["killed_at"] = self.procs.kill_worker()
                time.sleep(0.3)  # writes in flight at the kill land before the offsets are taken
                state["changelog"] = self.offsets.ends(self.changelog)
                self.procs.start_worker()
                log("kill: worker SIGKILLed and restarted")

        log("kill: live input goes on; the worker is SIGKILLed half-way through the first cycle")
        deadline = time.monotonic() + self.args.recovery_timeout_s
        self.stream(1, during=during)
        killed_at, at_kill = state["killed_at"], state["changelog"]

        def resumed() -> bool:  # every changelog partition written since the kill
            ends = self.offsets.ends(self.changelog)
            return bool(ends) and all(ends.get(p, 0) > at_kill.get(p, 0) for p in ends)

        # live input goes on until every partition is billed again, then two more cycles
        while not resumed():
            if time.monotonic() > deadline:
                raise WorkerFailed(f"not every partition billed within {self.args.recovery_timeout_s}s "
                                   "after the SIGKILL")
            self.stream(1)
        self.stream(2)
        # the first record of each partition after the kill: the last of those is when every
        # merchant was billed again (with several workers the others never stopped, so the
        # first record anywhere would time only the survivors)
        first = scan(self.bootstrap, self.changelog, at_kill,
                     {p: at_kill.get(p, 0) + 1 for p in self.offsets.ends(self.changelog)})
        assert first.last_ts_ms is not None
        self.result["recovery_s"] = round(first.last_ts_ms / 1000 - killed_at, 2)
        drained = self.wait_drained(max(120.0, 8 * cadence))
        log(f"kill: every partition billed again {self.result['recovery_s']} s after the SIGKILL; "
            f"{'caught up' if drained else 'NOT caught up'} with live input")
        if drained is None:
            self.note("kill: the restarted worker had not caught up with the live input")

    def catchup(self) -> None:
        args, live = self.args, self.live
        self.wait_drained(max(60.0, 4 * args.cadence_s))
        self.procs.stop_worker()
        # a worker that never caught up with the live input leaves some behind: part of the backlog
        behind = self.offsets.lag(T.READINGS) * live.readings_per_cycle // live.messages_per_cycle
        if behind:
            self.note(f"catchup: the worker was still ~{behind} readings behind the live input when stopped; "
                      "they count as backlog")
        cycles = max(1, math.ceil(args.backlog_minutes * 60 / args.cadence_s))
        log(f"catchup: worker stopped; producing a {args.backlog_minutes}-minute backlog "
            f"({cycles} cycles, {cycles * live.readings_per_cycle} readings)")
        for n in range(cycles):  # top-ups belong to the backlog too
            self.send_payment(payment(f"backlog-{self.cycle + n}", self.rng.choice(live.roster.merchants), 5_000,
                                      T0 + int((self.cycle + n) * args.cadence_s * 1000)))
        # stamped as produced live over the outage: the worker judges a backlog by its messages'
        # age (pipelines/take.py, CATCHUP_AFTER_S), and a backlog produced in a burst looked
        # seconds old, so the restarted worker took a minute of live-size steps first
        backlog = self.stream(cycles, paced=False, stamped_from=time.time() - cycles * args.cadence_s) + behind
        cl_before = self.offsets.ends(self.changelog)
        ledger_before = self.offsets.ends(T.LEDGER)
        messages = self.offsets.lag(T.READINGS)
        started = time.time()
        self.procs.start_worker()
        topups = CatchupTopups(self, T0 + int(self.cycle * args.cadence_s * 1000))
        done = self.wait_drained(args.drain_timeout_s, during=topups.maybe_send)
        left = self.offsets.lag(T.READINGS) if done is None else 0
        until = done or time.time()
        ends = self.offsets.ends(self.changelog)
        first = scan(self.bootstrap, self.changelog, cl_before,
                     {p: cl_before.get(p, 0) + 1 for p, e in ends.items() if e > cl_before.get(p, 0)})
        self.result["catchup_backlog_readings"] = backlog
        if first.first_ts_ms is None:
            raise WorkerFailed(f"the restarted worker billed nothing within {args.drain_timeout_s}s")
        self.result["catchup_startup_s"] = round(first.first_ts_ms / 1000 - started, 2)
        self.result["catchup_drained"] = done is not None
        if done is None:  # the rate so far, from the messages drained
            self.note(f"catchup: {left} of {messages} backlog messages were still waiting after "
                      f"{args.drain_timeout_s:.0f} s; catchup_readings_per_s is the rate until then")
        drained = backlog * (messages - left) / max(1, messages)
        rate = drained / max(0.001, until - first.first_ts_ms / 1000)
        self.result["catchup_readings_per_s"] = round(rate)
        log(f"catchup: {drained:.0f} of {backlog} readings drained at {rate:.0f} readings/s "
            f"({rate / (live.readings_per_cycle / args.cadence_s):.1f}x the offered rate) after "
            f"{self.result['catchup_startup_s']} s of start-up")
        topups.measure(ledger_before)

    def outputs(self) -> None:
        """The largest output message of the run (ledger, alerts, relay commands)."""
        for topic in OUTPUT_TOPICS:
            ends = self.offsets.ends(topic)
            self.see_values(topic, scan(self.bootstrap, topic, {}, ends).max_value)
        # the changelog: all of it (the steady phase scanned only its own cycles)
        self.see_values(self.changelog, scan(self.bootstrap, self.changelog, {}, self.offsets.ends(self.changelog)).max_value)


class CatchupTopups:
    """Merchants topping up while the worker drains a backlog: one top-up every EVERY_S from
    the worker's restart until the backlog is drained, and how long each took to be credited
    (its ledger entry published; a top-up waits for the catch-up step that runs when it comes,
    docs/stream.md)."""

    EVERY_S = 5.0
    WAIT_S = 120.0  # for the last top-ups' credits after the drain

    def __init__(self, bench: Any, ts_ms: int) -> None:
        self.bench, self.ts_ms = bench, ts_ms
        self.sent: dict[str, float] = {}  # payment id -> sent (epoch ms)
        self.next_at = time.monotonic()

    def maybe_send(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at += self.EVERY_S
        bench = self.bench
        payment_id = f"catchup-topup-{len(self.sent)}"
        bench.send_payment(payment(payment_id, bench.rng.choice(bench.live.roster.merchants), 5_000, self.ts_ms))
        bench.producer.poll(0)
        self.sent[payment_id] = time.time() * 1000

    def measure(self, ledger_before: dict[int, int]) -> None:
        bench, r = self.bench, self.bench.result
        bench.producer.flush(60)
        found: dict[str, int] = {}
        deadline = time.monotonic() + self.WAIT_S
        while len(found) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(2.0)
            found = ledger_times(bench.bootstrap, T.LEDGER, ledger_before, bench.offsets.ends(T.LEDGER),
                                 set(self.sent))
        waits = [found[i] - sent for i, sent in self.sent.items() if i in found]
        r.update(catchup_topups=len(self.sent), catchup_topup_ms_p50=percentile(waits, 0.5) if waits else None,
                 catchup_topup_ms_max=round(max(waits), 1) if waits else None)
        if len(found) < len(self.sent):
            bench.note(f"catchup: {len(self.sent) - len(found)} of {len(self.sent)} top-ups sent during the "
                       f"catch-up were not credited within {self.WAIT_S:.0f} s of its end")
        log(f"catchup: {len(self.sent)} top-ups during it credited after p50 {r['catchup_topup_ms_p50']} ms, "
            f"max {r['catchup_topup_ms_max']} ms")


def config_figures(merchants: int, result: dict[str, Any]) -> None:
    try:
        from pipelines.roster_bench import measure  # type: ignore[import-not-found]
    except ImportError:
        result["notes"].append("config_load_s/config_change_stall_ms: pipelines.roster_bench is not on this branch")
        return
    figures = measure(merchants)
    if isinstance(figures, dict):
        result["config_load_s"] = figures.get("config_load_s")
        result["config_change_stall_ms"] = figures.get("config_change_stall_ms")
    else:
        result["config_load_s"], result["config_change_stall_ms"] = figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mallwatt bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merchants", type=int, default=35_000, help="merchants, one circuit each (default 35000)")
    parser.add_argument("--cadence-s", type=float, default=15.0, help="poll cycle: every circuit once per (default 15)")
    parser.add_argument("--cadences", type=int, default=5, help="steady cycles measured (default 5)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {','.join(PHASES)}")
    parser.add_argument("--backlog-minutes", type=float, default=10.0, help="catch-up backlog (default 10)")
    parser.add_argument("--trip-accounts", type=int, help="accounts kept tripping (default N/350, 20..100)")
    parser.add_argument("--port", type=int, default=29300, help="private broker port (+1 for its controller)")
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "bench-scale", help="work directory (emptied)")
    parser.add_argument("--keep-broker", action="store_true", help="leave the private broker running")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--recovery-timeout-s", type=float, default=300.0)
    parser.add_argument("--drain-timeout-s", type=float, default=900.0)
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the worker, e.g. MALLWATT_LOG_STEPS=1; repeatable (set by default: "
                        "MALLWATT_STORE=rocksdb:// and MALLWATT_WORKER_NAME=bench-worker, as in production)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes in the group (default 1); each has its own name, RocksDB "
                        "directory and share of the partitions (docs/stream.md, Scale-out); the kill phase "
                        "kills the first")
    parser.add_argument("--json", action="store_true", help="print only the JSON figures on stdout (always so)")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {unknown}; known: {', '.join(PHASES)}")
    if args.merchants < 1 or args.cadence_s <= 0 or args.cadences < 1 or args.workers < 1:
        parser.error("--merchants, --cadence-s, --cadences and --workers must be positive")
    args.dir = args.dir.resolve()  # the broker runs in its data directory
    # as a production worker runs (docs/stream.md, Recovery): RocksDB local state, a stable name
    args.env = {"MALLWATT_STORE": "rocksdb://", "MALLWATT_WORKER_NAME": "bench-worker"}
    for item in args.worker_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--worker-env {item!r}: expected NAME=VALUE")
        args.env[name] = value
    return args


def run_kafka_phases(args: argparse.Namespace, result: dict[str, Any]) -> None:
    kafka = broker.BrokerConfig(data_dir=args.dir / "kafka", port=args.port, controller_port=args.port + 1)
    procs: Processes | None = None
    run: Run | None = None
    phase = "portfolio"
    try:
        log(f"writing the {args.merchants}-merchant portfolio")
        roster = write_portfolio(args.merchants, args.dir)
        trip_count = args.trip_accounts or max(20, min(100, args.merchants // 350))
        live = LiveInput(roster, T.default_partitions(), args.cadence_s, choose_trip_accounts(roster, trip_count))
        result.update(circuits=live.readings_per_cycle,
                      offered_readings_per_s=round(live.readings_per_cycle / args.cadence_s, 1))
        phase = "broker"
        log(f"starting a private broker on port {args.port}")
        bootstrap = broker.start(kafka).bootstrap
        T.provision_topics(bootstrap)
        T.wait_until_served(bootstrap)
        env = {"MALLWATT_KAFKA": bootstrap, "MALLWATT_APP_ID": APP_ID,
               "MALLWATT_FAUST_DIR": str(args.dir / "faust"), **args.env}
        procs = Processes(args.dir, env, roster.config, workers=args.workers)
        phase = "setup"
        run = Run(args, bootstrap, live, procs, result)
        run.setup()
        for phase in (p for p in KAFKA_PHASES if p in args.phases):
            getattr(run, phase)()
            result["phases"].append(phase)
        phase = "outputs"
        try:
            run.outputs()
        except (KafkaException, RuntimeError) as exc:  # a figure missing, not a failed run
            run.note(f"max_value_bytes covers only the steady cycles: the full scan failed ({exc})")
    except (WorkerFailed, KafkaException, RuntimeError, OSError, ValueError) as exc:  # BrokerError is a RuntimeError
        result["failure"] = {"phase": phase, "error": str(exc)}
        log(f"FAILED in {phase}: {exc}")
    finally:
        if run is not None:
            if run.largest[0]:
                result["max_value_bytes"], result["max_value_topic"] = run.largest
            run.close()
        if procs is not None:
            procs.close()
        if args.keep_broker:
            log(f"broker left running: MALLWATT_KAFKA_PORT={args.port} MALLWATT_KAFKA_CONTROLLER_PORT="
                f"{args.port + 1} MALLWATT_KAFKA_DATA_DIR={kafka.data_dir} mallwatt stack down")
        else:
            broker.stop(kafka)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the cleanup always stops what the bench started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = dict.fromkeys(KEYS)
    result.update(merchants=args.merchants, workers=args.workers, cadence_s=args.cadence_s, phases=[], notes=[])
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    if any(p in args.phases for p in KAFKA_PHASES):
        run_kafka_phases(args, result)
    try:  # the figures measured so far are printed whatever happens here
        if "year" in args.phases:
            log("year: 365 daily top-ups and hourly readings for one account, in-process")
            result["state_bytes_per_account"] = state_value_bytes_after_year()
            result["phases"].append("year")
        config_figures(args.merchants, result)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, not as a traceback
        result["failure"] = result["failure"] or {"phase": "in-process", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 1 if result["failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
