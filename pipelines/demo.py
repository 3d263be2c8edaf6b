"""`mallwatt demo`: one simulated mall billed in real time on the real components.

Everything runs on this machine and is stopped at the end: a private Kafka broker
(var/demo/kafka), the billing worker and the warehouse sink as subprocesses, and in this
process the Modbus meter simulator (accelerated time) with the real collector polling it
over Modbus TCP on loopback. Opening balances are paid in as top-ups; merchants whose
credit runs out are tripped, and half-way through they top up and are reconnected. The
merchant portal runs beside them (a link with one merchant's token is printed); that
merchant's rescue top-up goes through the page's API and the simulated payment provider.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from confluent_kafka import Consumer, Producer

from infra import broker
from infra import topics as T
from infra.kafka_security import kafka_config
from pipelines.generate import generate
from pipelines.money_input import produce_payment
from pipelines.portfolio import Portfolio, dump_portfolio, parse_portfolio
from schemas import codec

ROOT = Path(__file__).resolve().parent.parent
#: Queries the demo suggests at its end (tests run them against the migrated schema).
NEXT_QUERIES = (
    "SELECT account_id, argMax(balance_after_minor, ts)/100 AS balance FROM mallwatt.ledger FINAL "
    "GROUP BY account_id ORDER BY balance LIMIT 10",
    "SELECT kind, account_id, message FROM mallwatt.alerts FINAL ORDER BY ts LIMIT 20",
)
DEMO_DIR = ROOT / "var" / "demo"
DEMO_PORT = 19192
PORTAL_PORT = 18790
SIM_START = "2026-07-14T12:00:00+08:00"  # a summer weekday: peak and critical-peak hours, then night
BILL_DAY = "2026-07-14"  # closed once simulated time passes midnight


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Services:
    """Subprocesses started by the demo, stopped in reverse order whatever happens."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(DEMO_DIR / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {DEMO_DIR / (name + '.log')}")

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    say(f"{name} did not stop in time; killing it")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.procs.clear()


