"""`mallwatt bench portal --merchants 350000 --json`: the merchant portal at portfolio scale.

One run on a private broker (--port, +1 for its controller; data in --dir):

1. History: the read model's input as the forwarder publishes it, for every merchant but
   the top-up sample: an opening top-up and --hours hourly interval charges per account
   (balances consistent), LedgerBatches of at most BATCH entries per account shard, in
   ledger order, on mallwatt.ledger. Producing it directly keeps the bench's minutes for the
   portal; the worker's own output has this shape (bench scale measures the worker).
2. The real money path for the --topups sample accounts: the worker and forwarder
   (`mallwatt worker --no-forwarder`, `mallwatt forward`, as bench scale runs them) with the
   whole portfolio; each sample account gets an opening top-up through them first.
3. `mallwatt portal serve` as a subprocess (the directory of all N accounts, the feed
   replaying the topics); `portal_ready_s` is from its start to /health caught up.
4. Load, open loop: GET balance at --rate requests/s for --duration-s over random
   accounts with merchant tokens (--tokens of them); latency from each request's
   scheduled time, so a slow answer delays no later request's clock. Meanwhile --topups
   signed webhooks of a generic HMAC provider, one per sample account, spread over the
   run; `topup_to_balance_ms` runs from the webhook's 2xx (Kafka acked the payment) to the
   balance API showing the credited balance (polled every POLL_MS with the account's token,
   through claims, wallet, forwarder and the portal's feed).
5. Memory: the portal's RSS with all accounts loaded, and the read model alone measured
   with tracemalloc in this process: per account as fed here, and per account with every
   bound of readmodel.py full (a month of interval charges).

Progress goes to stderr, the JSON to stdout. Every process the bench starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
BATCH = 400  # entries per LedgerBatch (the forwarder splits above 60 kB; ~120 B per entry)
POLL_MS = 20
OPENING = 10_000_000
HOUR_MS = 3_600_000
KEYS = ("merchants", "accounts_in_read_model", "hours_of_history", "history_entries", "history_produce_s",
        "portal_ready_s", "portal_rss_mb", "portal_rss_bytes_per_account", "readmodel_bytes_per_account",
        "readmodel_bytes_per_account_full", "readmodel_projected_mb_full", "offered_rps", "achieved_rps",
        "balance_requests", "balance_errors", "balance_p50_ms", "balance_p99_ms", "balance_max_ms",
        "topup_samples", "topup_failures", "topup_to_balance_ms_p50", "topup_to_balance_ms_p99",
        "topup_to_balance_ms_max", "webhook_ms_p50", "webhook_ms_p99", "health_p50_ms", "health_p99_ms",
        "portal_cpu_ms_per_request", "load_average", "failure", "notes")


def log(text: str) -> None:
    print(f"[bench portal {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)


# --- input -------------------------------------------------------------------------------

def history_frames(accounts: list[str], malls: list[str], circuits: list[str], hours: int, end_ms: int,
                   seed: int = 7) -> list[pl.DataFrame]:
    """One frame per hour step (step 0: the opening top-ups), LEDGER_COLUMNS, consistent balances."""
    from schemas.ledger import LEDGER_COLUMNS

    rng = np.random.default_rng(seed)
    n = len(accounts)
    acc, mall, circ = pl.Series(accounts), pl.Series(malls), pl.Series(circuits)
    start = end_ms - hours * HOUR_MS
    balance = np.full(n, OPENING, dtype=np.int64)
    frames = [pl.DataFrame({"entry_id": acc + ":topup:open-" + acc, "account_id": acc, "mall_id": mall,
                            "kind": "topup", "amount_minor": balance, "balance_after_minor": balance,
                            "ts_ms": np.full(n, start - 1, dtype=np.int64), "source_id": "open-" + acc})]
    periods = ["valley", "flat", "peak", "sharp"]
    for h in range(hours):
        ts = start + (h + 1) * HOUR_MS
        wh = rng.integers(200, 6000, n)
        amount = -(wh * rng.integers(30, 170, n) // 1000) - 1
        balance = balance + amount
        ids = acc + ":chg:" + circ + f":{ts}"  # as the wallet names a charge, whose source is its own id
        frames.append(pl.DataFrame({
            "entry_id": ids, "account_id": acc, "mall_id": mall, "kind": "charge",
            "amount_minor": amount, "balance_after_minor": balance, "ts_ms": np.full(n, ts, dtype=np.int64),
            "source_id": ids, "meter_id": None, "circuit_id": circ,
            "interval_start_ms": np.full(n, ts - HOUR_MS, dtype=np.int64), "energy_wh": wh,
            "tou_period": periods[(ts // HOUR_MS) % 4], "tier": 1, "rate": "0.95"}))
    out = []
    for frame in frames:
        missing = [pl.lit(None, dtype).alias(c) for c, dtype in LEDGER_COLUMNS.items() if c not in frame.columns]
        out.append(frame.with_columns(missing).select(
            [pl.col(c).cast(dtype) for c, dtype in LEDGER_COLUMNS.items()]).with_columns(
            pl.col("estimated").fill_null(False)))
    return out


def encode_history(frames: list[pl.DataFrame], partitions: int) -> list[tuple[int, bytes]]:
    """(partition, LedgerBatch bytes) in ledger order: step by step, each account in its shard."""
    from schemas import codec
    from schemas.keys import account_shard
    from schemas.ledger import ledger_batches

    shard_of = {a: account_shard(a, partitions) for a in frames[0]["account_id"].to_list()}
    out = []
    for step, frame in enumerate(frames):
        shards = frame.with_columns(pl.col("account_id").replace_strict(shard_of, return_dtype=pl.Int32).alias("_p"))
        for (p,), part in shards.sort("_p", maintain_order=True).group_by("_p", maintain_order=True):
            slices = [(f"hist-{step}-{p}-{i}", i, min(BATCH, part.height - i)) for i in range(0, part.height, BATCH)]
            for record in ledger_batches(part, slices):
                out.append((int(p), codec.encode("LedgerBatch", record)))
    return out


# --- memory --------------------------------------------------------------------------------

def readmodel_bytes(frames: list[pl.DataFrame], mall_tz: dict[str, str]) -> float:
    """tracemalloc bytes per account of a ReadModel fed these frames through the feed's own
    decoding (LedgerBatch -> batch_entries -> apply_entries)."""
    from pipelines.portal.readmodel import ReadModel
    from schemas import codec
    from schemas.ledger import batch_entries, frame_to_ledger_batch

    accounts = frames[0].height
    gc.collect()
    tracemalloc.start()
    model = ReadModel(mall_tz)
    base = tracemalloc.get_traced_memory()[0]
    for step, frame in enumerate(frames):
        for i in range(0, frame.height, BATCH):
            record = codec.decode("LedgerBatch", codec.encode("LedgerBatch", frame_to_ledger_batch(
                frame.slice(i, BATCH), f"m{step}-{i}")))
            model.apply_entries(batch_entries(record), 0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(model.accounts) == accounts
    return used / accounts


def full_account_bytes(sample: int = 300) -> float:
    """Per account with every bound full: 35 days of charges at four entries an hour, plus
    top-ups, alerts and relay commands."""
    from pipelines.portal.readmodel import ACTIVITY, ALERTS, DAYS, ReadModel

    accounts = [f"B{i // 700:03d}-S{i % 700 + 1:04d}" for i in range(sample)]
    end = 1_784_080_800_000
    frames = history_frames(accounts, [a[:4] for a in accounts], [f"{a}-C1" for a in accounts], 48, end)
    gc.collect()
    tracemalloc.start()
    model = ReadModel({})
    base = tracemalloc.get_traced_memory()[0]
    for frame in frames:
        model.apply_entries(frame.to_dicts(), 0)
    for a in accounts:  # the rest of the month: one charge per day keeps every daily row
        for day in range(DAYS):
            ts = end - (day + 3) * 24 * HOUR_MS
            model.apply_entries([{"entry_id": f"{a}:chg:x:{ts}", "account_id": a, "mall_id": a[:4], "kind": "charge",
                                  "amount_minor": -500, "balance_after_minor": 1, "ts_ms": ts, "energy_wh": 900,
                                  "tou_period": "flat", "interval_start_ms": ts - 900_000}], 0)
        model.apply_entries([{"entry_id": f"{a}:pay:t{k}", "account_id": a, "mall_id": a[:4], "kind": "topup",
                              "amount_minor": 5000, "balance_after_minor": 5000, "ts_ms": end + k,
                              "source_id": f"sim:{secrets.token_hex(8)}"} for k in range(ACTIVITY)], 0)
        for k in range(ALERTS):
            model.apply_alert({"alert_id": f"{a}:low:{k}", "account_id": a, "mall_id": a[:4], "kind": "LOW_BALANCE",
                               "severity": "WARNING", "ts_ms": end + k, "message": "余额不足 50.00，请及时充值"})
        model.apply_relay_command({"account_id": a, "mall_id": a[:4], "action": "RECONNECT", "issued_at_ms": end,
                                   "cause_ts_ms": end, "reason": "topup"})
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / sample


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- load ----------------------------------------------------------------------------------

async def baseline_phase(args: argparse.Namespace, base: str, result: dict[str, Any]) -> None:
    """The same open loop on GET /health (no token, no read model): what this machine and
    aiohttp give at this rate, so the balance figures read as a ratio within one run."""
    import aiohttp

    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def one(scheduled: float) -> None:
            try:
                async with http.get(f"{base}/api/v1/health") as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError):
                pass
            latencies.append((time.perf_counter() - scheduled) * 1000)

        tasks = []
        n = int(args.rate * args.baseline_s)
        t0 = time.perf_counter()
        for i in range(n):
            scheduled = t0 + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    result.update(health_p50_ms=percentile(latencies, 0.5), health_p99_ms=percentile(latencies, 0.99))


async def load_phase(args: argparse.Namespace, base: str, tokens: dict[str, str], sample: list[str],
                     provider: Any, result: dict[str, Any]) -> None:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    topup_ms: list[float] = []
    webhook_ms: list[float] = []
    failures: list[str] = []
    accounts = sorted(set(tokens) - set(sample))
    rnd = random.Random(3)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def balance(account: str) -> dict[str, Any] | None:
            async with http.get(f"{base}/api/v1/accounts/{account}/balance",
                                headers={"Authorization": f"Bearer {tokens[account]}"}) as r:
                return await r.json() if r.status == 200 else None

        async def one(account: str, scheduled: float) -> None:
            nonlocal errors
            try:
                found = await balance(account)
                if found is None:
                    errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append((time.perf_counter() - scheduled) * 1000)

        async def topup(account: str, k: int) -> None:
            before = await balance(account)
            if before is None or before["balance_minor"] is None:
                failures.append(f"{account}: no balance before the top-up")
                return
            amount = 1000 + k
            body = json.dumps({"transaction_id": f"bench-{k}-{secrets.token_hex(4)}", "account_id": account,
                               "amount_minor": amount}).encode()
            sent = time.perf_counter()
            async with http.post(f"{base}/api/v1/webhooks/bench", data=body,
                                 headers=provider.sign(body, int(time.time() * 1000))) as r:
                acked = time.perf_counter()
                if r.status != 200:
                    failures.append(f"{account}: webhook {r.status} {await r.text()}")
                    return
            webhook_ms.append((acked - sent) * 1000)
            want = before["balance_minor"] + amount
            deadline = acked + 30
            while time.perf_counter() < deadline:
                now = await balance(account)
                if now is not None and now["balance_minor"] == want:
                    topup_ms.append((time.perf_counter() - acked) * 1000)
                    return
                await asyncio.sleep(POLL_MS / 1000)
            failures.append(f"{account}: balance not {want} within 30 s of the 2xx")

        tasks: list[asyncio.Task[None]] = []
        n = int(args.rate * args.duration_s)
        every = max(1, n // max(1, len(sample)))
        t0 = time.perf_counter()
        for i in range(n):
            scheduled = t0 + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rnd.choice(accounts), scheduled)))
            if i % every == every // 2 and i // every < len(sample):
                tasks.append(asyncio.create_task(topup(sample[i // every], i // every)))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - t0
    result.update(offered_rps=args.rate, achieved_rps=round(len(latencies) / took, 1),
                  balance_requests=len(latencies), balance_errors=errors,
                  balance_p50_ms=percentile(latencies, 0.5), balance_p99_ms=percentile(latencies, 0.99),
                  balance_max_ms=percentile(latencies, 1.0), topup_samples=len(topup_ms),
                  topup_failures=failures[:10] or 0, topup_to_balance_ms_p50=percentile(topup_ms, 0.5),
                  topup_to_balance_ms_p99=percentile(topup_ms, 0.99), topup_to_balance_ms_max=percentile(topup_ms, 1.0),
                  webhook_ms_p50=percentile(webhook_ms, 0.5), webhook_ms_p99=percentile(webhook_ms, 0.99))


async def wait_health(base: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the portal exited with {proc.returncode}")
            try:
                async with http.get(f"{base}/api/v1/health") as r:
                    body = await r.json()
                    if body["feed"] and body["feed"]["caught_up"]:
                        return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"the portal's feed did not catch up within {timeout_s:.0f} s")


async def wait_balances(base: str, tokens: dict[str, str], accounts: list[str], timeout_s: float,
                        check: Any) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    pending = set(accounts)
    async with aiohttp.ClientSession() as http:
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} sample accounts had no opening balance after {timeout_s:.0f} s "
                                   "(the worker did not credit them)")
            check()
            for account in list(pending):
                async with http.get(f"{base}/api/v1/accounts/{account}/balance",
                                    headers={"Authorization": f"Bearer {tokens[account]}"}) as r:
                    if r.status == 200 and (await r.json())["balance_minor"]:
                        pending.discard(account)
            await asyncio.sleep(1.0)


# --- the run -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mallwatt bench portal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merchants", type=int, default=350_000)
    p.add_argument("--hours", type=int, default=6, help="hourly charges per account in the history (default 6)")
    p.add_argument("--rate", type=float, default=500.0, help="balance requests per second (default 500)")
    p.add_argument("--duration-s", type=float, default=30.0, help="load duration (default 30)")
    p.add_argument("--baseline-s", type=float, default=10.0, help="GET /health at --rate before (default 10)")
    p.add_argument("--topups", type=int, default=40, help="webhook top-ups during the load (default 40)")
    p.add_argument("--tokens", type=int, default=1000, help="merchant tokens the load spreads over (default 1000)")
    p.add_argument("--port", type=int, default=29420, help="private broker port (+1 for its controller)")
    p.add_argument("--portal-port", type=int, default=29430)
    p.add_argument("--dir", type=Path, default=ROOT / "var" / "bench-portal", help="work directory (emptied)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="print only the JSON figures on stdout (always so)")
    args = p.parse_args(argv)
    if args.merchants < args.topups + 10 or args.rate <= 0 or args.duration_s <= 0:
        p.error("--merchants must exceed --topups; --rate and --duration-s must be positive")
    args.dir = args.dir.resolve()
    return args


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from confluent_kafka import Producer

    from bench.scale_input import payment, write_portfolio
    from bench.scale_kafka import Processes, cpu_seconds
    from infra import broker
    from infra import topics as T
    from pipelines.money_input import produce_payment
    from pipelines.portal.auth import TokenStore
    from pipelines.portal.providers import HmacProvider

    kafka = broker.BrokerConfig(data_dir=args.dir / "kafka", port=args.port, controller_port=args.port + 1)
    procs: Processes | None = None
    portal: subprocess.Popen[bytes] | None = None
    try:
        log(f"writing the {args.merchants}-merchant portfolio")
        roster = write_portfolio(args.merchants, args.dir)
        circuits = roster.circuits.filter(pl.col("account_id").is_in(roster.merchants)).unique("account_id",
                                                                                               keep="first")
        rnd = random.Random(5)
        sample = sorted(rnd.sample(roster.merchants, args.topups))
        fed = circuits.filter(~pl.col("account_id").is_in(sample)).sort("account_id")
        partitions = T.default_partitions()
        log(f"starting a private broker on port {args.port}")
        bootstrap = broker.start(kafka).bootstrap
        T.provision_topics(bootstrap)
        T.wait_until_served(bootstrap)
        started = time.time()
        end_ms = int(time.time() * 1000) - 60_000
        frames = history_frames(fed["account_id"].to_list(), fed["mall_id"].to_list(), fed["circuit_id"].to_list(),
                                args.hours, end_ms)
        messages = encode_history(frames, partitions)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "compression.type": "lz4",
                             "queue.buffering.max.kbytes": 262144})
        for partition, value in messages:
            while True:
                try:
                    producer.produce(T.LEDGER, value=value, partition=partition)
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(120)
        entries = sum(f.height for f in frames)
        result.update(hours_of_history=args.hours, history_entries=entries,
                      history_produce_s=round(time.time() - started, 1))
        log(f"history: {entries} ledger entries in {len(messages)} LedgerBatches ({result['history_produce_s']} s)")

        env = {"MALLWATT_KAFKA": bootstrap, "MALLWATT_APP_ID": "bench-portal",
               "MALLWATT_FAUST_DIR": str(args.dir / "faust"), "MALLWATT_STORE": "rocksdb://",
               "MALLWATT_WORKER_NAME": "bench-portal-worker"}
        procs = Processes(args.dir, env, roster.config)
        procs.start_forwarder()
        procs.start_worker()
        now = int(time.time() * 1000)
        for account in sample:  # the sample's history comes from the worker itself
            produce_payment(producer, payment(f"open-{account}", account, OPENING, now), partitions)
        producer.flush(30)
        del producer  # before the broker stops, or librdkafka keeps reconnecting until exit

        log(f"creating {args.tokens} merchant tokens")
        store = TokenStore(args.dir / "tokens.json")
        chosen = sample + rnd.sample(fed["account_id"].to_list(), args.tokens)
        tokens = {a: store.create("merchant", a, now)[1] for a in chosen}
        secret = secrets.token_hex(16)
        penv = {**os.environ, **env, "MALLWATT_PORTAL_PROVIDERS": "bench=BENCH_PORTAL_SECRET",
                "BENCH_PORTAL_SECRET": secret, "MALLWATT_PORTAL_SIMULATED": "0"}
        base = f"http://127.0.0.1:{args.portal_port}"
        log("starting the portal")
        t_portal = time.time()
        with open(args.dir / "portal.log", "wb") as out:
            portal = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "portal", "serve", "--config",
                                       str(roster.config), "--port", str(args.portal_port), "--store",
                                       str(args.dir / "tokens.json"), "--rate", "50", "--no-statements"],
                                      cwd=ROOT, env=penv, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        health = asyncio.run(wait_health(base, args.ready_timeout_s, portal))
        result["portal_ready_s"] = round(time.time() - t_portal, 1)
        log(f"portal caught up after {result['portal_ready_s']} s: {health['accounts_seen']} accounts seen")
        log("waiting for the worker to credit the sample's opening top-ups")
        asyncio.run(wait_balances(base, tokens, sample, args.ready_timeout_s, procs.check))
        rss = rss_bytes(portal.pid)
        health = asyncio.run(wait_health(base, 30, portal))
        result.update(accounts_in_read_model=health["accounts_seen"], portal_rss_mb=round(rss / 2**20, 1),
                      portal_rss_bytes_per_account=round(rss / args.merchants))
        log(f"baseline: {args.rate:g} GET /health per second for {args.baseline_s:g} s")
        asyncio.run(baseline_phase(args, base, result))
        log(f"load: {args.rate:g} balance requests/s for {args.duration_s:g} s, {args.topups} webhook top-ups")
        cpu0 = cpu_seconds(portal.pid)
        asyncio.run(load_phase(args, base, tokens, sample, HmacProvider("bench", secret.encode()), result))
        result["portal_cpu_ms_per_request"] = round((cpu_seconds(portal.pid) - cpu0) * 1000
                                                    / max(1, result["balance_requests"]), 2)
        result["load_average"] = round(os.getloadavg()[0], 1)
        log(f"balance p50/p99 {result['balance_p50_ms']}/{result['balance_p99_ms']} ms at {result['achieved_rps']} "
            f"req/s; top-up to balance p50/p99 {result['topup_to_balance_ms_p50']}/"
            f"{result['topup_to_balance_ms_p99']} ms ({result['topup_samples']} samples)")
    finally:
        if portal is not None and portal.poll() is None:
            os.killpg(portal.pid, signal.SIGTERM)
            try:
                portal.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(portal.pid, signal.SIGKILL)
        if procs is not None:
            procs.close()
        broker.stop(kafka)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = dict.fromkeys(KEYS)
    result.update(merchants=args.merchants, notes=[])
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    try:
        run(args, result)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON with the figures so far
        result["failure"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['failure']}\n{traceback.format_exc()}")
    try:
        log("memory: the read model alone, as fed here and with every bound full")
        sample = [f"B{i // 700:03d}-S{i % 700 + 1:04d}" for i in range(2000)]
        frames = history_frames(sample, [a[:4] for a in sample], [f"{a}-C1" for a in sample], args.hours,
                                1_784_080_800_000)
        result["readmodel_bytes_per_account"] = round(readmodel_bytes(frames, {}))
        result["readmodel_bytes_per_account_full"] = round(full_account_bytes())
        result["readmodel_projected_mb_full"] = round(result["readmodel_bytes_per_account_full"] * args.merchants
                                                      / 2**20)
    except Exception as exc:  # noqa: BLE001
        result["notes"].append(f"memory figures failed: {type(exc).__name__}: {exc}")
    print(json.dumps(result))
    return 1 if result["failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
