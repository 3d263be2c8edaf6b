"""Chaos: the worker is killed at targeted points and rebalanced; what it published must equal
`mallwatt replay --arrival-order` of the same input as read back from Kafka, entry by entry.

- Portfolio: 8 malls x 1,000 merchants (about 1,000 accounts per partition: the size at which
  the old buckets of hundreds of accounts broke), one reading per circuit per cadence, stragglers
  older than the lateness window, one re-sent readings message per window, 30 % of payments
  sent twice by the provider, payments older than readings billed before them.
- Kill points (pipelines/faults.py, MALLWATT_FAULT): mid-step (between account writes or
  rounds; MALLWATT_ROWS_PER_ACCOUNT=1 makes every two-message step two rounds), after the
  state write before the offset commit, after the forwarder published before it committed; a
  second worker joins (1 -> 2) and is killed at a point too (2 -> 1).
- Comparison (pipelines/proof.compare): every raw ledger entry published (a re-publish must be
  an exact duplicate), the balance chain, every final balance (last balance_after, sum of
  entries, the worker's stored state from its changelog, the replay), relay commands, alerts.

Why the input is produced in lock-step (a window's readings, wait until they are committed,
its payments, wait until they are applied): readings and accepted payments reach an account
through two agents, so when both have a backlog (after a kill) the account's interleaving of
the two is a race, not a function of the input; no replay can reproduce a race. Lock-step
makes the order the stream applied equal the order the input arrived; the faults still hit
the middle of steps, writes and commits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from kafka_tail import TopicTail, decode_records

from infra import topics as T
from pipelines.context import build_context
from pipelines.envelope import Envelope
from pipelines.export_input import export_input
from pipelines.forwarder import CLAIMS_TABLE, changelog_topic
from pipelines.money_input import produce_payment
from pipelines.portfolio import dump_portfolio, parse_portfolio
from pipelines.proof import Published, Replayed, compare
from pipelines.proof_input import ProofInput, make_input
from schemas import codec, readings
from schemas.keys import shard_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MALLS, STALLS, CADENCES = 8, 1000, 8  # 8 windows: the suite's 20-minute budget
# MALLWATT_FAULT of each life of worker a, in order: it dies at the point and is restarted with
# the next (a restart costs about 40 s on the shared 2-core machine: the budget for lives)
LIVES_A = ["mid_step:2500", "after_state_write_before_commit:12", "forwarder_after_publish_before_commit:4", ""]
# b may hold a single partition (about 1,000 accounts a window) and, now that a run takes
# about 150 s, only a few windows: 400 account writes fall inside its first readings step
LIFE_B = "mid_step:400"  # b joins at window B_JOINS (1 -> 2 workers) and dies mid-step (2 -> 1)
B_JOINS = 2


def _ends(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


def _start_at_end(bootstrap: str, group: str) -> None:
    """Commit the group's offsets at the end of every worker input, as it is now: a broker
    that other tests (or earlier runs) used holds thousands of their messages, which a new
    group would otherwise read from the start and dead-letter (minutes of unrelated work
    before window 0, mistaken for a stall)."""
    from pipelines.worker import INPUT_TOPICS

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        ends = [TopicPartition(topic, p, end) for topic in INPUT_TOPICS for p, end in _ends(bootstrap, topic).items()]
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str, parts: list[int]) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in parts],
                                                                      timeout=10)}
    finally:
        consumer.close()


class Workers:
    """Worker processes with their fault plans; a dead one is restarted with its next life."""

    def __init__(self, config: Path, env: dict[str, str], logdir: Path) -> None:
        self.config, self.env, self.logdir = config, env, logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lives: dict[str, list[str]] = {}
        self.deaths: list[tuple[str, str, int]] = []  # (worker, fault, exit code)
        self.current: dict[str, str] = {}
        self.starts = 0
        self.unstuck: list[tuple[str, str]] = []  # (what was awaited, worker restarted)

    def start(self, name: str, lives: list[str]) -> None:
        self.lives[name] = list(lives)
        self._next(name)

    def _next(self, name: str) -> None:
        fault = self.lives[name].pop(0)
        self.starts += 1
        log = open(self.logdir / f"{name}-{self.starts}.log", "wb")  # noqa: SIM115
        env = {**self.env, "MALLWATT_FAULT": fault}
        self.current[name] = fault
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "worker", "--config", str(self.config)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tend(self) -> None:
        """Restart a worker that died, with its next life (none left: it stays down)."""
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            self.deaths.append((name, self.current[name], code))
            del self.procs[name]
            if self.lives[name]:
                self._next(name)

    def restart_stuck(self, what: str) -> None:
        """SIGKILL every running worker and start it again with the same fault plan, as an
        operator restarts a stuck worker. For the open commit-stall finding (docs/stream.md,
        Proof): after several kills a worker can stop committing one input partition's offsets.
        Effects once must still hold across the restart; the proof checks it."""
        for name, proc in list(self.procs.items()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            del self.procs[name]
            self.deaths.append((name, "", -signal.SIGKILL))  # no fault point: it counts as none fired
            self.lives[name].insert(0, self.current[name])  # the same life again, its fault still ahead
            self._next(name)
            self.unstuck.append((what, name))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def _wait(what: str, done: Callable[[], bool], workers: Workers, timeout: float = 240.0,
          unstick_after_s: float = 90.0) -> None:
    """Wait for `done`, restarting stuck workers once after `unstick_after_s` (logged, and
    reported by the test: a liveness finding, not an effects-once one)."""
    started = time.monotonic()
    deadline, restarted = started + timeout, False
    while time.monotonic() < deadline:
        workers.tend()
        if done():
            return
        if not restarted and time.monotonic() - started > unstick_after_s:
            print(f"chaos: no progress on {what} for {unstick_after_s:.0f} s; restarting the workers")
            workers.restart_stuck(what)
            restarted = True
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; deaths so far {workers.deaths}; "
                         f"restarted when stuck: {workers.unstuck}")


def _caught_up(bootstrap: str, group: str, topic: str, target: dict[int, int] | None = None) -> Callable[[], bool]:
    def check() -> bool:
        ends = target if target is not None else _ends(bootstrap, topic)
        committed = _committed(bootstrap, group, topic, list(ends))
        return all(committed.get(p, -1) >= end for p, end in ends.items() if end > 0)
    return check


def _members_with_partitions(bootstrap: str, group: str, count: int) -> Callable[[], bool]:
    """Whether `count` members of the group hold readings partitions (the rebalance that took
    one in ended)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def check() -> bool:
        try:
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        except Exception:  # the group is rebalancing or not known yet: look again
            return False
        holding = [m for m in description.members
                   if m.assignment and any(tp.topic == T.READINGS for tp in m.assignment.topic_partitions)]
        return len(holding) >= count
    return check