class CommandWatch(threading.Thread):
    """Counts relay commands and outcomes as they appear on Kafka."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(kafka_config(bootstrap, **{"group.id": f"demo-watch-{time.time()}",
                                  "auto.offset.reset": "earliest"}))
        self.tripped: set[str] = set()
        self.reconnected: dict[str, int] = {}  # account -> RECONNECT commands seen
        self.trips = self.reconnects = self.confirmed = 0
        self.retries: list[str] = []  # re-issued commands (the power loop: pipelines/core/relay.py)
        self.retry_outcomes: dict[str, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        self.consumer.subscribe([T.RELAY_COMMANDS, T.RELAY_OUTCOMES])
        seen: set[str] = set()
        while not self._halt.is_set():
            msg = self.consumer.poll(0.3)
            if msg is None or msg.error():
                continue
            if msg.topic() == T.RELAY_OUTCOMES:
                outcome = codec.decode("RelayOutcome", msg.value())
                if outcome["status"] == "CONFIRMED":
                    self.confirmed += 1
                if outcome["command_id"] in self.retries:
                    self.retry_outcomes[outcome["command_id"]] = f"{outcome['status']} {outcome['relay_after']}"
                continue
            cmd = codec.decode("RelayCommand", msg.value())
            if cmd["command_id"] in seen:
                continue
            seen.add(cmd["command_id"])
            if cmd["requested_by"].endswith(":retry"):
                self.retries.append(cmd["command_id"])
                continue
            if cmd["action"] == "TRIP" and cmd["account_id"]:
                self.trips += 1
                self.tripped.add(cmd["account_id"])
            elif cmd["action"] == "RECONNECT":
                self.reconnects += 1
                if cmd["account_id"]:
                    self.reconnected[cmd["account_id"]] = self.reconnected.get(cmd["account_id"], 0) + 1
        self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def publish_topups(bootstrap: str, portfolio: Portfolio, amounts: dict[str, int], ts_ms: int, tag: str,
                   partitions: int) -> int:
    producer = Producer(kafka_config(bootstrap, **{"enable.idempotence": True}))
    for account, amount in amounts.items():
        payment = {"payment_id": f"{tag}-{account}", "account_id": account, "kind": "TOPUP",
                   "amount_minor": amount, "currency": portfolio.currency, "ts_ms": ts_ms,
                   "provider": "demo", "reverses_payment_id": None}
        produce_payment(producer, payment, partitions)
    producer.flush(30)
    return len(amounts)


class PortalMerchant:
    """The merchant whose link the demo prints: its rescue top-up goes through the portal."""

    def __init__(self, account: str, token: str, base: str = f"http://127.0.0.1:{PORTAL_PORT}") -> None:
        self.account, self.token, self.base = account, token, base

    def link(self) -> str:
        return f"{self.base}/m#t={self.token}"

    async def statement(self, period: str) -> None:
        """The closed day's statement as the merchant's page fetches it (the bills' own document)."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, http.get(
                f"{self.base}/api/v1/accounts/{self.account}/statements/{period}",
                headers={"Authorization": f"Bearer {self.token}"}) as r:
            doc = await r.json()
        if r.status != 200:
            print(f"  portal statement of {self.account} for {period}: {r.status} {doc.get('message')}", flush=True)
            return
        print(f"  the portal serves {self.account}'s statement {doc['doc_id']} too (GET /api/v1/accounts/"
              f"{self.account}/statements/{period}): opening {doc['opening_minor'] / 100:.2f}, "
              f"{len(doc['lines'])} lines, closing {doc['closing_minor'] / 100:.2f}", flush=True)

    async def topup(self, amount_minor: int, watch: CommandWatch, timeout_s: float = 40.0) -> None:
        """As the page does it: checkout, the simulated provider takes the payment and posts its
        signed notification to the webhook; then the balance API shows the credit and the relay."""
        import aiohttp

        url = f"{self.base}/api/v1/accounts/{self.account}"
        auth = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.get(f"{url}/balance", headers=auth) as r:
                before = await r.json()
            reconnects = watch.reconnected.get(self.account, 0)  # a RECONNECT after this one is the top-up's
            async with http.post(f"{url}/checkout", json={"amount_minor": amount_minor}, headers=auth) as r:
                session = await r.json()
                if r.status != 200:
                    say(f"portal: checkout refused ({r.status}): {session.get('message')}")
                    return
            async with http.post(self.base + session["pay_url"]) as r:
                paid = await r.json()
                if r.status != 200:
                    say(f"portal: the webhook answered {r.status}: {paid.get('message')}")
                    return
            acked = time.monotonic()
            say(f"portal: {self.account} paid {amount_minor / 100:.2f} through the simulated provider; webhook 2xx "
                f"after Kafka's ack (payment {paid['payment_id']}); balance was "
                f"{(before['balance_minor'] or 0) / 100:.2f}, relay {before['relay']['state']}")
            credited = reconnected = None
            while time.monotonic() - acked < timeout_s and (credited is None or reconnected is None):
                await asyncio.sleep(0.2)
                async with http.get(f"{url}/activity?limit=30", headers=auth) as r:
                    entries = (await r.json())["entries"]
                if credited is None and any(e["source_id"] == paid["payment_id"] for e in entries):
                    credited = time.monotonic() - acked
                    async with http.get(f"{url}/balance", headers=auth) as r:
                        now = await r.json()
                    say(f"portal: the balance API shows the credit {credited:.1f} s after the 2xx: "
                        f"{(before['balance_minor'] or 0) / 100:.2f} -> {now['balance_minor'] / 100:.2f}")
                if reconnected is None and watch.reconnected.get(self.account, 0) > reconnects:
                    async with http.get(f"{url}/balance", headers=auth) as r:
                        relay = (await r.json())["relay"]
                    if relay["state"] == "connected":
                        reconnected = time.monotonic() - acked
                        say(f"portal: RECONNECT for {self.account}; the page shows the power on "
                            f"{reconnected:.1f} s after the 2xx (reason {relay['reason']})")
                if reconnected is None and before["relay"]["state"] != "disconnected" and credited is not None:
                    reconnected = 0.0  # it was not tripped: nothing to reconnect
            if credited is None:
                say(f"portal: the credit did not show within {timeout_s:.0f} s (see {DEMO_DIR / 'portal.log'})")


