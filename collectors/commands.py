"""Relay commands from Kafka, executed on the meters this collector owns.

Consumer group per collector id; every collector reads the whole topic and keeps the
commands for its own meters (the key is the gateway id, and a gateway belongs to one
collector). Execution goes through collectors.relay.RelayController, which uses the
poller's GatewayLink: the write and the read-back wait for the same bus lock as the
polls, so the RS-485 line never sees two requests at once and no second connection is
opened. Gateways execute in parallel, one command at a time each, in topic order.

The outcome is spooled (durable) before the command's offset is committed, and the
command id is then appended to a command log in the spool folder (`commands.jsonl`). A
restart loads the log, so a redelivered command is neither executed nor published again:
each command id gets one outcome on Kafka. Only a crash between the spool write and the
log append (microseconds) re-executes a command; that is harmless because a relay write
is idempotent in effect and the repeated outcome carries the same command_id.

Commands older than `max_age_s` (by `issued_at_ms` against the collector clock) are not
executed: a trip queued during a long outage may no longer be wanted. They get a FAILED
outcome ("expired"), so the issuer learns about it instead of waiting.

A consumer group with no committed offsets (a new collector id) starts `lookback_s`
before now (by message timestamp), not at the end of the topic: a command produced
while the new collector was starting would otherwise be skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from collectors.mapping import CollectorPlan
from collectors.poller import UNKNOWN
from collectors.publish import ReadingPublisher
from collectors.relay import FAILED, RelayController, RelayOutcome
from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.signing import Verifier, relay_verifier
from pipelines.start_retry import retry_start
from schemas import codec
from schemas.codec import DecodeError

log = logging.getLogger(__name__)


def outcome_record(o: RelayOutcome, mall_id: str, gateway_id: str) -> dict[str, Any]:
    detail = o.detail + (" (repeated command id: first outcome)" if o.duplicate else "")
    return {"command_id": o.command_id, "action": o.action, "status": o.status,
            "mall_id": mall_id, "gateway_id": gateway_id, "meter_id": o.meter_id,
            "relay_after": o.relay_after, "attempts": o.attempts, "ts_ms": o.ts_ms,
            "detail": detail}


class CommandLog:
    """Executed command ids and their outcomes, one JSON line each, fsync'd per append.

    Keeps the last `remember` entries: when the file holds twice that many it is
    rewritten (tmp file, fsync, rename) with the newest `remember`.
    """

    def __init__(self, path: str | Path, remember: int = 10_000) -> None:
        self.path = Path(path)
        self.remember = remember
        self.entries: OrderedDict[str, RelayOutcome] = OrderedDict()
        self._lines = 0
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # torn append: cut it, or the next
                text = text[:text.rfind("\n") + 1]  # append would share its line
                with open(self.path, "r+") as fh:
                    fh.truncate(len(text.encode()))
                    os.fsync(fh.fileno())
            for line in text.splitlines():
                try:
                    o = RelayOutcome(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a torn last line from a crash mid-append
                self.entries[o.command_id] = o
                self.entries.move_to_end(o.command_id)
                self._lines += 1
        while len(self.entries) > remember:
            self.entries.popitem(last=False)

    def append(self, outcome: RelayOutcome) -> None:
        o = RelayOutcome(**{**asdict(outcome), "duplicate": False})
        self.entries[o.command_id] = o
        self.entries.move_to_end(o.command_id)
        while len(self.entries) > self.remember:
            self.entries.popitem(last=False)
        if self._lines >= 2 * self.remember:
            self._rewrite()
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(asdict(o)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._lines += 1

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(asdict(o)) + "\n" for o in self.entries.values())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self.entries)


# how long a rebalance's start-offset lookup is retried (well under max.poll.interval.ms)
START_RETRY_S = 60.0


class CommandExecutor:
    def __init__(self, relay: RelayController, publisher: ReadingPublisher,
                 plan: CollectorPlan, *, bootstrap: str | Callable[[], str],
                 collector_id: str, group_id: str | None = None,
                 offset_reset: str = "lookback", lookback_s: float = 300.0,
                 max_age_s: float | None = 300.0, log: CommandLog | None = None,
                 batch: int = 100, verifier: Verifier | None | str = "env") -> None:
        """`verifier`: the keys a command must be signed by ("env": pipelines.signing's
        MALLWATT_RELAY_VERIFY_KEYS or the local key; None only for tests of other parts)."""
        self.verifier = relay_verifier() if verifier == "env" else verifier
        self.refused = 0
        self.relay = relay
        self.publisher = publisher
        self.plan = plan
        self.collector_id = collector_id
        self.group_id = group_id or f"mallwatt-collector-{collector_id}"
        self._bootstrap = bootstrap
        if offset_reset not in ("lookback", "latest", "earliest"):
            raise ValueError(f"offset_reset {offset_reset!r}: lookback | latest | earliest")
        self.offset_reset = offset_reset
        self.lookback_s = lookback_s
        self.max_age_s = max_age_s
        self.log = log
        if log is not None:
            for o in log.entries.values():
                relay.remember_outcome(o)
        self.batch = batch
        self.consumer: Consumer | None = None
        self.executed = self.ignored = self.invalid = self.repeated = self.expired = 0
        assert self.verifier is None or isinstance(self.verifier, Verifier), "verifier: a Verifier, None or 'env'"
        self.assigned = 0  # partitions of the command topic this member reads
        self.start_offsets: dict[int, int] = {}  # partition -> first offset read
        self.by_status: dict[str, int] = {}

    def _connect(self) -> Consumer:
        addr = self._bootstrap() if callable(self._bootstrap) else self._bootstrap
        reset = "earliest" if self.offset_reset == "lookback" else self.offset_reset
        c = Consumer(kafka_config(addr, **{"group.id": self.group_id,
                      "enable.auto.commit": False, "auto.offset.reset": reset,
                      # a slow trip (timeouts, retries) must not look like a dead member
                      "max.poll.interval.ms": 300_000}))
        c.subscribe([T.RELAY_COMMANDS], on_assign=self._on_assign)
        return c

    def _on_assign(self, consumer: Consumer, partitions: list) -> None:
        if self.offset_reset == "lookback":
            partitions = self._lookback_starts(consumer, partitions)
            consumer.assign(partitions)
        self.start_offsets = {tp.partition: tp.offset for tp in partitions}
        self.assigned = len(partitions)

    def _lookback_starts(self, consumer: Consumer, partitions: list) -> list[TopicPartition]:
        """Committed offsets win; a partition without one starts `lookback_s` ago. A broker
        that answers "not leader" for a moment (seen in CI on a fresh topic) is asked again
        for up to `START_RETRY_S`: an exception here would end the command loop."""
        def lookup() -> tuple[list[TopicPartition], dict[int, int]]:
            committed = consumer.committed(partitions, timeout=10)
            fresh = [tp for tp in committed if tp.offset < 0]
            since = int((time.time() - self.lookback_s) * 1000)
            found = {tp.partition: tp.offset for tp in consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, since) for tp in fresh], timeout=10)
            } if fresh else {}
            return committed, found

        looked_up = retry_start(threading.Event(), lookup, "relay commands: start offsets",
                                give_up_after_s=START_RETRY_S)
        assert looked_up is not None  # never stopped: it returns or raises
        committed, found = looked_up
        start = []
        for tp in committed:
            off = tp.offset if tp.offset >= 0 else found.get(tp.partition, -1)
            # no message since `since`: start at the end, like "latest"
            start.append(TopicPartition(tp.topic, tp.partition, off if off >= 0 else OFFSET_END))
        return start

    def _mine(self, cmd: dict[str, Any]) -> bool:
        return cmd["mall_id"] == self.plan.mall_id and self.plan.owns(cmd["meter_id"])

    def _refused(self, cmd: dict[str, Any]) -> RelayOutcome | None:
        """A command not signed by a key this collector trusts is never executed: it is
        answered FAILED with the reason (recorded in the spool and the command log like any
        outcome) and reported as a `command_refused` event, which ops see as an alert."""
        if self.verifier is None:
            return None
        problem = self.verifier.problem(cmd)
        if problem is None:
            return None
        self.refused += 1
        self.publisher.event("command_refused", gateway_id=self.plan.gateway_of(cmd["meter_id"]),
                             meter_id=cmd["meter_id"], detail=f"{problem}: {cmd['action']} {cmd['command_id']} "
                             f"(requested by {cmd.get('requested_by')!r})")
        return RelayOutcome(cmd["command_id"], cmd["meter_id"], cmd["action"], FAILED, UNKNOWN, 0,
                            self.relay.poller.clock(), f"refused: {problem}, not executed")

    def _expired(self, cmd: dict[str, Any]) -> RelayOutcome | None:
        if self.max_age_s is None:
            return None
        now = self.relay.poller.clock()
        age_s = (now - cmd["issued_at_ms"]) / 1000.0
        if age_s <= self.max_age_s:
            return None
        return RelayOutcome(cmd["command_id"], cmd["meter_id"], cmd["action"], FAILED,
                            UNKNOWN, 0, now, f"expired: issued {age_s:.0f}s ago "
                            f"(max {self.max_age_s:.0f}s), not executed")

    async def _execute_gateway(self, gateway_id: str, cmds: list[dict[str, Any]]) -> None:
        for cmd in cmds:  # in topic order: a TRIP then a RECONNECT must not swap
            known = self.relay.outcome_of(cmd["command_id"])
            o = None if known else self._refused(cmd)
            if o is None and not known:
                o = self._expired(cmd)
                if o is not None:
                    self.expired += 1
            if o is not None:
                self.relay.remember_outcome(o)
            else:
                o = await self.relay.execute(cmd["command_id"], cmd["meter_id"],
                                             cmd["action"])
            if o.duplicate:
                self.repeated += 1  # its outcome is on Kafka (or in the spool) already
                continue
            self.publisher.outcome(outcome_record(o, self.plan.mall_id, gateway_id),
                                   self.plan.account_of(o.meter_id) if self.plan.owns(o.meter_id) else None)
            if self.log is not None:  # after the spool: a crash between re-executes
                self.log.append(o)
            self.executed += 1
            self.by_status[o.status] = self.by_status.get(o.status, 0) + 1
            log.info("relay %s %s on %s: %s (%s)", o.action, o.command_id, o.meter_id,
                     o.status, o.detail)

    async def handle(self, values: list[bytes | None]) -> None:
        """Decode, filter and execute one batch of command messages."""
        per_gateway: dict[str, list[dict[str, Any]]] = {}
        for value in values:
            try:
                cmd = codec.decode("RelayCommand", value)
            except DecodeError as exc:
                self.invalid += 1
                log.warning("undecodable relay command skipped: %s", exc)
                continue
            if not self._mine(cmd):
                self.ignored += 1
                continue
            per_gateway.setdefault(self.plan.gateway_of(cmd["meter_id"]), []).append(cmd)
        if per_gateway:
            await asyncio.gather(*(self._execute_gateway(g, c) for g, c in per_gateway.items()))

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await asyncio.to_thread(self._connect)
        try:
            while not stop.is_set():
                msgs = await asyncio.to_thread(self.consumer.consume, self.batch, 0.3)
                values = []
                for m in msgs:
                    if m.error():
                        log.debug("relay command consumer: %s", m.error())
                        continue
                    values.append(m.value())
                if values:
                    await self.handle(values)
                if msgs:
                    # outcomes are in the spool (fsync'd) by now: safe to move on
                    with contextlib.suppress(KafkaException):
                        await asyncio.to_thread(self.consumer.commit, asynchronous=False)
        finally:
            c, self.consumer = self.consumer, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(c.close)

    def stats(self) -> dict[str, Any]:
        return {"executed": self.executed, "ignored": self.ignored, "invalid": self.invalid, "refused": self.refused,
                "repeated": self.repeated, "expired": self.expired,
                **{f"outcome_{k.lower()}": v for k, v in self.by_status.items()}}


__all__ = ["CommandExecutor", "CommandLog", "outcome_record"]