def _produce_window(producer: Producer, window: object, mall_of: dict[str, str], seq: list[int]) -> None:
    for shard, frame in window.readings:  # type: ignore[attr-defined]
        seq[0] += 1
        batch = readings.frame_to_batch(frame, batch_id=f"chaos/{shard}/{seq[0]}",
                                        collector_id="chaos", mall_id=mall_of[frame["account_id"][0]],
                                        shard=int(shard), seq=seq[0], collected_at_ms=int(frame["ts_ms"].max()))
        producer.produce(T.READINGS, key=shard_key(int(shard)), partition=int(shard),
                         value=codec.encode("ReadingBatch", batch))
    producer.flush(30)


def prove(published: Published, replayed: Replayed, ctx: Any, payment_ids: Any,
          evidence: Path | None = None) -> None:
    """The stream's outputs for this test's accounts equal the replay (pipelines.proof.compare),
    and every payment id was credited exactly once. On a difference, what was published is
    written to `evidence` (JSON lines, in publish order) beside the replay's parquet files."""
    mine = set(ctx.accounts)
    published.ledger = [e for e in published.ledger if e["account_id"] in mine]
    published.alerts = [a for a in published.alerts if a["account_id"] in mine]
    published.commands = [c for c in published.commands if c["account_id"] in mine]
    problems = compare(published, replayed, ctx)
    if problems and evidence is not None:
        evidence.mkdir(parents=True, exist_ok=True)
        for name in ("ledger", "alerts", "commands"):
            with open(evidence / f"{name}.jsonl", "w") as out:
                out.writelines(json.dumps(r, default=str) + "\n" for r in getattr(published, name))
        (evidence / "worker_balances.json").write_text(json.dumps(published.worker_balances or {}))
        problems.append(f"published outputs written to {evidence}")
    assert problems == [], "\n".join(problems)
    topups = {e["entry_id"] for e in published.ledger if e["kind"] == "topup"}
    assert len(topups) == len(payment_ids)


