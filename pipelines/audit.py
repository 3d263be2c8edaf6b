"""The audit trail: AuditEvent records (schemas/audit_event.avsc) on mallwatt.audit, stored in
the warehouse's audit_events table (migration 008) and read with `mallwatt audit`.

What is audited, and by whom (docs/security.md): the worker audits every operator power
command it executes (with the verified principals) or refuses (with the reason) and every
config reload or rejected change; `mallwatt power` audits proposals and approvals. The
claim step audits every operator-signed money command (postings, manual top-ups) it accepts
or refuses, under the verified signer (pipelines.claiming); provider payments are the ledger
itself (every entry names its source), so they are not copied here.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

from infra import topics as T
from pipelines.envelope import OutboxItem
from schemas import codec


def audit_record(ts_ms: int, principal: str, action: str, target: str, result: str, component: str,
                 detail: str = "", event_id: str | None = None) -> dict[str, Any]:
    """One event; without `event_id` the id is a hash of the rest, so re-sending it is idempotent."""
    if event_id is None:
        digest = hashlib.sha256(f"{ts_ms}|{principal}|{action}|{target}|{result}|{detail}".encode()).hexdigest()
        event_id = f"{action}:{digest[:24]}"
    return {"event_id": event_id, "ts_ms": int(ts_ms), "principal": principal or "unknown", "action": action,
            "target": target, "result": result, "component": component, "detail": detail[:2000]}


def audit_item(record: dict[str, Any]) -> OutboxItem:
    return OutboxItem(T.AUDIT, record["principal"].encode(), codec.encode("AuditEvent", record))


def produce_audit(producer: Any, record: dict[str, Any], **kwargs: Any) -> None:
    """Produce one event with a confluent-kafka producer (the caller flushes; kwargs such as
    on_delivery go to produce)."""
    producer.produce(T.AUDIT, key=record["principal"].encode(), value=codec.encode("AuditEvent", record), **kwargs)


def refused_order_audit(command: dict[str, Any], ctx: Any, problem: str) -> dict[str, Any]:
    """A refused operator command: the principals verified before the refusal, else the claimed
    signer marked unverified (a forged order must not be booked under the name it claims)."""
    decision = ctx.operator_decision(command)
    claimed = [s.get("operator_id", "?") for s in command.get("signatures") or []]
    principal = "+".join(decision.principals) or ("unverified:" + "+".join(claimed) if claimed else "anonymous")
    return audit_record(command["ts_ms"], principal, "power.refused", f"meter:{command['meter_id']}",
                        decision.verdict.value, "worker", f"order {command['order_id']} {command['scope'].lower()} "
                        f"{command['target_id']}: {problem}", event_id=f"{command['command_id']}:refused")


def config_audit(holder: Any, changed: bool, now_ms: int) -> dict[str, Any]:
    """A config reload (or a rejected change) as the worker saw it; the principal is the file."""
    if changed:
        return audit_record(now_ms, f"config:{holder.path}", "config.reload", str(holder.path), "accepted",
                            "worker", f"version {holder.version}")
    return audit_record(now_ms, f"config:{holder.path}", "config.rejected", str(holder.path), "refused",
                        "worker", f"kept version {holder.version}: {holder.last_error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt audit",
        description="The audit trail from the warehouse: who switched power, approved or was refused, which "
        "config was loaded, which tokens were issued (newest first).")
    parser.add_argument("--since-hours", type=float, default=24.0, help="how far back (default %(default)s h)")
    parser.add_argument("--principal", default="", help="one operator id or token id")
    parser.add_argument("--action", default="", help="one action, e.g. power.order, power.refused, money.post, money.topup.refused, config.reload")
    parser.add_argument("--limit", type=int, default=200, help="at most this many rows (default %(default)s)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    from datetime import UTC, datetime, timedelta

    from infra import warehouse

    now = datetime.now(UTC)  # the query window only: audit times themselves come from the events
    params = {"from_ts": now - timedelta(hours=args.since_hours), "to_ts": now + timedelta(minutes=5),
              "principal": args.principal, "action": args.action, "max_rows": max(1, min(args.limit, 100_000))}
    frame = warehouse.run_named_query("audit_trail", params)
    if args.format == "json":
        print(frame.write_json())
    else:
        with_width = frame.with_columns(frame["detail"].str.slice(0, 80))
        print(with_width if frame.height else "no audit events in the window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
