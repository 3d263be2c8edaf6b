"""`mallwatt sql` and `mallwatt query`: the analyst's way into the warehouse.

Both work while the pipeline runs: with the embedded engine the sink owns the folder and
answers over its loopback endpoint (see docs/warehouse.md).
"""

from __future__ import annotations

import argparse
import sys

from infra import warehouse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt sql",
        description="Run one SQL statement against the warehouse (embedded chDB in var/chdb, or "
        "MALLWATT_CLICKHOUSE) and print the result as a table. Read-only (readonly=1, no INTO OUTFILE, "
        "no functions reaching files, URLs or other servers) unless --write.")
    parser.add_argument("statement", help='e.g. "SELECT kind, count() FROM mallwatt.alerts GROUP BY kind"')
    parser.add_argument("--write", action="store_true",
                        help="allow a statement that changes data (needs the admin role: MALLWATT_ROLE=admin)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="bind {NAME:Type} placeholders")
    parser.add_argument("--path", help="chDB folder (default MALLWATT_CHDB_PATH or var/chdb)")
    args = parser.parse_args(argv)
    extra = ["--path", args.path] if args.path else []
    rest = ["sql", args.statement, *(["--write"] if args.write else [])]
    rest += [x for p in args.param for x in ("--param", p)]
    return warehouse.main([*extra, *rest])


def query_main(argv: list[str] | None = None) -> int:
    """`mallwatt query NAME --param k=v --format table|csv|json|parquet [--out FILE]`."""
    from infra.warehouse_catalog import query_main as catalog_query_main

    return catalog_query_main(argv)


if __name__ == "__main__":
    sys.exit(main())
