"""`mallwatt collect`: poll a mall's meters, publish readings to Kafka, execute relay commands.

One asyncio loop runs the poller, the publisher (flush to the spool every second), the
spool drainer (spool -> Kafka) and the relay command executor. SIGTERM / SIGINT stop
polling, flush what was read, try to deliver the spool for a few seconds and persist it;
whatever is still undelivered is sent by the next start with the same collector id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from collectors.bench import run_loop
from collectors.commands import CommandExecutor, CommandLog
from collectors.mapping import CollectorPlan, parse_shard, plan_mall
from collectors.poller import Poller, PollerConfig, PollEvent, wall_clock_ms
from collectors.publish import ReadingPublisher, kafka_find_written, kafka_producer_factory
from collectors.relay import RelayController
from collectors.spool import Drainer, Spool, SpoolError
from infra.home import data_dir
from pipelines import metrics as M
from pipelines.portfolio import Portfolio

log = logging.getLogger(__name__)
SPOOL_ROOT = data_dir("spool")


def default_collector_id(mall_id: str, gateways: Sequence[str] | None = None,
                         shard: tuple[int, int] | None = None) -> str:
    if gateways:
        return f"{mall_id}-g{'+'.join(sorted(gateways))}"
    if shard:
        return f"{mall_id}-s{shard[0]}of{shard[1]}"
    return mall_id


class Collector:
    """Poller + publisher + spool drainer + command executor for one mall (or shard)."""

    def __init__(self, config: Portfolio | str | Path, mall_id: str, *,
                 bootstrap: str | Callable[[], str] | None = None,
                 collector_id: str | None = None, gateways: Sequence[str] | None = None,
                 shard: tuple[int, int] | str | None = None,
                 spool_dir: str | Path | None = None, clock: Callable[[], int] = wall_clock_ms,
                 poll_interval_s: float | None = None, partitions: int | None = None,
                 poller_config: PollerConfig | None = None, flush_interval_s: float = 1.0,
                 commands: bool = True, command_offset_reset: str = "lookback",
                 command_lookback_s: float = 300.0, command_max_age_s: float | None = 300.0,
                 producer_overrides: dict[str, Any] | None = None,
                 drain_timeout_s: float = 10.0) -> None:
        if isinstance(shard, str):
            shard = parse_shard(shard)
        if bootstrap is None:
            from infra.broker import bootstrap_servers
            bootstrap = bootstrap_servers()
        self.bootstrap = bootstrap
        self.plan: CollectorPlan = plan_mall(config, mall_id, gateways=gateways, shard=shard,
                                             interval_s=poll_interval_s)
        self.collector_id = collector_id or default_collector_id(mall_id, gateways, shard)
        self.spool_dir = Path(spool_dir) if spool_dir else SPOOL_ROOT / self.collector_id
        self.spool = Spool(self.spool_dir)
        self.publisher = ReadingPublisher(self.spool, self.plan, collector_id=self.collector_id,
                                          partitions=partitions,
                                          flush_interval_s=flush_interval_s, clock=clock)
        addr = self._addr
        self.drainer = Drainer(self.spool, kafka_producer_factory(addr, **(producer_overrides
                                                                          or {})),
                               find_written=kafka_find_written(addr))
        self.poller = Poller(self.plan.devices, config=poller_config or PollerConfig(
            timeout_s=self.plan.timeout_s), clock=clock, on_result=self.publisher.add,
            on_event=self._on_poll_event)
        self.relay = RelayController(self.poller)
        self.executor = (CommandExecutor(self.relay, self.publisher, self.plan,
                                         bootstrap=addr, collector_id=self.collector_id,
                                         offset_reset=command_offset_reset,
                                         lookback_s=command_lookback_s,
                                         max_age_s=command_max_age_s,
                                         log=CommandLog(self.spool_dir / "commands.jsonl"))
                         if commands else None)
        self.drain_timeout_s = drain_timeout_s
        self._spool_alarm = False
        self._t0 = time.monotonic()
        # counter values already added to the metrics (spool positions count records)
        self._exported: dict[str, int] = {"acked": self.drainer.acked}
        self._exported_at = 0.0

    def _addr(self) -> str:
        return self.bootstrap() if callable(self.bootstrap) else self.bootstrap

    def _on_poll_event(self, ev: PollEvent) -> None:
        M.COLLECTOR_EVENTS.labels(self.collector_id, ev.kind).inc()
        self.publisher.poll_event(ev)

    # --- metrics (pipelines/metrics.py) ---------------------------------------------------
    def export_metrics(self, every_s: float = 1.0) -> None:
        """Copy the counters into the Prometheus metrics at most every `every_s`: the
        poll path itself never touches a metric."""
        now = time.monotonic()
        if now - self._exported_at < every_s:
            return
        self._exported_at = now
        cid, p, d = self.collector_id, self.poller.stats(), self.drainer
        for key, counter in (("polls_ok", M.COLLECTOR_POLLS.labels(cid, "ok")),
                             ("polls_failed", M.COLLECTOR_POLLS.labels(cid, "failed")),
                             ("readings", M.COLLECTOR_READINGS.labels(cid)),
                             ("acked", M.COLLECTOR_ACKED.labels(cid))):
            value = self.publisher.readings if key == "readings" else (
                d.acked if key == "acked" else p[key])
            delta = value - self._exported.get(key, 0)
            if delta > 0:
                counter.inc(delta)
            self._exported[key] = value
        if self.publisher.readings and self._exported.get("last_n") != self.publisher.readings:
            self._exported["last_n"] = self.publisher.readings
            M.COLLECTOR_LAST_READING.labels(cid, self.plan.mall_id).set(time.time())
        up = 0
        for link in self.poller.links.values():
            ok = getattr(link, "up", None) is not False  # not tried yet counts as up
            up += ok
            M.COLLECTOR_GATEWAY_UP.labels(cid, self.plan.mall_id, link.name).set(int(ok))
        M.COLLECTOR_GATEWAYS.labels(cid, "up").set(up)
        M.COLLECTOR_GATEWAYS.labels(cid, "down").set(len(self.poller.links) - up)
        M.COLLECTOR_DEVICES.labels(cid, "up").set(p["devices"] - p["down"])
        M.COLLECTOR_DEVICES.labels(cid, "down").set(p["down"])
        M.COLLECTOR_SPOOL.labels(cid).set(d.depth)
        M.COLLECTOR_KAFKA_UP.labels(cid).set(int(d.healthy))

    def readiness(self) -> tuple[bool, str]:
        """Ready: polling, and the spool drains to Kafka (for /readyz)."""
        if not self.poller._tasks:
            return False, "poller not running"
        if not self.drainer.healthy:
            return False, f"kafka unreachable: {self.drainer.last_error}"[:300]
        return True, "ok"

    # --- health ------------------------------------------------------------------------
    def _watch_spool(self) -> None:
        """spool_growing once per episode of undelivered backlog; spool_drained at the end."""
        d = self.drainer
        stuck = d.failed_since is not None and time.monotonic() - d.failed_since > 2.0
        if stuck and not self._spool_alarm:
            self._spool_alarm = True
            M.COLLECTOR_EVENTS.labels(self.collector_id, "spool_growing").inc()
            self.publisher.event("spool_growing", detail=f"{d.depth} records waiting; "
                                 f"{d.last_error}")
        elif self._spool_alarm and d.healthy and d.depth <= 1:
            self._spool_alarm = False
            M.COLLECTOR_EVENTS.labels(self.collector_id, "spool_drained").inc()
            self.publisher.event("spool_drained", detail=f"acked up to {d.acked}")

    def stats(self) -> dict[str, Any]:
        p, d = self.poller.stats(), self.drainer
        return {
            "collector_id": self.collector_id, "mall_id": self.plan.mall_id,
            "devices": p["devices"], "down": p["down"], "polls_ok": p["polls_ok"],
            "polls_failed": p["polls_failed"], "readings": self.publisher.readings,
            "batches": self.publisher.batches, "events": self.publisher.events,
            "spool_depth": d.depth, "acked": d.acked, "sent": d.sent,
            "send_failures": d.failures, "found_written": d.found_written,
            "kafka_ok": d.healthy, "last_error": d.last_error,
            **({f"commands_{k}": v for k, v in self.executor.stats().items()}
               if self.executor else {}),
        }

    def progress_line(self, rate: float) -> str:
        s = self.stats()
        kafka = "ok" if s["kafka_ok"] else f"FAILING ({s['last_error'][:60]})"
        return (f"[collect {self.collector_id}] devices {s['devices'] - s['down']}/"
                f"{s['devices']} up | {rate:.1f} readings/s | spool {s['spool_depth']} "
                f"pending, kafka {kafka} | commands {s.get('commands_executed', 0)}")

    def _progress(self, line: str, rate: float) -> None:
        from pipelines.logsetup import json_enabled
        if not json_enabled():
            print(line, file=sys.stderr, flush=True)
            return
        s = self.stats()  # one JSON event with the figures as fields, not a text line
        log.info("progress", extra={"event": "collector_progress", "readings_per_s": round(rate, 1),
                                    **{k: s[k] for k in ("collector_id", "mall_id", "devices", "down",
                                                         "readings", "spool_depth", "kafka_ok")}})

    # --- running -------------------------------------------------------------------------
    async def _flush_loop(self, stop: asyncio.Event, stats: dict[str, Any] | None,
                          progress: bool, progress_every_s: float) -> None:
        last_t, last_n = time.monotonic(), 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            if self.publisher.due():
                self.publisher.flush()
            self._watch_spool()
            self.export_metrics()
            if stats is not None:
                stats.update(self.stats())
            now = time.monotonic()
            if progress and now - last_t >= progress_every_s:
                rate = (self.publisher.readings - last_n) / (now - last_t)
                self._progress(self.progress_line(rate), rate)
                last_t, last_n = now, self.publisher.readings

    async def run(self, stop_event: asyncio.Event, *, stats: dict[str, Any] | None = None,
                  progress: bool = False, progress_every_s: float = 5.0) -> dict[str, Any]:
        inner = asyncio.Event()
        self.publisher.event("started", detail=f"{len(self.plan.devices)} meters on "
                             f"{len(self.plan.gateways)} gateway(s)")
        self.poller.start()
        tasks = [asyncio.create_task(self.drainer.run(inner), name="drainer"),
                 asyncio.create_task(self._flush_loop(inner, stats, progress,
                                                      progress_every_s), name="flush")]
        if self.executor:
            tasks.append(asyncio.create_task(self.executor.run(inner), name="commands"))
        stopper = asyncio.create_task(stop_event.wait())
        try:
            done, _ = await asyncio.wait([stopper, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper:
                    t.result()  # a component died: re-raise after the clean-up below
        finally:
            stopper.cancel()
            inner.set()
            await self.poller.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.publisher.flush()
            self.publisher.event("stopped", detail=f"{self.publisher.readings} readings")
            delivered = await self.drainer.drain(self.drain_timeout_s)
            self.drainer.producer.flush(1.0)
            final = self.stats()
            final["delivered_all"] = delivered
            self.spool.close()
            if stats is not None:
                stats.update(final)
            if progress:
                self._progress(self.progress_line(0.0) + (
                    "" if delivered else
                    f" | {final['spool_depth']} records kept in the spool for the next start"), 0.0)
        return final


async def run_collector(config: Portfolio | str | Path, mall_id: str, stop_event: asyncio.Event,
                        *, stats: dict[str, Any] | None = None, progress: bool = False,
                        progress_every_s: float = 5.0, **options: Any) -> dict[str, Any]:
    """Run a collector until stop_event is set; returns (and keeps `stats` updated with)
    its counters. options: see Collector (bootstrap, collector_id, gateways, shard,
    spool_dir, clock, poll_interval_s, partitions, poller_config, ...)."""
    collector = Collector(config, mall_id, **options)
    return await collector.run(stop_event, stats=stats, progress=progress,
                               progress_every_s=progress_every_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mallwatt collect",
        description="Poll one mall's meters over Modbus TCP, publish readings to Kafka "
                    "(mallwatt.readings, one batch per account shard per second) through a "
                    "durable local spool, and execute relay commands for the meters this "
                    "collector owns.",
        epilog="Progress is printed to stderr every few seconds. SIGTERM or Ctrl-C stops "
               "cleanly: the last readings are flushed, the spool is delivered for up to "
               "--drain-timeout seconds and whatever remains is kept on disk for the next "
               "start with the same --collector-id. Two processes must not share one "
               "collector id (the spool folder is locked).")
    p.add_argument("--config", required=True, help="portfolio YAML (see mallwatt generate)")
    p.add_argument("--mall", required=True, help="mall id in the portfolio")
    own = p.add_mutually_exclusive_group()
    own.add_argument("--gateways", help="comma-separated gateway ids this collector owns")
    own.add_argument("--shard", help="i/n: every n-th gateway (in id order) from the i-th")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after N seconds (0: run "
                   "until SIGTERM / Ctrl-C)")
    p.add_argument("--collector-id", help="stable id: batch ids, consumer group and spool "
                   "folder derive from it (default: mall id plus gateway/shard suffix)")
    p.add_argument("--spool-dir", help="spool folder (default var/spool/<collector-id>)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: MALLWATT_KAFKA or "
                   "the dev broker)")
    p.add_argument("--interval", type=float, help="poll every meter every N seconds "
                   "(default: each meter's poll_interval_s from the config)")
    p.add_argument("--no-commands", action="store_true", help="do not execute relay commands")
    p.add_argument("--command-max-age", type=float, default=300.0, help="relay commands "
                   "issued longer ago than this (s) are not executed; they get a FAILED "
                   "'expired' outcome")
    p.add_argument("--command-lookback", type=float, default=300.0, help="a new collector "
                   "id (no committed offsets) reads relay commands from this many seconds "
                   "ago")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--progress-every", type=float, default=5.0)
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this "
                   "port (default MALLWATT_COLLECTOR_METRICS_PORT or 9461; negative: off)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.logsetup import configure
    configure("collector", level=logging.WARNING)
    log.setLevel(logging.INFO)  # progress events (JSON mode) are INFO

    async def go() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.seconds > 0:
            loop.call_later(args.seconds, stop.set)
        collector = Collector(
            args.config, args.mall, bootstrap=args.bootstrap, collector_id=args.collector_id,
            gateways=args.gateways.split(",") if args.gateways else None, shard=args.shard,
            spool_dir=args.spool_dir, poll_interval_s=args.interval,
            commands=not args.no_commands, drain_timeout_s=args.drain_timeout,
            command_max_age_s=args.command_max_age, command_lookback_s=args.command_lookback)
        server = M.serve(M.metrics_port("collector", args.metrics_port),
                         ready=collector.readiness)
        try:
            return await collector.run(stop, progress=True,
                                       progress_every_s=args.progress_every)
        finally:
            if server is not None:
                server.close()

    try:
        final = run_loop(go())  # uvloop when installed: about 1.5x less CPU per poll
    except (ValueError, KeyError, SpoolError) as exc:
        print(f"mallwatt collect: {exc}", file=sys.stderr)
        return 2
    return 0 if final.get("delivered_all") else 3


if __name__ == "__main__":
    sys.exit(main())
