"""`mallwatt portal`: serve the merchant portal, and manage its tokens.

    mallwatt portal serve --config portfolio.yaml [--host 127.0.0.1] [--port 8780]
    mallwatt portal token create --account M01-S0001     # prints the token once
    mallwatt portal token create --mall M01              # a mall operator's token
    mallwatt portal token revoke TOKEN_ID
    mallwatt portal token list
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from infra.home import data_dir

DEFAULT_TOKENS = data_dir("portal", "tokens.json")


def _tokens_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("MALLWATT_PORTAL_TOKENS") or DEFAULT_TOKENS)


def _audit_token(action: str, token_id: str, target: str, now_ms: int) -> None:
    """A token issue or revocation on the audit trail (best effort: the token store is the
    authority; a broker that does not answer in 3 s gets a warning, not a failed command).
    The principal is the local OS account that ran the command."""
    import getpass

    from confluent_kafka import Producer

    from infra.broker import bootstrap_servers
    from infra.kafka_security import kafka_config
    from pipelines.audit import audit_record, produce_audit

    record = audit_record(now_ms, f"local:{getpass.getuser()}", action, target, "done", "portal",
                          f"token {token_id}", event_id=f"{action}:{token_id}")
    delivered: list[bool] = []
    try:
        producer = Producer(kafka_config(bootstrap_servers(), **{"message.timeout.ms": 3000, "log_level": 0,
                                                                 "enable.idempotence": True}))
        produce_audit(producer, record, on_delivery=lambda err, _msg: delivered.append(err is None))
        producer.flush(4.0)  # a failed delivery also empties the queue: the callback says which
    except Exception:  # noqa: BLE001 - a bad Kafka setting must not lose the token just made
        pass
    if delivered != [True]:
        print(f"mallwatt portal token: the audit event for {token_id} was not confirmed by Kafka", file=sys.stderr)


def token_main(argv: list[str]) -> int:
    from pipelines.portal.auth import TokenStore

    parser = argparse.ArgumentParser(prog="mallwatt portal token", description="merchant and operator tokens")
    parser.add_argument("--store", help=f"token store (env MALLWATT_PORTAL_TOKENS, default {DEFAULT_TOKENS})")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a token and print it once")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", help="a merchant token for this account")
    who.add_argument("--mall", help="a mall operator token for every account of this mall")
    revoke = sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")
    sub.add_parser("list", help="list tokens (ids, roles, subjects; never the tokens)")
    args = parser.parse_args(argv)
    store, now = TokenStore(_tokens_path(args.store)), int(time.time() * 1000)
    if args.action == "create":
        role, subject = ("merchant", args.account) if args.account else ("operator", args.mall)
        token_id, token = store.create(role, subject, now)
        print(f"token id {token_id} ({role} {subject}); the token is shown only now:", file=sys.stderr)
        print(token)
        _audit_token("token.issue", token_id, f"{role}:{subject}", now)
        return 0
    if args.action == "revoke":
        if not store.revoke(args.token_id, now):
            print(f"mallwatt portal token: no live token {args.token_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.token_id}")
        _audit_token("token.revoke", args.token_id, args.token_id, now)
        return 0
    for row in store.list():
        print(f"{row['token_id']}  {row['role']:<8}  {row['subject']:<20}  "
              f"{'revoked' if row.get('revoked_ms') else 'live'}")
    return 0


def serve_main(argv: list[str]) -> int:
    from aiohttp import web

    from infra import topics as T
    from infra.broker import bootstrap_servers
    from pipelines.portal.app import Portal, build_app
    from pipelines.portal.auth import RateLimiter, TokenStore
    from pipelines.portal.directory import load_directory
    from pipelines.portal.feed import KafkaFeed
    from pipelines.portal.payments import KafkaPaymentSink
    from pipelines.portal.providers import providers_from_env
    from pipelines.portal.readmodel import ReadModel
    from pipelines.portal.statements import Statements, WarehouseSource

    parser = argparse.ArgumentParser(prog="mallwatt portal serve", description="serve the merchant portal")
    parser.add_argument("--config", required=True, help="portfolio YAML or directory (accounts, policies, zones)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics, /healthz, /readyz (env MALLWATT_PORTAL_METRICS_PORT, default 9466)")
    parser.add_argument("--store", help=f"token store (env MALLWATT_PORTAL_TOKENS, default {DEFAULT_TOKENS})")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second per token (burst 3x)")
    parser.add_argument("--warehouse", help="chDB folder the statements are read from (default MALLWATT_CHDB_PATH "
                                            "or var/chdb; MALLWATT_CLICKHOUSE for a server)")
    parser.add_argument("--no-statements", action="store_true", help="serve no statements (no warehouse here)")
    parser.add_argument("--sim-clock", metavar="SIM_MS,WALL_MS,SPEED",
                        help="simulations only (mallwatt demo): the portal's clock reads SIM_MS at wall time WALL_MS "
                             "and runs SPEED times faster, like the meters' simulator, so a simulated payment's "
                             "time is the mall's simulated time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    bootstrap, partitions = bootstrap_servers(), T.default_partitions()
    directory = load_directory(args.config, partitions)
    model, lock = ReadModel(directory.mall_tz), threading.Lock()
    feed = KafkaFeed(bootstrap, model, lock)
    feed.start()
    clock = _sim_clock(args.sim_clock) if args.sim_clock else None
    portal = Portal(model, lock, directory, TokenStore(_tokens_path(args.store)),
                    KafkaPaymentSink(bootstrap, partitions), providers_from_env(dict(os.environ)),
                    limiter=RateLimiter(args.rate, args.rate * 3), feed=feed,
                    base_url=f"http://{args.host}:{args.port}",
                    statements=None if args.no_statements else Statements(WarehouseSource(args.warehouse)))
    if clock is not None:
        portal.clock = clock
        speed = float(args.sim_clock.split(",")[2])
        for provider in portal.providers.values():  # the signature window is wall time, not simulated
            provider.window_ms = int(provider.window_ms * speed)
            provider.nonces.window_ms = provider.window_ms
    print(f"mallwatt portal on http://{args.host}:{args.port}/m  ({len(directory.mall_of)} accounts; "
          f"providers {sorted(portal.providers)})", file=sys.stderr)
    from pipelines import metrics as M

    # /metrics, /healthz, /readyz (ready: the read model has caught up with the topics' ends)
    metrics = M.serve(M.metrics_port("portal", args.metrics_port),
                      ready=lambda: (feed.caught_up.is_set(), "read model caught up" if feed.caught_up.is_set()
                                     else "read model still replaying the topics"))
    try:
        web.run_app(build_app(portal), host=args.host, port=args.port, access_log=None, print=None)
    finally:
        if metrics is not None:
            metrics.close()
        feed.stop()
        portal.sink.close()  # type: ignore[attr-defined]
    return 0


def _sim_clock(text: str) -> Callable[[], int]:
    try:
        sim_ms, wall_ms, speed = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"mallwatt portal serve: --sim-clock {text!r}: expected SIM_MS,WALL_MS,SPEED") from None
    return lambda: int(sim_ms + (time.time() * 1000 - wall_ms) * speed)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    if args[0] == "token":
        return token_main(args[1:])
    if args[0] == "serve":
        return serve_main(args[1:])
    print(f"mallwatt portal: unknown action {args[0]!r}\n{__doc__}", file=sys.stderr)
    return 2



