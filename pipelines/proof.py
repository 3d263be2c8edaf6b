"""Does what the stream published equal a replay of the same input? Entry by entry.

The chaos proof (tests/integration/test_chaos.py) and the in-memory stream model
(tests/unit/pipelines/test_arrival_replay.py) call `compare`; it returns every problem it
finds (an empty list: equal). Raw records go in as published, duplicates included:

- **Ledger**: every published entry is checked, not a dict keyed by id. Copies of one
  entry id must be identical in every field (a forwarder re-publish); a second entry with
  the same id and any other field (a double credit has another balance_after) fails, as does
  an entry the replay does not have, or a replay entry the stream lacks. Each field of each
  entry equals the replay's (amount, balance after, debt change, energy, ...).
- **Balance chain**: per account, in the order the stream published them, each entry's
  balance_after is the one before plus its amount (from 0), so the stream's own history adds up.
- **Final balances**: per account, the last balance_after the stream published, the sum of
  its entries, the replay's final balance and (when given) the worker's stored state agree.
- **Relay commands** and **alerts**: the same ids with the same fields; the replay's wallet
  commands pass through the stream's relay gate (`pipelines.relaygate`) and its rejected
  readings become the stream's meter_fault alerts, as `pipelines.billing` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from pipelines.core import timeguard
from pipelines.relaygate import set_hold
from schemas.ledger import LEDGER_COLUMNS

LEDGER_FIELDS = tuple(LEDGER_COLUMNS)
ALERT_FIELDS = ("alert_id", "kind", "severity", "mall_id", "account_id", "meter_id", "ts_ms", "message", "details")
COMMAND_FIELDS = ("command_id", "action", "reason", "mall_id", "gateway_id", "meter_id", "account_id", "cause_ts_ms",
                  "requested_by")
GUARD_REASONS = (timeguard.FUTURE, timeguard.BEFORE_START, timeguard.ABSURD)
MAX_LISTED = 20  # problems listed per kind (the count is always given)


@dataclass
class Published:
    """What the stream published, raw, in the order it was read back."""

    ledger: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    worker_balances: dict[str, int] | None = None  # from the worker's stored state, when read


@dataclass
class Replayed:
    """The replay's outputs (frames as `mallwatt replay` writes them)."""

    ledger: pl.DataFrame
    balances: pl.DataFrame
    alerts: pl.DataFrame | None = None
    commands: pl.DataFrame | None = None
    rejected_readings: pl.DataFrame | None = None


def _norm(value: Any) -> Any:
    return float(value) if isinstance(value, float) else value


def _record(row: dict[str, Any], fields: Iterable[str]) -> tuple[Any, ...]:
    return tuple(_norm(row.get(f)) for f in fields)


class _Problems(list[str]):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= MAX_LISTED:
            self.append(f"{kind}: {text}")

    def summary(self) -> list[str]:
        more = [f"{kind}: {n - MAX_LISTED} more" for kind, n in self.counts.items() if n > MAX_LISTED]
        return [*self, *more]


def compare(published: Published, replayed: Replayed, ctx: Any = None) -> list[str]:
    """Every difference between the stream's published outputs and the replay (empty: equal).
    ``ctx`` (a pipelines.context.BillingContext) is needed to compare relay commands and
    meter_fault alerts; without it only the ledger and balances are compared."""
    problems = _Problems()
    _ledger(published.ledger, replayed.ledger, problems)
    _balances(published, replayed, problems)
    if ctx is not None:
        _signatures(published.commands, problems)
        _keyed("command", published.commands, expected_commands(replayed.commands, ctx), "command_id",
               COMMAND_FIELDS, problems)
        # a refused reading's alert id carries the reason (a late reading and its re-sent copy
        # are two alerts); every alert must equal the replay's, none is excused
        _keyed("alert", published.alerts, expected_alerts(replayed.alerts, replayed.rejected_readings, ctx),
               "alert_id", ALERT_FIELDS, problems, unique_ids=False)
    return problems.summary()


