"""The worker's and forwarder's metrics, kept off the hot path (metrics: pipelines/metrics.py).

A prometheus_client counter increment costs ~2 us, ten times an int add, so nothing here runs
per reading: the billing agents are counted once per step (`take_steps`, a drop-in for
pipelines.take.take_steps that times each step), the forwarder adds plain ints per output and
moves them into the counters at most once a second, and the gauges (consumer lag, state size,
relay backlog, paid merchants still tripped) are refreshed by a timer every REFRESH_S.

    from pipelines.worker_metrics import take_steps          # in place of pipelines.take's
    worker_metrics.install(app, states, parsed, holder)      # a timer: lag, state, relays
    server = worker_metrics.serve_worker(app)                # /metrics, /healthz, /readyz
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from infra import topics as T
from pipelines import metrics as M
from pipelines.take import (
    CATCHUP_AFTER_S,
    CATCHUP_DONE_S,
    CATCHUP_FILL_S,
    CATCHUP_STEP_S,
    CatchupSize,
)
from pipelines.take import take_steps as _take_steps
from schemas import codec

log = logging.getLogger("mallwatt.worker.metrics")

#: How often the gauges (lag, state size, relay backlog) are refreshed, seconds.
REFRESH_S = float(os.environ.get("MALLWATT_METRICS_REFRESH_S", 5.0))
#: Output counters leave the forwarder at most this often (seconds).
FLUSH_S = 1.0
# MeterRelay rows (pipelines.core.relay.MeterRelay.to_row): observed, action, due_ms
_OBSERVED, _ACTION, _DUE = 0, 3, 9


async def take_steps(stream: Any, max_: int, within: float, catchup_max: int | None = None,
                     catchup_bytes: int | None = None,
                     catchup_after_s: float = CATCHUP_AFTER_S,
                     catchup_fill_s: float = CATCHUP_FILL_S,
                     catchup_step_s: float = CATCHUP_STEP_S,
                     sizer: CatchupSize | None = None,
                     catchup_done_s: float = CATCHUP_DONE_S) -> AsyncIterator[list[Any]]:
    """pipelines.take.take_steps, counting each step once: its size, its messages by topic and
    its duration (from the yield until the agent asks for the next step)."""
    children: dict[str, tuple[Any, Any, Any]] = {}  # per topic: labels() costs more than the inc
    async for events in _take_steps(stream, max_, within, catchup_max, catchup_bytes, catchup_after_s,
                                    catchup_fill_s, catchup_step_s, sizer, catchup_done_s):
        started = time.perf_counter()
        yield events
        if events:
            topic = events[0].message.topic
            metrics = children.get(topic)
            if metrics is None:
                metrics = children[topic] = (M.WORKER_INPUT.labels(topic), M.WORKER_STEP_SIZE.labels(topic),
                                             M.WORKER_STEP_SECONDS.labels(topic))
            n = len(events)
            metrics[0].inc(n)
            metrics[1].observe(n)
            metrics[2].observe(time.perf_counter() - started)


def dead_letter(stage: str, reason: str) -> None:
    """One worker dead letter (rare: counted one by one)."""
    M.DEAD_LETTERS.labels("worker", stage, M.reason_class(reason)).inc()


class ParsedEnvelopes(dict):  # type: ignore[type-arg]
    """The worker's cache of envelopes (account key -> (generation, Envelope)) that knows
    which of them hold relay rows: the gauges need only those, and walking all 350,000
    cached envelopes every REFRESH_S held the event loop (4 % of the worker's samples).
    Only a key's own assignment changes the index (a set add or discard per stored account).

    An envelope is cached without its outbox (`Envelope.without_outbox`): the outputs are in
    the value already written, and no step reads them again. Kept, they were a sixth of the
    cache's allocated blocks once every account was billed, and that growth from the first
    readings (baselines, no outputs) made the step collector run a full pass of the whole
    heap, about 5 s of the event loop at 350,000 accounts, that found 30 objects of garbage
    (docs/stream.md, session 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.relayed: set[str] = set()

    def __setitem__(self, key: str, value: tuple[int, Any]) -> None:
        if value[1].outbox:
            value = (value[0], value[1].without_outbox())
        super().__setitem__(key, value)
        if value[1].relays:
            self.relayed.add(key)
        else:
            self.relayed.discard(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.relayed.discard(key)

    def pop(self, key: str, *default: Any) -> Any:
        self.relayed.discard(key)
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self.relayed.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def popitem(self) -> tuple[str, tuple[int, Any]]:
        key, value = super().popitem()
        self.relayed.discard(key)
        return key, value


class WorkerWatch:
    """The worker's gauges and readiness, refreshed by one faust timer."""

    def __init__(self, app: Any, states: Any, parsed: Mapping[str, tuple[int, Any]], holder: Any = None) -> None:
        self.app = app
        self.holder = holder
        self.states = states
        self.parsed = parsed
        self.broker_error: str | None = "not checked yet"
        self._lag_labels: set[tuple[str, str]] = set()

    def readiness(self) -> tuple[bool, str]:
        """Ready: partitions assigned, their tables recovered, the broker answering."""
        app = self.app
        try:
            assigned = app.consumer.assignment()
        except Exception as exc:  # no consumer yet
            return False, f"waiting for partition assignment ({type(exc).__name__})"
        if not assigned:
            return False, "waiting for partition assignment"
        recovery = app.tables.recovery
        if getattr(app, "rebalancing", False) or not recovery.completed.is_set():
            return False, f"recovering tables: {recovery.active_remaining_total()} changelog message(s) behind"
        if self.broker_error:
            return False, f"broker unreachable: {self.broker_error}"
        return True, "ok"

    async def refresh(self) -> None:
        await self._lag()
        self._state()

    async def _lag(self) -> None:
        """Consumer lag of the input partitions: the log end minus the committed offset."""
        consumer = self.app.consumer
        tps = [tp for tp in consumer.assignment() if not tp.topic.endswith("-changelog")]
        if not tps:
            return
        try:
            highwaters = await asyncio.wait_for(consumer.highwaters(*tps), timeout=10)
        except Exception as exc:  # the broker is down or slow: not ready, lag unknown
            self.broker_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        self.broker_error = None
        seen: set[tuple[str, str]] = set()
        for tp, high in highwaters.items():
            committed = consumer._committed_offset.get(tp)  # faust's own record of its commits
            lag = max(0, high - (committed if committed is not None else 0))
            key = (tp.topic, str(tp.partition))
            M.CONSUMER_LAG.labels("worker", *key).set(lag)
            seen.add(key)
        for gone in self._lag_labels - seen:  # partitions moved to another worker
            M.CONSUMER_LAG.remove("worker", *gone)
        self._lag_labels = seen

    def _state(self) -> None:
        """State size and the relay loop's backlog, from the worker's own newest envelopes."""
        data = self.states.data
        if type(data).__module__.endswith("memory") or isinstance(data, dict):
            M.WORKER_STATE_KEYS.labels("accounts").set(len(data))
        generation = self.states.generation
        malls: Mapping[str, str] = self.holder.current().account_mall if self.holder is not None else {}
        unconfirmed: dict[str, int] = {"TRIP": 0, "RECONNECT": 0}
        tripped: dict[str, int] = {}
        parsed = self.parsed
        relayed = getattr(parsed, "relayed", None)  # ParsedEnvelopes: only envelopes with relay rows count
        entries = list(parsed.items()) if relayed is None else [(k, parsed[k]) for k in list(relayed)]
        for _, (gen, env) in entries:
            if gen != generation:
                continue  # before a rebalance: perhaps another worker's now
            for row in env.relays.values():
                if row[_DUE] >= 0:
                    unconfirmed[row[_ACTION] or "UNKNOWN"] = unconfirmed.get(row[_ACTION] or "UNKNOWN", 0) + 1
            if env.relays and any(a.balance > 0 for a in env.accounts.values()) and any(
                    row[_OBSERVED] == "open" and row[_ACTION] == "RECONNECT" for row in env.relays.values()):
                mall = malls.get(next(iter(env.accounts)), "unknown")
                tripped[mall] = tripped.get(mall, 0) + 1
        for action, n in unconfirmed.items():
            M.RELAY_UNCONFIRMED.labels(action).set(n)
        M.PAID_STILL_TRIPPED.clear()
        for mall, n in tripped.items():
            M.PAID_STILL_TRIPPED.labels(mall).set(n)


def install(app: Any, states: Any, parsed: Mapping[str, tuple[int, Any]], holder: Any = None) -> WorkerWatch:
    """The worker's gauges on a faust timer; the watch is kept as `app.mallwatt_watch`."""
    watch = WorkerWatch(app, states, parsed, holder)

    @app.timer(interval=REFRESH_S)
    async def refresh_metrics() -> None:
        try:
            await watch.refresh()
        except Exception:  # metrics must never stop the worker
            log.exception("refreshing the worker's metrics failed")

    app.mallwatt_watch = watch
    return watch


def serve_worker(app: Any, port: int | None = None) -> M.MetricsServer | None:
    watch: WorkerWatch | None = getattr(app, "mallwatt_watch", None)
    return M.serve(M.metrics_port("worker", port), ready=watch.readiness if watch else None)


class ForwarderMetrics:
    """Plain ints per output, moved into the counters at most once a second."""

    def __init__(self) -> None:
        self.published: dict[str, int] = {}
        self.ledger_entries = 0
        self._flushed = time.monotonic()

    def output(self, topic: str, value: bytes) -> None:
        """One output message (any topic but the ledger and interval batches)."""
        self.published[topic] = self.published.get(topic, 0) + 1
        if topic == T.RELAY_COMMANDS:  # rare (trips and reconnects): decoded for its action
            self._relay_command(value)
        elif topic == T.ALERTS:
            try:
                kind = codec.decode("Alert", value)["kind"]
            except Exception:
                kind = "undecodable"
            M.WORKER_ALERTS.labels(kind).inc()

    def _relay_command(self, value: bytes) -> None:
        try:
            cmd = codec.decode("RelayCommand", value)
        except Exception:
            return
        action = cmd["action"]
        M.RELAY_COMMANDS.labels(action, "issued").inc()
        if ":r" in cmd["command_id"]:  # a re-issue: <root id>:r<attempt> (pipelines.core.relay)
            M.RELAY_RETRIES.labels(action).inc()
        if cmd.get("cause_ts_ms"):
            M.WORKER_READING_TO_COMMAND.observe(max(0, cmd["issued_at_ms"] - cmd["cause_ts_ms"]) / 1000)

    def batch(self, topic: str, rows: int) -> None:
        """One ledger or interval batch message of `rows` rows."""
        self.published[topic] = self.published.get(topic, 0) + 1
        if topic == T.LEDGER:
            self.ledger_entries += rows

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._flushed < FLUSH_S:
            return
        self._flushed = now
        published, self.published = self.published, {}
        for topic, n in published.items():
            M.FORWARDER_OUTPUT.labels(topic).inc(n)
            if topic not in (T.LEDGER, T.INTERVALS):
                M.WORKER_OUTPUT.labels(topic).inc(n)
        if self.ledger_entries:
            M.WORKER_OUTPUT.labels(T.LEDGER).inc(self.ledger_entries)
            self.ledger_entries = 0


def relay_outcomes(decoded: list[tuple[Any, Any]]) -> None:
    """Relay outcomes the worker applied, by action and status (rare: one by one)."""
    for _, outcome in decoded:
        M.RELAY_COMMANDS.labels(outcome.get("action") or "UNKNOWN", outcome.get("status") or "UNKNOWN").inc()
