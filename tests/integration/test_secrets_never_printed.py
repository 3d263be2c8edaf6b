"""Secrets never appear in what the CLI prints or logs (issue 16, "Done when").

Every command that prints settings or may echo them in an error runs with a known
ClickHouse password (in MALLWATT_CLICKHOUSE), a known Kafka SCRAM password and known
webhook HMAC secrets (one in the environment, one inline in notify.yaml); none of them may appear in stdout, stderr or
a log file. The server URL points at a closed port, so the error paths run too. No
broker is needed: a private, unused Kafka port is set so nothing touches the shared one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CH_PASSWORD = "Canary-CH-pass-7d41c0"
ENV_SECRET = "canary-env-hmac-secret-0123456789abcdef"
INLINE_SECRET = "canary-inline-hmac-secret-0123456789abcdef"
SHORT_SECRET = "canary-short"
KAFKA_PASSWORD = "canary-kafka-scram-pw-93e1"
CANARIES = (CH_PASSWORD, ENV_SECRET, INLINE_SECRET, SHORT_SECRET, KAFKA_PASSWORD)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLWATT_")}
    env.update({
        "PYTHONPATH": str(REPO),
        "MALLWATT_CLICKHOUSE": f"http://analyst:{CH_PASSWORD}@127.0.0.1:1/mallwatt",
        "MALLWATT_SMS_SECRET": ENV_SECRET,
        "MALLWATT_KAFKA_SECURITY": "SASL_SSL", "MALLWATT_KAFKA_USER": "notifier",
        "MALLWATT_KAFKA_PASSWORD": KAFKA_PASSWORD,
        "MALLWATT_KAFKA_PORT": "29491", "MALLWATT_KAFKA_CONTROLLER_PORT": "29492",
        "MALLWATT_KAFKA_DATA_DIR": str(tmp_path / "kafka"),
        "MALLWATT_CHDB_PATH": str(tmp_path / "chdb"),
    })
    return env


def _notify_config(tmp_path: Path, inline_secret: str) -> Path:
    path = tmp_path / f"notify-{len(inline_secret)}.yaml"
    path.write_text(yaml.safe_dump({
        "providers": {
            "sms": {"type": "webhook", "url": "https://sms.example.com/hook", "secret_env": "MALLWATT_SMS_SECRET"},
            "voice": {"type": "webhook", "url": "https://voice.example.com/hook", "secret": inline_secret},
        },
        "routes": [{"kinds": ["*"], "providers": ["sms", "voice"]}],
    }))
    return path


def _run(args: list[str], env: dict[str, str], timeout: float = 120,
         stop_after: float | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    if stop_after is None:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    # a long-running service: let it start and log, then stop it like an operator would
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            out, _ = proc.communicate(timeout=stop_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        return proc.returncode, out


def test_no_cli_command_prints_or_logs_a_secret(tmp_path: Path) -> None:
    env = _env(tmp_path)
    good, short = _notify_config(tmp_path, INLINE_SECRET), _notify_config(tmp_path, SHORT_SECRET)
    commands: list[tuple[list[str], float | None]] = [
        (["--help"], None),
        (["stack", "status"], None),
        (["stack", "status", "--json"], None),
        (["sql", "SELECT 1"], None),  # the server is unreachable: the error path
        (["sql", "OPTIMIZE TABLE mallwatt.ledger FINAL", "--write"], None),
        (["query", "account_balances", "--param", "mall_id="], None),
        (["notify", "--config", str(good), "--check"], None),
        (["notify", "--config", str(short), "--check"], None),  # refused: the error must not echo it
        (["notify", "--config", str(good), "--bootstrap", "127.0.0.1:29491", "--log-level", "DEBUG"], 8.0),
    ]
    outputs: dict[str, str] = {}
    for args, stop_after in commands:
        _, out = _run(args, env, stop_after=stop_after)
        outputs[" ".join(args)] = out
    warehouse_status = subprocess.run([sys.executable, "-m", "infra.warehouse", "status"], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=60)
    outputs["infra.warehouse status"] = warehouse_status.stdout + warehouse_status.stderr
    logs = {str(p): p.read_text(errors="replace") for p in tmp_path.rglob("*.log")}

    leaks = [(where, canary) for where, text in {**outputs, **logs}.items() for canary in CANARIES if canary in text]
    assert leaks == [], leaks
    # The commands really printed the settings (redacted), so the test can fail.
    assert "warehouse: unavailable" in outputs["stack status"]  # it tried the server, with the URL
    assert "http://analyst:***@127.0.0.1:1/mallwatt" in outputs["infra.warehouse status"]
    assert "at least 32 bytes" in outputs[f"notify --config {short} --check"]
    assert ": ok (2 provider(s)" in outputs[f"notify --config {good} --check"]
