"""Relay commands from Kafka, executed on the meters this collector owns.

Consumer group per collector id; every collector reads the whole topic and keeps the
commands for its own meters (the key is the gateway id, and a gateway belongs to one
collector). Execution goes through collectors.relay.RelayController, which uses the
poller's GatewayLink: the write and the read-back wait for the same bus lock as the
polls, so the RS-485 line never sees two requests at once and no second connection is
opened. Gateways execute in parallel, one command at a time each, in topic order.

The outcome is spooled (durable) before the command's offset is committed: a crash in
between re-executes the command, which is harmless because a relay write is idempotent
in effect and the repeated outcome carries the same command_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException

from collectors.mapping import CollectorPlan
from collectors.publish import ReadingPublisher
from collectors.relay import RelayController, RelayOutcome
from infra import topics as T
from schemas import codec
from schemas.codec import DecodeError

log = logging.getLogger(__name__)


def outcome_record(o: RelayOutcome, mall_id: str, gateway_id: str) -> dict[str, Any]:
    detail = o.detail + (" (repeated command id: first outcome)" if o.duplicate else "")
    return {"command_id": o.command_id, "action": o.action, "status": o.status,
            "mall_id": mall_id, "gateway_id": gateway_id, "meter_id": o.meter_id,
            "relay_after": o.relay_after, "attempts": o.attempts, "ts_ms": o.ts_ms,
            "detail": detail}


class CommandExecutor:
    def __init__(self, relay: RelayController, publisher: ReadingPublisher,
                 plan: CollectorPlan, *, bootstrap: str | Callable[[], str],
                 collector_id: str, group_id: str | None = None,
                 offset_reset: str = "latest", batch: int = 100) -> None:
        self.relay = relay
        self.publisher = publisher
        self.plan = plan
        self.collector_id = collector_id
        self.group_id = group_id or f"mallwatt-collector-{collector_id}"
        self._bootstrap = bootstrap
        self.offset_reset = offset_reset
        self.batch = batch
        self.consumer: Consumer | None = None
        self.executed = self.ignored = self.invalid = 0
        self.assigned = 0  # partitions of the command topic this member reads
        self.by_status: dict[str, int] = {}

    def _connect(self) -> Consumer:
        addr = self._bootstrap() if callable(self._bootstrap) else self._bootstrap
        c = Consumer({"bootstrap.servers": addr, "group.id": self.group_id,
                      "enable.auto.commit": False, "auto.offset.reset": self.offset_reset,
                      # a slow trip (timeouts, retries) must not look like a dead member
                      "max.poll.interval.ms": 300_000})
        c.subscribe([T.RELAY_COMMANDS], on_assign=self._on_assign)
        return c

    def _on_assign(self, consumer: Consumer, partitions: list) -> None:
        self.assigned = len(partitions)

    def _mine(self, cmd: dict[str, Any]) -> bool:
        return cmd["mall_id"] == self.plan.mall_id and self.plan.owns(cmd["meter_id"])

    async def _execute_gateway(self, gateway_id: str, cmds: list[dict[str, Any]]) -> None:
        for cmd in cmds:  # in topic order: a TRIP then a RECONNECT must not swap
            o = await self.relay.execute(cmd["command_id"], cmd["meter_id"], cmd["action"])
            self.publisher.outcome(outcome_record(o, self.plan.mall_id, gateway_id))
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
        return {"executed": self.executed, "ignored": self.ignored, "invalid": self.invalid,
                **{f"outcome_{k.lower()}": v for k, v in self.by_status.items()}}


__all__ = ["CommandExecutor", "outcome_record"]
