"""Prometheus and Alertmanager for the local stack: `mallwatt stack up --monitoring`.

Debian's packages (`prometheus`, `prometheus-alertmanager`; promtool comes with the first)
are installed by infra.debian when missing. Both run as this user's processes on loopback
under var/monitoring (MALLWATT_MONITORING_DIR), never as system services:

    var/monitoring/prometheus.yml         scrape config: one job mallwatt-<component> each
    var/monitoring/targets/<c>.json       its targets (file_sd: rewritten without a restart)
    var/monitoring/rules.yml              infra/prometheus/rules.yml (MALLWATT_ALERT_FOR: every `for:`)
    var/monitoring/alertmanager.yml       one route; a webhook when MALLWATT_ALERT_WEBHOOK is set
    var/monitoring/{prometheus,alertmanager}.{pid,log}, data/

Settings (environment): MALLWATT_PROMETHEUS_PORT (9090), MALLWATT_ALERTMANAGER_PORT (9093),
MALLWATT_SCRAPE_INTERVAL (15s; also the rule evaluation interval), MALLWATT_ALERT_FOR (unset:
the rules' own `for:`; e.g. `5s` in tests and demos), MALLWATT_ALERT_WEBHOOK (a URL that gets
Alertmanager's webhook JSON). Component ports: pipelines.metrics.metrics_port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "infra" / "prometheus" / "rules.yml"
PACKAGES = ("prometheus", "prometheus-alertmanager")


class MonitoringError(RuntimeError):
    """Prometheus or Alertmanager could not be set up or started; the message says why."""


@dataclass(frozen=True)
class MonitoringConfig:
    directory: Path
    prometheus_port: int
    alertmanager_port: int
    scrape_interval: str
    alert_for: str | None
    webhook: str | None

    @classmethod
    def from_env(cls) -> MonitoringConfig:
        env = os.environ
        interval = env.get("MALLWATT_SCRAPE_INTERVAL", "15s")
        alert_for = env.get("MALLWATT_ALERT_FOR") or None
        for name, value in (("MALLWATT_SCRAPE_INTERVAL", interval), ("MALLWATT_ALERT_FOR", alert_for)):
            if value is not None and not re.fullmatch(r"\d+(ms|s|m|h)", value):
                raise MonitoringError(f"{name}={value!r}: not a Prometheus duration such as 15s or 5m")
        return cls(directory=Path(env.get("MALLWATT_MONITORING_DIR", str(ROOT / "var" / "monitoring"))),
                   prometheus_port=_port("MALLWATT_PROMETHEUS_PORT", 9090),
                   alertmanager_port=_port("MALLWATT_ALERTMANAGER_PORT", 9093),
                   scrape_interval=interval, alert_for=alert_for,
                   webhook=env.get("MALLWATT_ALERT_WEBHOOK") or None)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise MonitoringError(f"{name}={raw!r}: not a port number") from None


# --- configuration files (pure) -------------------------------------------------------------

def scrape_config(config: MonitoringConfig, components: list[str]) -> dict[str, Any]:
    """prometheus.yml: one job per component (`mallwatt-<component>`, as the rules expect),
    its targets in targets/<component>.json, alerts to the local Alertmanager."""
    return {
        "global": {"scrape_interval": config.scrape_interval, "evaluation_interval": config.scrape_interval,
                   "scrape_timeout": _timeout(config.scrape_interval)},
        "rule_files": [str(config.directory / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [f"127.0.0.1:{config.alertmanager_port}"]}]}]},
        "scrape_configs": [{"job_name": f"mallwatt-{c}",
                            "file_sd_configs": [{"files": [str(config.directory / "targets" / f"{c}.json")],
                                                 "refresh_interval": "30s"}]}
                           for c in components],
    }


def _timeout(interval: str) -> str:
    """A scrape timeout no longer than the interval (Prometheus refuses a longer one)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", interval)
    seconds = int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 10
    return f"{max(1, min(10, int(seconds)))}s" if seconds >= 1 else interval


def targets(component: str, port: int, host: str = "127.0.0.1") -> list[dict[str, Any]]:
    return [{"targets": [f"{host}:{port}"], "labels": {"component": component}}]


def rules_text(alert_for: str | None, source: Path = RULES) -> str:
    """The rule file, every `for:` replaced by `alert_for` when given (tests, demos: alerts
    within seconds; the thresholds stay as they are)."""
    text = source.read_text()
    if alert_for is None:
        return text
    return re.sub(r"(?m)^(\s+for:\s*)\S+\s*$", lambda m: m.group(1) + alert_for, text)


def alertmanager_config(config: MonitoringConfig) -> dict[str, Any]:
    receiver: dict[str, Any] = {"name": "mallwatt"}
    if config.webhook:
        receiver["webhook_configs"] = [{"url": config.webhook, "send_resolved": True}]
    return {"route": {"receiver": "mallwatt", "group_by": ["alertname", "job"], "group_wait": "5s",
                      "group_interval": "30s", "repeat_interval": "4h"},
            "receivers": [receiver]}


# --- processes ----------------------------------------------------------------------------

def ensure_installed() -> dict[str, str]:
    """Debian's prometheus and alertmanager (promtool included), installed when missing."""
    from infra.debian import DebianUnavailable, ensure_packages

    try:
        ensure_packages(PACKAGES)
    except DebianUnavailable as exc:
        raise MonitoringError(f"cannot install {' '.join(PACKAGES)}: {exc}") from None
    # Debian names the Alertmanager binary after its package
    found = {name: shutil.which(binary) or f"/usr/bin/{binary}" for name, binary in
             (("prometheus", "prometheus"), ("alertmanager", "prometheus-alertmanager"), ("promtool", "promtool"))}
    missing = [p for p in found.values() if not os.access(p, os.X_OK)]
    if missing:
        raise MonitoringError(f"installed but not executable: {', '.join(missing)}")
    return found