async def run_meters(portfolio_path: Path, portfolio: Portfolio, opening: dict[str, int], bootstrap: str,
                     seconds: float, speed: float, watch: CommandWatch, partitions: int,
                     services: Services) -> dict[str, Any]:
    from collectors.run import run_collector
    from collectors.sim_portfolio import mall_simulator

    mall_id = portfolio.malls[0].id
    mall_tz = ZoneInfo(portfolio.malls[0].timezone)
    start_ms = int(datetime.fromisoformat(SIM_START).timestamp() * 1000)
    sim = mall_simulator(portfolio, mall_id, speed=speed, start_ms=start_ms)
    await sim.start()
    # the portal's clock follows the simulator's, so its payments carry the mall's simulated time
    merchant = start_portal(services, portfolio_path, opening, (sim.now_ms(), int(time.time() * 1000), speed))
    # one merchant's contactor sticks for the first command: the stream's retry trips it
    stuck = min(opening, key=lambda a: (opening[a], a))
    stuck_meter = next(m.id for m in portfolio.malls[0].meters if m.account == stuck)
    sim.meters[stuck_meter].faults.ignore_relay_writes = 3
    say(f"meter {stuck_meter} ({stuck}) ignores its first relay command: watch for a retried command")
    stop = asyncio.Event()
    stats: dict[str, Any] = {}
    collector = asyncio.create_task(run_collector(
        portfolio_path, mall_id, stop, bootstrap=bootstrap, clock=sim.now_ms, poll_interval_s=1.0,
        spool_dir=DEMO_DIR / "spool", stats=stats, progress=False, command_offset_reset="earliest",
        command_max_age_s=None))  # simulated time runs faster than the wall clock
    publish_topups(bootstrap, portfolio, opening, start_ms, "opening", partitions)
    say(f"paid in opening balances for {len(opening)} merchants; simulating at {speed:g}x real time")
    t0 = time.monotonic()
    topped_up: set[str] = set()
    through_portal: asyncio.Task[None] | None = None
    try:
        while (elapsed := time.monotonic() - t0) < seconds:
            await asyncio.sleep(min(10.0, seconds - elapsed))
            services.check()
            if collector.done():
                collector.result()  # re-raises the collector's error
            sim_time = datetime.fromtimestamp(sim.now_ms() / 1000, mall_tz).strftime("%H:%M")
            say(f"t={time.monotonic() - t0:4.0f}s sim {sim_time}  readings={stats.get('readings', 0)}  "
                f"trips={watch.trips} reconnects={watch.reconnects} confirmed={watch.confirmed}")
            if merchant is not None and through_portal is None and time.monotonic() - t0 >= seconds / 2:
                # in the background: the meters keep running while the money goes round
                through_portal = asyncio.create_task(merchant.topup(50_000, watch))
                topped_up.add(merchant.account)
            if time.monotonic() - t0 >= seconds / 2 and watch.tripped - topped_up:
                due = {a: 50_000 for a in watch.tripped - topped_up}
                publish_topups(bootstrap, portfolio, due, sim.now_ms(), f"rescue{len(topped_up)}", partitions)
                topped_up |= set(due)
                say(f"{len(due)} tripped merchant(s) topped up 500.00 {portfolio.currency}: expect reconnects")
    finally:
        stop.set()
        if through_portal is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(through_portal, 5)
        await asyncio.wait_for(collector, 30)
        await sim.stop()
    retried = [f"{c} -> {watch.retry_outcomes.get(c, 'no outcome yet')}" for c in watch.retries]
    return {**stats, "topups_opening": len(opening), "topups_rescue": len(topped_up), "retried": retried,
            "portal_merchant": merchant}


def summary_queries() -> dict[str, str]:
    return {
        "readings": "SELECT count() AS readings, uniqExact(circuit_id) AS circuits FROM mallwatt.readings",
        "energy_money": "SELECT round(sumIf(energy_wh, kind = 'charge') / 1000, 1) AS kwh_charged, "
                        "-sumIf(amount_minor, kind = 'charge') / 100 AS charged, "
                        "sumIf(amount_minor, kind = 'topup') / 100 AS topped_up, count() AS ledger_entries "
                        "FROM mallwatt.ledger FINAL",
        "alerts": "SELECT kind, count() AS n FROM mallwatt.alerts FINAL GROUP BY kind ORDER BY kind",
        "commands": "SELECT action, reason, count() AS n FROM mallwatt.relay_commands FINAL "
                    "GROUP BY action, reason ORDER BY action, reason",
        "outcomes": "SELECT action, status, count() AS n FROM mallwatt.relay_outcomes FINAL "
                    "GROUP BY action, status ORDER BY action, status",
    }