def replay_exported(config: Path, exported: Path, out: Path, env: dict[str, str]) -> Replayed:
    """`mallwatt replay --arrival-order` of input exported from Kafka, as the proof's reference."""
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "replay", "--arrival-order", "--quiet",
                           "--config", str(config), "--readings", str(exported / "readings.parquet"),
                           "--payments", str(exported / "payments.parquet"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = {name: pl.read_parquet(out / f"{name}.parquet") for name in
             ("ledger", "balances", "alerts", "commands", "rejected_readings")}
    return Replayed(table["ledger"], table["balances"], table["alerts"], table["commands"],
                    table["rejected_readings"])


def _worker_balances(bootstrap: str, app_id: str, went_back: list[str]) -> dict[str, int]:
    """The last stored state of every account, read from the worker's changelog. Every record
    of an account must build on its previous one (`updates` one more): `went_back` gets the
    records that were computed from an older state (a stale cache after a recovery did that)."""
    topic = changelog_topic(app_id)
    ends = _ends(bootstrap, topic)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    last: dict[bytes, bytes] = {}
    updates: dict[bytes, int] = {}
    left = {p for p, e in ends.items() if e > 0}
    while left:
        msg = consumer.poll(5.0)
        assert msg is not None, f"changelog {topic} ended early"
        if msg.error():
            continue
        last[msg.key()] = msg.value()
        n = Envelope.from_bytes(msg.value()).updates
        if n <= updates.get(msg.key(), -1):
            went_back.append(f"{msg.key().decode()}@{msg.partition()}:{msg.offset()} updates {n} after "
                             f"{updates[msg.key()]}")
        updates[msg.key()] = n
        if msg.offset() >= ends[msg.partition()] - 1:
            left.discard(msg.partition())
    consumer.close()
    out: dict[str, int] = {}
    for raw in last.values():
        for account, state in Envelope.from_bytes(raw).accounts.items():
            out[account] = state.balance
    return out


def _drain(tail: TopicTail, bootstrap: str, topic: str, begin: dict[int, int], timeout: float = 120.0) -> list[dict]:
    """Everything the tail's topic holds up to its end offsets of now (called once every output
    is forwarded), read to the last offset of every partition, never by a fixed wait."""
    ends = _ends(bootstrap, topic)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        positions = {tp.partition: tp.offset for tp in tail.consumer.position(tail.consumer.assignment())}
        if all(positions.get(p, -1) >= end for p, end in ends.items() if end > begin.get(p, 0)):
            return tail.seen
        msg = tail.consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        tail.seen += decode_records(tail.schema, msg.value())
    raise AssertionError(f"{topic}: not read to its end offsets {ends} within {timeout}s")


@pytest.mark.timeout(540)  # about 6 minutes on the shared, loaded 2-core machine: see docs/stream.md
def test_targeted_kills_match_arrival_order_replay(kafka_bootstrap: str, tmp_path: Path) -> None:
    started = time.monotonic()
    prefix = f"X{uuid.uuid4().hex[:4]}"
    partitions = T.default_partitions()
    inp: ProofInput = make_input(MALLS, STALLS, CADENCES, per_window=2, partitions=partitions, prefix=prefix)
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(inp.portfolio, config)
    ctx = build_context(parse_portfolio(inp.portfolio), partitions)
    assert len(ctx.accounts) >= 8000 and inp.readings_count > 60_000
    mall_of = {a: r.mall_id for a, r in ctx.rating.accounts.items()}

    app_id = f"chaos-{prefix}"
    start = {T.READINGS: _ends(kafka_bootstrap, T.READINGS), T.PAYMENTS: _ends(kafka_bootstrap, T.PAYMENTS)}
    _start_at_end(kafka_bootstrap, app_id)
    begin = {t: _ends(kafka_bootstrap, t) for t in (T.LEDGER, T.ALERTS, T.RELAY_COMMANDS)}  # tails start here
    tails = {"ledger": TopicTail(kafka_bootstrap, T.LEDGER, "LedgerBatch"),
             "alerts": TopicTail(kafka_bootstrap, T.ALERTS, "Alert"),
             "commands": TopicTail(kafka_bootstrap, T.RELAY_COMMANDS, "RelayCommand")}
    # The input carries no relay observations and no collector answers, so the power loop would
    # re-issue every trip and reconnect 60 s of stream time later (MALLWATT_RELAY_ACK_TIMEOUT_MS);
    # the stream clock is the producer's wall clock, so whether a retry fell inside the test
    # depended on how loaded the machine was, and replay does not model retries
    # (tests/integration/test_power_loop.py does): an hour keeps them out of this proof.
    env = {**os.environ, "MALLWATT_KAFKA": kafka_bootstrap, "MALLWATT_APP_ID": app_id,
           "MALLWATT_SESSION_TIMEOUT_S": "6", "MALLWATT_ROWS_PER_ACCOUNT": "1",
           # steps of more than 250 accounts are billed in parts, the worker checking between
           # parts that it still owns their partitions: the rebalances here meet steps mid-way
           "MALLWATT_PART_ACCOUNTS": os.environ.get("MALLWATT_CHAOS_PART_ACCOUNTS", "250"),
           "MALLWATT_RELAY_ACK_TIMEOUT_MS": "3600000", "MALLWATT_FAUST_DIR": str(tmp_path / "faust")}
    workers = Workers(config, env, tmp_path)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    seq = [0]
    try:
        workers.start("a", LIVES_A)
        for i, window in enumerate(inp.windows):
            if i == B_JOINS:
                workers.start("b", [LIFE_B])  # 1 -> 2 workers; b dies at its fault: 2 -> 1
                # b holds partitions before the window comes: a loaded machine started b so
                # slowly that a billed the last windows alone and b's fault was never reached
                _wait("b joined the group with partitions", _members_with_partitions(kafka_bootstrap, app_id, 2),
                      workers)
            _produce_window(producer, window, mall_of, seq)
            _wait(f"window {i} readings committed", _caught_up(kafka_bootstrap, app_id, T.READINGS), workers)
            for payment in window.payments:
                produce_payment(producer, payment, partitions)
            producer.flush(30)
            _wait(f"window {i} payments claimed", _caught_up(kafka_bootstrap, app_id, T.PAYMENTS), workers)
            _wait(f"window {i} accepted payments forwarded",
                  _caught_up(kafka_bootstrap, f"{app_id}-forwarder", changelog_topic(app_id, CLAIMS_TABLE)), workers)
            _wait(f"window {i} payments applied", _caught_up(kafka_bootstrap, app_id, T.PAYMENTS_ACCEPTED), workers)
        _wait("every output forwarded", _caught_up(kafka_bootstrap, f"{app_id}-forwarder", changelog_topic(app_id)),
              workers)
        published = Published(*(_drain(tails[k], kafka_bootstrap, topic, begin[topic]) for k, topic in
                                (("ledger", T.LEDGER), ("alerts", T.ALERTS), ("commands", T.RELAY_COMMANDS))))
    finally:
        workers.stop_all()
    fired = [(name, fault) for name, fault, code in workers.deaths if fault]
    assert sorted(f for _, f in fired) == sorted([f for f in LIVES_A if f] + [LIFE_B]), \
        f"not every fault point was reached: {workers.deaths}"
    assert all(code == -signal.SIGKILL for _, _, code in workers.deaths), workers.deaths
    went_back: list[str] = []
    published.worker_balances = _worker_balances(kafka_bootstrap, app_id, went_back)
    assert not went_back, f"{len(went_back)} state(s) computed from an older state: {went_back[:10]}"

    # the same input, as read back from Kafka, through `mallwatt replay --arrival-order`
    exported = tmp_path / "input"
    counts = export_input(kafka_bootstrap, exported, start)
    assert counts["readings"] == inp.readings_count
    assert counts["payments"] == sum(len(w.payments) for w in inp.windows)
    replayed = replay_exported(config, exported, tmp_path / "replay", env)

    prove(published, replayed, ctx, inp.payment_ids, tmp_path / "published")

    # the comparison saw the whole story: duplicates published, every payment id credited once
    assert replayed.ledger.height > 45_000 and published.commands and published.alerts
    print(f"chaos: {inp.readings_count} readings, {len(published.ledger)} ledger records published, "
          f"deaths {workers.deaths}, restarted when stuck {workers.unstuck}, {time.monotonic() - started:.0f} s")
    # liveness: a worker that stopped consuming an input (the commit stall, docs/stream.md
    # Proof, fix 3) fails the test after the money was proven across the restart
    assert not workers.unstuck, f"workers had to be restarted to make progress: {workers.unstuck}"