def _signatures(commands: list[dict[str, Any]], problems: _Problems) -> None:
    """Every published relay command carries a valid signature of the worker's key (the
    replay has none: signing happens at publish time, so it is checked here, not compared)."""
    from pipelines.signing import relay_verifier

    verifier = relay_verifier()
    for cmd in commands:
        problem = verifier.problem(cmd)
        if problem is not None:
            problems.add("command", f"command {cmd['command_id']} published with {problem}")


def _ledger(records: list[dict[str, Any]], expected: pl.DataFrame, problems: _Problems) -> None:
    want: dict[str, tuple[Any, ...]] = {}
    for row in expected.select(LEDGER_FIELDS).iter_rows(named=True):
        if row["entry_id"] in want:
            problems.add("replay", f"entry {row['entry_id']} twice in the replay")
        want[row["entry_id"]] = _record(row, LEDGER_FIELDS)
    seen: dict[str, tuple[Any, ...]] = {}
    for row in records:
        rec = _record(row, LEDGER_FIELDS)
        first = seen.setdefault(row["entry_id"], rec)
        if first != rec:
            problems.add("ledger", f"entry {row['entry_id']} published twice with different fields: "
                                   f"{_diff(first, rec, LEDGER_FIELDS)}")
    for entry_id, rec in seen.items():
        if entry_id not in want:
            problems.add("ledger", f"entry {entry_id} published but not in the replay: {dict(zip(LEDGER_FIELDS, rec, strict=True))}")
        elif want[entry_id] != rec:
            problems.add("ledger", f"entry {entry_id} differs from the replay: {_diff(want[entry_id], rec, LEDGER_FIELDS)}")
    for entry_id in want.keys() - seen.keys():
        problems.add("ledger", f"entry {entry_id} of the replay never published")
    if len(seen) != len(want):
        problems.add("ledger", f"{len(seen)} distinct entries published, {len(want)} in the replay")


def _diff(expected: tuple[Any, ...], got: tuple[Any, ...], fields: tuple[str, ...]) -> str:
    return ", ".join(f"{f} {a!r} != {b!r}" for f, a, b in zip(fields, expected, got, strict=True) if a != b)


def stream_balances(records: list[dict[str, Any]], problems: _Problems | None = None) -> dict[str, int]:
    """The last balance_after per account, in publish order (first copy of each entry), checking
    that every balance_after is the one before plus the entry's amount."""
    last: dict[str, int] = {}
    done: set[str] = set()
    for row in records:
        if row["entry_id"] in done:
            continue
        done.add(row["entry_id"])
        account = row["account_id"]
        before = last.get(account, 0)
        if problems is not None and before + row["amount_minor"] != row["balance_after_minor"]:
            problems.add("chain", f"{account}: entry {row['entry_id']} balance_after {row['balance_after_minor']} "
                                  f"!= {before} + {row['amount_minor']}")
        last[account] = row["balance_after_minor"]
    return last


def _balances(published: Published, replayed: Replayed, problems: _Problems) -> None:
    last = stream_balances(published.ledger, problems)
    sums: dict[str, int] = {}
    for entry_id, row in {r["entry_id"]: r for r in published.ledger}.items():
        del entry_id
        sums[row["account_id"]] = sums.get(row["account_id"], 0) + row["amount_minor"]
    final = dict(replayed.balances.select("account_id", "balance_minor").iter_rows())
    accounts = set(final) | set(last) | set(published.worker_balances or {})
    for account in sorted(accounts):
        want = final.get(account, 0)
        if last.get(account, 0) != want:
            problems.add("balance", f"{account}: last published balance_after {last.get(account, 0)}, replay {want}")
        if sums.get(account, 0) != want:
            problems.add("balance", f"{account}: published entries sum to {sums.get(account, 0)}, replay {want}")
        if published.worker_balances is not None and published.worker_balances.get(account, 0) != want:
            problems.add("balance", f"{account}: worker state {published.worker_balances.get(account, 0)}, replay {want}")