def print_summary(stats: dict[str, Any]) -> None:
    from infra import warehouse

    print("\n=== mallwatt demo summary ===", flush=True)
    print(f"collector: {stats.get('readings', 0)} readings published, opening top-ups "
          f"{stats['topups_opening']}, rescue top-ups {stats['topups_rescue']}")
    print(f"retried relay commands: {len(stats.get('retried', []))}")
    for line in stats.get("retried", [])[:5]:
        print(f"  {line}")
    for title, sql in summary_queries().items():
        columns, rows = warehouse.query(sql)
        print(f"\n-- {title}")
        print("  " + " | ".join(columns))
        for row in rows:
            print("  " + " | ".join(str(v) for v in row))
    hints = "".join(f"  MALLWATT_CHDB_PATH=var/demo/chdb .venv/bin/mallwatt sql \"{q}\"\n" for q in NEXT_QUERIES)
    print(f"\nWhere to look next (the warehouse is in var/demo/chdb):\n{hints}  logs: {DEMO_DIR}/*.log",
          flush=True)


def export_bills(portfolio_path: Path, merchant_id: str) -> None:
    """Statements and the ERP export of the first simulated day, if it has closed."""
    from pipelines.bills.export import main as bills_main

    out = DEMO_DIR / "bills"
    common = ["--config", str(portfolio_path), "--path", str(DEMO_DIR / "chdb")]
    print(f"\n-- bills for {BILL_DAY}", flush=True)
    written = io.StringIO()
    with contextlib.redirect_stdout(written):
        failed = bills_main([*common, "export", "--day", BILL_DAY, "--format", "csv", "--format", "json",
                             "--html", "--out", str(out)])
    if failed:
        print(written.getvalue(), end="", flush=True)
        print("  (no bills: see the reason above; the day closes after ~70 s of the default demo)", flush=True)
        return
    print(f"  statement of {merchant_id}:", flush=True)
    bills_main([*common, "statement", "--account", merchant_id, "--day", BILL_DAY])
    files = [line for line in written.getvalue().splitlines() if line.strip()]
    print(f"  {len(files)} files (ERP documents and lines as CSV and JSON, one HTML statement per merchant, "
          f"the export register) in {out}", flush=True)


def wait_for_sink(published: int, timeout: float = 60.0) -> None:
    """Wait until the warehouse's reading count stops growing (or the timeout)."""
    from infra import warehouse

    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        try:
            _, rows = warehouse.query("SELECT count() FROM mallwatt.readings FINAL")
            count = int(rows[0][0])
        except Exception:
            count = -1
        if count >= 0 and count == last:
            break
        last = count
        time.sleep(3.0)
    say(f"warehouse holds {last} distinct readings of {published} published "
        "(re-sent duplicates collapse on circuit and timestamp)")


def start_portal(services: Services, portfolio_path: Path, opening: dict[str, int],
                 sim_clock: tuple[int, int, float]) -> PortalMerchant:
    """The portal beside the worker, a token for the merchant most likely to run out of credit
    (the lowest opening balance but the one whose contactor sticks), and its link."""
    from pipelines.portal.auth import TokenStore

    store = DEMO_DIR / "portal-tokens.json"
    ranked = sorted(opening, key=lambda a: (opening[a], a))
    account = ranked[1] if len(ranked) > 1 else ranked[0]  # ranked[0] is the stuck-contactor merchant
    token = TokenStore(store).create("merchant", account, int(time.time() * 1000))[1]
    services.start("portal", "portal", "serve", "--config", str(portfolio_path), "--port", str(PORTAL_PORT),
                   "--store", str(store), "--warehouse", str(DEMO_DIR / "chdb"),
                   "--sim-clock", ",".join(str(x) for x in sim_clock))
    merchant = PortalMerchant(account, token)
    say(f"merchant portal for {account} (opening {opening[account] / 100:.2f}); open on a phone or browser:\n"
        f"    {merchant.link()}\n  (more links: MALLWATT_PORTAL_TOKENS={store} mallwatt portal token create "
        f"--account <id>; halfway through, {account} tops up 500.00 through this page's API)")
    return merchant


