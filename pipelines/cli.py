"""`mallwatt`: one command for operators, analysts and developers.

Each subcommand lives in its own module and is imported only when used, so
`mallwatt sql` does not pay for faust and `mallwatt stack` does not pay for polars.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "stack": ("infra.stack", "main", "start/stop/inspect the local Kafka broker and warehouse (up|down|status)"),
    "generate": ("pipelines.generate", "main", "write a synthetic portfolio config of any size"),
    "simulate": ("collectors.sim_portfolio", "main", "run simulated Modbus meters for a portfolio on loopback"),
    "collect": ("collectors.run", "main", "poll meters, publish readings to Kafka, execute relay commands"),
    "worker": ("pipelines.worker", "main", "run the billing stream worker (faust agents)"),
    "forward": ("pipelines.forwarder", "main", "publish the worker's outputs from its changelog (own process)"),
    "sink": ("pipelines.sink", "main", "copy Kafka topics into ClickHouse and serve warehouse queries"),
    "topup": ("pipelines.payments_cli", "main", "publish a merchant top-up (payment) to Kafka"),
    "post": ("pipelines.postings_cli", "main", "post ledger postings (shared costs, adjustments) to wallets"),
    "power": ("pipelines.power_cli", "main", "remote power off/on for a meter, area, account or mall"),
    "keys": ("pipelines.signing", "main", "Ed25519 key pairs for signed relay and operator commands"),
    "audit": ("pipelines.audit", "main", "the audit trail: power orders, approvals, refusals, config reloads"),
    "sql": ("infra.sql_cli", "main", "run a SQL statement against the warehouse and print a table"),
    "query": ("infra.sql_cli", "query_main", "run a named analytics query from sql/queries"),
    "bills": ("pipelines.bills.export", "main", "ERP export, statements, reconciliation, common-area allocation"),
    "notify": ("pipelines.notify.service", "main", "deliver alerts to merchants/operators (SMS, voice, app push)"),
    "watch": ("pipelines.collector_watch", "main", "collector loss (gateway down, spool growing, silence) -> collector_offline alerts"),
    "replay": ("pipelines.core.replay", "main", "offline replay / re-rating of readings and payments"),
    "export-input": ("pipelines.export_input", "main", "readings and payments from Kafka with their positions, for replay"),
    "portal": ("pipelines.portal.main", "main", "merchant portal: live balance, usage, top-up webhooks (serve|token)"),
    "demo": ("pipelines.demo", "main", "run a simulated mall end to end for a bounded time"),
    "bench": ("bench.cli", "main", "benchmarks printing JSON figures (core|collect|pipeline|warehouse)"),
}

# The worker bills small frames one step at a time on one core, beside the broker: polars'
# thread pool only adds hand-offs there (measured: steps about 10 % faster with one thread).
COMMAND_ENV: dict[str, dict[str, str]] = {"worker": {"POLARS_MAX_THREADS": "1"}}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mallwatt COMMAND [ARGS...]", "",
             "Prepaid electricity for shopping-mall portfolios: meters -> Kafka -> stream billing -> ClickHouse.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "Run `mallwatt COMMAND --help` for a command's options.",
              "Environment: MALLWATT_KAFKA (external bootstrap servers), MALLWATT_CLICKHOUSE (server URL).",
              "Ops: --log-json (or MALLWATT_LOG_FORMAT=json) after any command writes JSON log lines;",
              "services serve /metrics, /healthz, /readyz (ports: docs/operations.md)."]
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version (a source checkout reads pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("mallwatt")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if args[0] in {"--version", "-V", "version"}:
        print(f"mallwatt {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"mallwatt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "--log-json" in rest:  # any command: JSON log lines (pipelines/logsetup.py)
        rest = [a for a in rest if a != "--log-json"]
        os.environ["MALLWATT_LOG_FORMAT"] = "json"
    for key, value in COMMAND_ENV.get(name, {}).items():
        os.environ.setdefault(key, value)  # before the command's modules import polars
    module_name, func_name, _ = COMMANDS[name]
    from infra.redact import install_log_redaction

    install_log_redaction()  # no command logs a credential (docs/security.md)
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = func(rest)
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