def expected_commands(commands: pl.DataFrame | None, ctx: Any) -> list[dict[str, Any]]:
    """The replay's wallet commands as the stream's relay commands (`billing.gate_wallet_commands`)."""
    if commands is None or not commands.height:
        return []
    holds: dict[str, dict[str, list[str]]] = {}
    out: list[dict[str, Any]] = []
    for row in commands.iter_rows(named=True):
        account = row["account_id"]
        mine = holds.setdefault(account, {})
        meters = ctx.account_meters.get(account, [])
        if row["action"].upper() == "TRIP":
            gated = set_hold(mine, meters, "warning" if row["reason"] == "warning" else "credit", True,
                             row["command_id"])
        else:
            gated = set_hold(mine, meters, "warning", False, row["command_id"], row["reason"])
            gated += set_hold(mine, meters, "credit", False, row["command_id"], row["reason"])
        for g in gated:
            route = ctx.meter_route[g.meter_id]
            out.append({"command_id": g.command_id, "action": g.action, "reason": g.reason, "mall_id": route.mall_id,
                        "gateway_id": route.gateway_id, "meter_id": g.meter_id, "account_id": account,
                        "cause_ts_ms": row["cause_ts_ms"], "requested_by": "pipeline"})
    return out


def expected_alerts(alerts: pl.DataFrame | None, rejected: pl.DataFrame | None, ctx: Any) -> list[dict[str, Any]]:
    """The replay's wallet alerts, and its rejected readings as the stream's meter_fault alerts
    (`billing.outbox_items`; readings refused by the time guard go to dead letters instead)."""
    out: list[dict[str, Any]] = []
    for row in (alerts.iter_rows(named=True) if alerts is not None else []):
        details = json.loads(row["details"]) if row["details"] else {}
        out.append({**row, "details": {k: str(v) for k, v in details.items()}})
    for row in (rejected.iter_rows(named=True) if rejected is not None else []):
        route = ctx.circuit_meter.get(row["circuit_id"])
        if route is None or str(row["reason"]).split(":")[0] in GUARD_REASONS:
            continue
        out.append({"alert_id": f"{row['circuit_id']}:rej:{row['ts_ms']}:{row['reason']}", "kind": "meter_fault",
                    "severity": "WARNING",
                    "mall_id": route.mall_id, "account_id": route.account_id, "meter_id": row["meter_id"],
                    "ts_ms": row["ts_ms"], "message": f"reading not billed: {row['reason']}",
                    "details": {"circuit_id": row["circuit_id"], "import_kwh": str(row["import_kwh"]),
                                "reason": str(row["reason"])}})
    return out


def _keyed(kind: str, published: list[dict[str, Any]], expected: list[dict[str, Any]], key: str,
           fields: tuple[str, ...], problems: _Problems, unique_ids: bool = True) -> None:
    """Records by id (``unique_ids``: one record per id, else by id and every field)."""
    def ident(row: dict[str, Any], rec: tuple[Any, ...]) -> Any:
        return row[key] if unique_ids else (row[key], repr(rec))

    want: dict[Any, tuple[Any, ...]] = {}
    for row in expected:
        rec = _record(row, fields)
        if want.setdefault(ident(row, rec), rec) != rec:
            problems.add(kind, f"{row[key]} twice in the replay with different fields")
    seen: dict[Any, tuple[Any, ...]] = {}
    for row in published:
        rec = _record(row, fields)
        first = seen.setdefault(ident(row, rec), rec)
        if first != rec:
            problems.add(kind, f"{row[key]} published twice with different fields: {_diff(first, rec, fields)}")
    for k, rec in seen.items():
        if k not in want:
            problems.add(kind, f"{k} published but not in the replay")
        elif want[k] != rec:
            problems.add(kind, f"{k} differs from the replay: {_diff(want[k], rec, fields)}")
    for k in want.keys() - seen.keys():
        problems.add(kind, f"{k} of the replay never published")
