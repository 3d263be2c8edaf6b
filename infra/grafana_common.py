"""What every mallwatt Grafana file shares: units by column name, and the provisioning's
environment expansion done exactly as Grafana does it.

Grafana's provisioning expands `$VAR` and `${VAR}` only (Go's os.Expand; `$$` is a
literal `$`): `${VAR:-default}` becomes the value of a variable literally named
`VAR:-default`, i.e. empty. Defaults therefore live here (`GRAFANA_ENV_DEFAULTS`), and
whoever starts Grafana passes `grafana_environment()` as its environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GRAFANA_DIR = Path(__file__).resolve().parent / "grafana"

# Values the provisioning files read; the password has no default (a read-only user's).
GRAFANA_ENV_DEFAULTS: dict[str, str] = {
    "MALLWATT_CH_HOST": "127.0.0.1",
    "MALLWATT_CH_PORT": "8123",
    "MALLWATT_CH_USER": "default",
    "MALLWATT_CH_PASSWORD": "",
    "MALLWATT_PROMETHEUS_URL": "http://127.0.0.1:9090",
    "MALLWATT_DASHBOARDS_DIR": str(GRAFANA_DIR / "dashboards"),
}

# Grafana units by column name (byRegexp overrides, so tables and charts agree; where two
# match, Grafana applies both in order, so the later, more specific rule wins). Money is
# integer minor units (fen), never converted to a float currency.
UNIT_RULES: list[tuple[str, str, int | None]] = [
    (r"/(^|_)kwh$|^kwh_(open|closed|total|previous)$|^change_kwh$|_kwh_day$/", "kwatth", 3),
    (r"/^kwh_per_m2(_day)?$/", "suffix: kWh/m²", 4),
    (r"/(^|_)kw$|^avg_kw(_open|_closed)?$/", "kwatt", 3),
    (r"/(^|_)power_w$/", "watt", 0),
    (r"/_minor$/", "suffix: fen", 0),
    (r"/(^|_)share(_of_day)?$|^completeness$|^change_pct$|^closed_share$|^vs_median$|ratio$/",
     "percentunit", 1),
    (r"/^lag_s$/", "s", 1),
    (r"/_minor_per_kwh$/", "suffix: fen/kWh", 2),  # after kWh: Grafana's last match wins
]


def unit_overrides() -> list[dict[str, Any]]:
    out = []
    for regex, unit, decimals in UNIT_RULES:
        props: list[dict[str, Any]] = [{"id": "unit", "value": unit}]
        if decimals is not None:
            props.append({"id": "decimals", "value": decimals})
        out.append({"matcher": {"id": "byRegexp", "options": regex}, "properties": props})
    return out


def field_config(unit: str = "short", *, decimals: int | None = None, overrides: bool = True,
                 **defaults: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"unit": unit, **defaults}
    if decimals is not None:
        d["decimals"] = decimals
    return {"defaults": d, "overrides": unit_overrides() if overrides else []}


# --- Grafana's expansion -----------------------------------------------------------------

_SPECIAL = set("*#$@!?-0123456789")


def _shell_name(s: str) -> tuple[str, int]:
    """Go's os.getShellName: (name, characters consumed after the `$`)."""
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SPECIAL and s[2] == "}":
            return s[1], 3
        end = s.find("}", 1)
        if end == 1:
            return "", 2  # "${}": bad syntax, eaten
        if end < 0:
            return "", 1  # "${" without "}": eaten
        return s[1:end], end + 1
    if s[0] in _SPECIAL:
        return s[0], 1
    i = 0
    while i < len(s) and (s[i] == "_" or s[i].isascii() and s[i].isalnum()):
        i += 1
    return s[:i], i


def grafana_expand(text: str, env: Mapping[str, str]) -> str:
    """Expand like Grafana's provisioning (Go os.Expand; `$$` -> `$`); unset -> empty."""
    out: list[str] = []
    i = j = 0
    while j < len(text):
        if text[j] == "$" and j + 1 < len(text):
            out.append(text[i:j])
            name, w = _shell_name(text[j + 1:])
            if name == "" and w == 0:
                out.append("$")  # "$" before a non-name: kept
            elif name == "$":
                out.append("$")
            elif name:
                out.append(env.get(name, ""))
            j += w
            i = j + 1
        j += 1
    out.append(text[i:])
    return "".join(out)


_REF = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z0-9_]+)")


def referenced_variables(text: str) -> set[str]:
    return {a or b for a, b in _REF.findall(text)}


def grafana_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start Grafana with: the caller's, plus the defaults."""
    base = dict(os.environ if env is None else env)
    for key, value in GRAFANA_ENV_DEFAULTS.items():
        base.setdefault(key, value)
    return base


__all__ = ["GRAFANA_ENV_DEFAULTS", "field_config", "grafana_environment", "grafana_expand",
           "referenced_variables", "unit_overrides"]


# --- the ClickHouse plugin's macros (for tests and `mallwatt sql` checks of panel SQL) -----

_TIME_FILTER = re.compile(r"\$__(timeFilter|dateFilter|dateTimeFilter|timeFilter_ms)\(([^()]*)\)")


def expand_clickhouse_macros(sql: str, start: str, end: str, variables: Mapping[str, str]) -> str:
    """Panel SQL as the grafana-clickhouse-datasource plugin sends it: `start`/`end` are
    ClickHouse DateTime expressions for the range; ${var} and $var from `variables`."""
    def time_filter(m: re.Match[str]) -> str:
        col = m.group(2).strip()
        if m.group(1) == "dateFilter":
            return f"{col} >= toDate({start}) AND {col} <= toDate({end})"
        return f"{col} >= {start} AND {col} <= {end}"

    sql = _TIME_FILTER.sub(time_filter, sql)
    sql = (sql.replace("$__fromTime_ms", start).replace("$__toTime_ms", end)
           .replace("$__fromTime", start).replace("$__toTime", end)
           .replace("$__interval_s", "60"))
    for name, value in variables.items():
        sql = sql.replace("${" + name + "}", value)
        sql = re.sub(r"\$" + re.escape(name) + r"\b", value, sql)
    return sql