def _pid_alive(pid_file: Path, binary: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if binary.encode() in cmdline.split(b"\0", 1)[0] else None  # not a reused pid


def _wait_ready(url: str, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise MonitoringError(f"{url} not ready in {seconds:.0f} s; {log}:\n{tail}")


def _start(name: str, args: list[str], config: MonitoringConfig, url: str) -> int:
    pid_file = config.directory / f"{name}.pid"
    running = _pid_alive(pid_file, name)
    if running:
        os.kill(running, signal.SIGHUP)  # re-read the (rewritten) config and rules
        return running
    log = config.directory / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=config.directory)
    pid_file.write_text(f"{proc.pid}\n")
    _wait_ready(url, 60, log)
    return proc.pid


def running_components() -> list[str]:
    """Components whose metrics port answers /healthz now."""
    from infra.stack import probe_health
    from pipelines.metrics import DEFAULT_PORTS, metrics_port

    return [c for c in DEFAULT_PORTS if metrics_port(c) >= 0 and probe_health(metrics_port(c)) != "not running"]


def write_targets(config: MonitoringConfig, components: list[str]) -> None:
    from pipelines.metrics import metrics_port

    folder = config.directory / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    for c in components:
        tmp = folder / f".{c}.json"
        tmp.write_text(json.dumps(targets(c, metrics_port(c))))
        tmp.replace(folder / f"{c}.json")  # atomic: Prometheus never reads half a file


def up(scrape: tuple[str, ...] = ()) -> dict[str, object]:
    """Write the configs and start (or reload) Prometheus and Alertmanager; components scraped:
    those running now plus `scrape`."""
    config = MonitoringConfig.from_env()
    tools = ensure_installed()
    d = config.directory
    (d / "data" / "prometheus").mkdir(parents=True, exist_ok=True)
    (d / "data" / "alertmanager").mkdir(parents=True, exist_ok=True)
    components = sorted(set(running_components()) | set(scrape))
    write_targets(config, components)
    (d / "rules.yml").write_text(rules_text(config.alert_for))
    (d / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(config, components), sort_keys=False))
    (d / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(config), sort_keys=False))
    check = subprocess.run([tools["promtool"], "check", "config", str(d / "prometheus.yml")],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise MonitoringError(f"promtool check config failed: {(check.stdout + check.stderr).strip()[-1500:]}")
    am = _start("alertmanager", [tools["alertmanager"], f"--config.file={d / 'alertmanager.yml'}",
                                 f"--storage.path={d / 'data' / 'alertmanager'}",
                                 f"--web.listen-address=127.0.0.1:{config.alertmanager_port}",
                                 "--cluster.listen-address="], config, config.alertmanager_url)
    prom = _start("prometheus", [tools["prometheus"], f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data' / 'prometheus'}",
                                 "--storage.tsdb.retention.time=7d",
                                 f"--web.listen-address=127.0.0.1:{config.prometheus_port}",
                                 "--web.enable-lifecycle"], config, config.prometheus_url)
    return {"prometheus": config.prometheus_url, "prometheus_pid": prom, "alertmanager": config.alertmanager_url,
            "alertmanager_pid": am, "scraped": components}


def down() -> dict[str, object]:
    """Stop both (SIGTERM, then SIGKILL after 10 s); only the pids this stack started."""
    config = MonitoringConfig.from_env()
    stopped = []
    for name in ("prometheus", "alertmanager"):
        pid_file = config.directory / f"{name}.pid"
        pid = _pid_alive(pid_file, name)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _pid_alive(pid_file, name):
                time.sleep(0.1)
            if _pid_alive(pid_file, name):
                os.kill(pid, signal.SIGKILL)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return {"monitoring_stopped": stopped}


def status() -> dict[str, object]:
    """Both processes' health; {} when monitoring was never started here."""
    config = MonitoringConfig.from_env()
    out: dict[str, object] = {}
    for name, url in (("prometheus", config.prometheus_url), ("alertmanager", config.alertmanager_url)):
        if not (config.directory / f"{name}.pid").exists():
            continue
        try:
            with urllib.request.urlopen(url + "/-/healthy", timeout=1):
                out[name] = url
        except (OSError, urllib.error.URLError):
            out[name] = "not running"
    return out


def query(expr: str, url: str | None = None) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API: the result vector."""
    import urllib.parse

    base = url or MonitoringConfig.from_env().prometheus_url
    with urllib.request.urlopen(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise MonitoringError(f"query {expr!r}: {body}")
    return list(body["data"]["result"])


def active_alerts(url: str | None = None) -> list[dict[str, Any]]:
    """Alertmanager's current alerts (API v2)."""
    base = url or MonitoringConfig.from_env().alertmanager_url
    with urllib.request.urlopen(f"{base}/api/v2/alerts", timeout=5) as r:
        return list(json.loads(r.read()))


def alert_line(url: str | None = None) -> str:
    """One line for people: the alerts firing in Alertmanager now, or that none are."""
    try:
        alerts = active_alerts(url)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return f"alertmanager unreachable: {exc}"
    firing = sorted({a["labels"].get("alertname", "?") for a in alerts if a.get("status", {}).get("state") == "active"})
    if not firing:
        return "alerts: none firing"
    return f"alerts firing ({len(firing)}): " + ", ".join(firing)