def monitoring_up() -> bool:
    """Prometheus and Alertmanager scraping the sink and the worker (infra/monitoring.py);
    the demo goes on without them where Debian's packages cannot be installed."""
    from infra import monitoring as mon

    os.environ.setdefault("MALLWATT_MONITORING_DIR", str(DEMO_DIR / "monitoring"))
    os.environ.setdefault("MALLWATT_SCRAPE_INTERVAL", "5s")
    os.environ.setdefault("MALLWATT_ALERT_FOR", "30s")  # the demo's 2 minutes: alerts within seconds
    try:
        started = mon.up(scrape=("sink", "worker"))
    except Exception as exc:  # monitoring is a bonus here, never the demo's failure
        say(f"monitoring not started: {exc}")
        return False
    say(f"Prometheus at {started['prometheus']} (alerts: {started['alertmanager']}), scraping sink and worker")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt demo",
        description="Run one simulated mall end to end on real components (Kafka broker, faust "
        "worker, ClickHouse sink, Modbus TCP meters) for a bounded time, print a summary, and "
        "stop everything it started. State lives in var/demo (wiped at the start).")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 120)),
                        help="how long the meters run, in real seconds (env DEMO_SECONDS; default 120)")
    parser.add_argument("--stalls", type=int, default=24, help="merchants in the simulated mall (default 24)")
    parser.add_argument("--speed", type=float, default=600.0,
                        help="simulated seconds per real second (default 600: 20 h of trading in 2 min, "
                        "so the first day closes and its bills are exported)")
    args = parser.parse_args(argv)

    # SIGTERM unwinds like Ctrl-C, so the cleanup below always stops what was started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    partitions = T.default_partitions()
    portfolio_path = DEMO_DIR / "portfolio.yaml"
    data = generate(1, args.stalls, seed=11, base_port=15120, low_balance_share=0.3)
    # the opening balances are paid in as top-ups (ledger entries), not carried in the config
    opening = {}
    for merchant in data["malls"][0]["merchants"]:
        opening[merchant["id"]] = merchant.pop("opening_balance_minor", 0)
    dump_portfolio(data, portfolio_path)
    portfolio = parse_portfolio(data)
    say(f"portfolio: 1 mall, {args.stalls} merchants, {len(portfolio.malls[0].meters)} meters -> {portfolio_path}")

    kafka = broker.BrokerConfig.from_env(data_dir=DEMO_DIR / "kafka", port=DEMO_PORT, controller_port=DEMO_PORT + 1)
    external = kafka.external
    env = {**os.environ, "MALLWATT_CONFIG": str(portfolio_path), "MALLWATT_CHDB_PATH": str(DEMO_DIR / "chdb"),
           "MALLWATT_APP_ID": "mallwatt-demo", "PYTHONUNBUFFERED": "1",
           # the demo's 2 minutes are hours of trading: retry a failed relay command after 5 s
           "MALLWATT_RELAY_BACKOFF_MS": os.environ.get("MALLWATT_RELAY_BACKOFF_MS", "5000")}
    os.environ["MALLWATT_CHDB_PATH"] = env["MALLWATT_CHDB_PATH"]
    services = Services(env)
    watch: CommandWatch | None = None
    monitored = False
    try:
        say("starting Kafka (first run downloads the jars from Maven Central)...")
        bootstrap = broker.start(kafka).bootstrap
        env["MALLWATT_KAFKA"] = bootstrap
        os.environ["MALLWATT_KAFKA"] = bootstrap
        T.provision_topics(bootstrap)
        say(f"kafka at {bootstrap}; the sink owns the warehouse in {env['MALLWATT_CHDB_PATH']} and migrates it")
        services.start("sink", "sink")
        services.start("worker", "worker", "--config", str(portfolio_path))
        monitored = monitoring_up()
        watch = CommandWatch(bootstrap)
        watch.start()
        time.sleep(3.0)
        services.check()
        stats = asyncio.run(run_meters(portfolio_path, portfolio, opening, bootstrap, args.seconds, args.speed, watch,
                                       partitions, services))
        say("meters stopped; waiting for the pipeline to drain into the warehouse...")
        time.sleep(5.0)
        wait_for_sink(int(stats.get("readings", 0)))
        print_summary(stats)
        export_bills(portfolio_path, portfolio.malls[0].merchants[0].id)
        asyncio.run(stats["portal_merchant"].statement(BILL_DAY))
        return 0
    except Exception as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        from infra import monitoring as mon

        alerts = mon.alert_line() if monitored else None  # the alert state, before stopping
        # each step on its own: one failing must not leave the others running
        for step in (watch.stop if watch is not None else None, services.stop,
                     None if external else lambda: broker.stop(kafka), mon.down if monitored else None):
            if step is None:
                continue
            try:
                step()
            except Exception as exc:
                say(f"cleanup step failed: {exc}")
        say("stopped everything the demo started")
        if alerts:
            say(f"Alertmanager at the end: {alerts}")
