"""`mallwatt bills`: ERP export, one merchant's statement, reconciliation, pool allocations.

    mallwatt bills export --month 2026-10 --format csv --format xlsx --out DIR [--html]
    mallwatt bills statement --account A --month 2026-10 [--format text|json|html]
    mallwatt bills reconcile --month 2026-10 [--payments provider.jsonl]
    mallwatt bills allocate --month 2026-10 [--posted-at-ms MS]

`--day YYYY-MM-DD` instead of `--month` works everywhere. Bills are only made for periods
the warehouse watermark says are complete. The export register (default
DIR/export-register.json) remembers every exported document; re-exporting an unchanged
period writes byte-identical files, a change produces a correcting document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.home import data_dir
from infra.warehouse import WarehouseError
from pipelines.bills.allocation import Allocation, allocation_postings
from pipelines.bills.build import PeriodBills, load_bills
from pipelines.bills.periods import PeriodOpen, parse_period, require_closed
from pipelines.bills.reconcile import reconcile
from pipelines.bills.register import ExportRegister
from pipelines.bills.render import WRITERS, render_html, render_text
from pipelines.bills.statements import StatementError
from pipelines.portfolio import ConfigError, Portfolio, load_portfolio

REGISTER_NAME = "export-register.json"


def export_bills(bills: PeriodBills, out: str | Path, formats: Sequence[str], *,
                 register: str | Path | None = None, html: bool = False) -> list[Path]:
    """Register the period's statements and write the ERP files from the register."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reg = ExportRegister(register or out / REGISTER_NAME)
    for st in sorted(bills.statements, key=lambda s: s.doc_id):
        reg.record(st.to_document())
    reg.save()
    docs = reg.documents(bills.period.label)
    stem = f"bills-{bills.period.label}"
    written: list[Path] = []
    for fmt in sorted(set(formats)):
        written += WRITERS[fmt](docs, out, stem)
    summary = out / f"{stem}-summary.json"
    summary.write_text(json.dumps({"period": bills.period.label, "malls": bills.summaries,
                                   "pools": [allocation_report(a) for a in bills.allocations]},
                                  sort_keys=True, indent=1) + "\n", encoding="utf-8")
    written.append(summary)
    if html:
        folder = out / "html"
        folder.mkdir(exist_ok=True)
        for doc in docs:
            page = folder / f"{doc['doc_id']}.html"
            page.write_text(render_html(doc), encoding="utf-8")
            written.append(page)
    return written


def allocation_report(a: Allocation) -> dict[str, Any]:
    return {"mall_id": a.mall_id, "pool_id": a.pool_id, "pool_name": a.pool_name, "method": a.method,
            "period": a.period, "cost_minor": a.cost_minor, "energy_wh": a.energy_wh,
            "lines": [{"unit_id": x.unit_id, "account_id": x.account_id, "role": x.role, "share": x.share_text,
                       "amount_minor": x.amount_minor} for x in a.lines]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mallwatt bills", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.environ.get("MALLWATT_CONFIG", str(data_dir("portfolio.yaml"))),
                   help="portfolio config (default %(default)s)")
    p.add_argument("--path", help="chDB folder (default MALLWATT_CHDB_PATH or var/chdb)")
    p.add_argument("--mall", help="one mall only")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("export", "statement", "reconcile", "allocate"):
        s = sub.add_parser(name)
        when = s.add_mutually_exclusive_group(required=True)
        when.add_argument("--month", help="YYYY-MM, local time of each mall")
        when.add_argument("--day", help="YYYY-MM-DD, local time of each mall")
        if name == "export":
            s.add_argument("--format", action="append", choices=sorted(WRITERS), required=True)
            s.add_argument("--out", required=True, help="output folder")
            s.add_argument("--register", help=f"export register file (default OUT/{REGISTER_NAME})")
            s.add_argument("--html", action="store_true", help="also one HTML page per document")
        elif name == "statement":
            s.add_argument("--account", required=True)
            s.add_argument("--format", choices=["text", "json", "html"], default="text")
        elif name == "reconcile":
            s.add_argument("--payments", help="payment provider records (JSON lines: payment_id, account_id, "
                                              "kind, amount_minor) to check collections against")
        else:
            s.add_argument("--posted-at-ms", type=int, help="ts_ms of the postings (default: now)")
    return p


def _reconcile(portfolio: Portfolio, args: argparse.Namespace, label: str) -> dict[str, Any]:
    from pipelines.bills import warehouse_io as io

    period = parse_period(label)
    malls = [portfolio.mall(args.mall)] if args.mall else list(portfolio.malls)
    watermark = io.complete_until_ms(io.LEDGER_TOPIC, args.path)
    totals, rows, energy = {}, [], {}
    for mall in malls:
        require_closed(period, mall.timezone, watermark)
        start, end = period.start_ms(mall.timezone), period.end_ms(mall.timezone)
        totals |= io.account_totals_before(end, mall.id, args.path)
        rows += io.period_entries(start, end, mall.id, args.path)
        if mall.main_meter:
            energy |= io.circuit_energy_wh(start, end, mall.id, args.path)
    provider = None
    if args.payments:
        provider = [json.loads(x) for x in Path(args.payments).read_text().splitlines() if x.strip()]
    # opening balances are ledger entries (kind opening_balance): every balance starts at 0
    return reconcile(label, totals, rows, malls=malls, circuit_wh=energy,
                     provider_payments=provider)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    label = args.month or args.day
    try:
        portfolio = load_portfolio(args.config)
        period = parse_period(label)
        if args.cmd == "reconcile":
            report = _reconcile(portfolio, args, label)
            print(json.dumps(report, indent=1, sort_keys=True))
            return 1 if report["mismatches"] else 0
        bills = load_bills(portfolio, period, mall_id=args.mall, path=args.path)
        if args.cmd == "export":
            for path in export_bills(bills, args.out, args.format, register=args.register, html=args.html):
                print(path)
        elif args.cmd == "statement":
            st = next((s for s in bills.statements if s.account_id == args.account), None)
            if st is None:
                print(f"error: no account {args.account!r} in the config", file=sys.stderr)
                return 1
            doc = st.to_document()
            print({"text": render_text, "html": render_html}.get(args.format, lambda d: json.dumps(
                d, indent=1, sort_keys=True, ensure_ascii=False))(doc), end="")
        else:
            posted = args.posted_at_ms
            for a in bills.allocations:
                # Stamped with the posting time (never before the period end): the wallet applies it
                # now, so a ts in the past would put it behind entries already applied.
                end = period.end_ms(portfolio.mall(a.mall_id).timezone)
                at = posted if posted is not None else max(end, int(time.time() * 1000))
                for rec in allocation_postings(a, at):
                    print(json.dumps(rec, sort_keys=True))
            print(json.dumps([allocation_report(a) for a in bills.allocations], indent=1), file=sys.stderr)
    except (ConfigError, PeriodOpen, StatementError, WarehouseError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
