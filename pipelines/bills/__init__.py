"""Bills: common-area cost sharing, statements, reconciliation and the ERP export.

Everything money-related here is pure (plain ledger dicts in, dataclasses out); only
`warehouse_io` talks to ClickHouse and only `export` touches files. See docs/bills.md.
"""
