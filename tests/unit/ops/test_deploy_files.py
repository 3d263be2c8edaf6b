"""deploy/: the Dockerfile, compose.yaml, Prometheus config and systemd units, checked against
the code without Docker: every command is a real `mallwatt` command with flags its parser
declares, every MALLWATT_* variable is one the code reads, ports are the components' ports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.kafka_security import PRINCIPALS
from pipelines.cli import COMMAND_ENV, COMMANDS
from pipelines.metrics import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CODE_DIRS = ("pipelines", "infra", "collectors")
APP_COMPONENTS = {"worker", "sink", "collector", "portal", "notify", "watch"}


def _code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


CODE = _code_text()


def _read_by_code(name: str) -> bool:
    """True when some module reads the variable by its literal name (os.environ / getenv)."""
    return f'"{name}"' in CODE or f"'{name}'" in CODE


def _module_source(command: str) -> str:
    module = COMMANDS[command][0]
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    return path.read_text()


def _check_command(argv: list[str], where: str) -> str:
    """`argv` after `mallwatt`: a known command whose flags its module declares; the command."""
    assert argv, f"{where}: empty command"
    command = argv[0]
    assert command in COMMANDS, f"{where}: {command!r} is not a mallwatt command"
    source = _module_source(command)
    for arg in argv[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f'"{flag}"' in source, f"{where}: {command} declares no {flag}"
    return command


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _mallwatt_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if str(svc.get("image", "")).startswith("mallwatt:")}


def test_compose_has_the_full_stack() -> None:
    services = _compose()["services"]
    kafka = {n: s for n, s in services.items() if s.get("image", "").startswith("apache/kafka:")}
    assert sorted(kafka) == ["kafka-1", "kafka-2", "kafka-3"]
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    commands = {_check_command(s["command"], n) for n, s in _mallwatt_services(_compose()).items()}
    assert {"worker", "sink", "collect", "portal", "notify", "watch", "stack"} <= commands


def test_compose_kafka_is_a_three_node_kraft_cluster_at_rf3() -> None:
    services = _compose()["services"]
    voters = services["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{i}@kafka-{i}:9093" for i in (1, 2, 3)]
    for i in (1, 2, 3):
        env = services[f"kafka-{i}"]["environment"]
        assert env["KAFKA_NODE_ID"] == str(i)
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://kafka-{i}:9092"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert len({e["CLUSTER_ID"] for e in (env,)}) == 1
    bootstrap = {s["environment"]["MALLWATT_KAFKA"] for s in _mallwatt_services(_compose()).values()}
    assert bootstrap == {"kafka-1:9092,kafka-2:9092,kafka-3:9092"}


def test_compose_mallwatt_services_use_variables_the_code_reads() -> None:
    services = _mallwatt_services(_compose())
    partitions = set()
    for name, svc in services.items():
        env = svc["environment"]
        for key in env:
            assert key.startswith("MALLWATT_") and _read_by_code(key), f"{name}: {key} is read by no code"
        assert env["MALLWATT_HOME"] == "/var/lib/mallwatt"
        assert env["MALLWATT_CLICKHOUSE"].startswith("http://mallwatt:${MALLWATT_CH_PASSWORD")
        partitions.add(env["MALLWATT_PARTITIONS"])
        if svc["command"][0] != "stack":
            assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert len(partitions) == 1  # account ownership: every component must agree
    workers = [s for s in services.values() if s["command"][0] == "worker"]
    assert len(workers) >= 2
    names = [w["environment"]["MALLWATT_WORKER_NAME"] for w in workers]
    assert len(set(names)) == len(names)  # static membership needs distinct names
    stores = {v.split(":")[0] for w in workers for v in w["volumes"] if not v.startswith("$")}
    assert len(stores) == len(workers)  # each worker its own RocksDB state


def test_compose_grafana_and_prometheus_match_the_repository() -> None:
    compose = _compose()
    grafana = compose["services"]["grafana"]
    provisioning = "\n".join(p.read_text() for p in (ROOT / "infra/grafana/provisioning").rglob("*.y*ml"))
    wanted = set(re.findall(r"\$\{(MALLWATT_[A-Z_]+)\}", provisioning))
    given = {k for k in grafana["environment"] if k.startswith("MALLWATT_")}
    assert wanted == given
    for svc in ("grafana", "prometheus"):
        for volume in compose["services"][svc]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{svc}: {source} does not exist"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules.yml"]
    rules_mount = [v for v in compose["services"]["prometheus"]["volumes"] if "rules.yml" in v]
    assert rules_mount == ["../infra/prometheus/rules.yml:/etc/prometheus/rules.yml:ro"]
    services = compose["services"]
    jobs = {}
    for job in prom["scrape_configs"]:
        component = job["job_name"].removeprefix("mallwatt-")
        assert component in DEFAULT_PORTS, job["job_name"]
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        for target in targets:
            host, port = target.split(":")
            assert host in services, f"{target}: no such compose service"
            assert int(port) == DEFAULT_PORTS[component]
        jobs[component] = len(targets)
    assert set(jobs) == {"collector", "sink", "notify", "worker", "watch"}
    assert jobs["worker"] == sum(1 for s in _mallwatt_services(compose).values() if s["command"][0] == "worker")


def test_compose_variables_are_in_the_env_example() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for name in set(re.findall(r"\$\{([A-Z_]+)", text)):
        assert name in example, f"compose uses ${{{name}}}: add it to deploy/env.example"


def test_dockerfile_builds_the_one_image_from_the_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON=python:3\.1[1-9]-slim", text, re.M)
    assert 'ENTRYPOINT ["mallwatt"]' in text
    assert "ENV MALLWATT_HOME=/var/lib/mallwatt" in text
    assert re.search(r"pip install .*--constraint /tmp/constraints.txt /wheels/mallwatt-\*\.whl", text)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["mallwatt"] == "pipelines.cli:main"
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    assert copied == packages
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for package in packages:
        assert (ROOT / package).is_dir()
        assert f"!{package}/" in ignore
    for port in DEFAULT_PORTS.values():
        assert str(port) in text.split("EXPOSE", 1)[1].splitlines()[0]


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order (systemd allows repeated keys)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, value = line.split("=", 1)
            assert current is not None, f"{path.name}: {key} outside a section"
            sections[current].append((key, value))
    return sections


UNITS = sorted(SYSTEMD.glob("mallwatt-*.service"))


def test_systemd_units_cover_every_long_running_component() -> None:
    names = {re.match(r"mallwatt-(\w+)@?\.service", p.name).group(1) for p in UNITS}
    assert names == APP_COMPONENTS


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit_runs_a_real_command_with_variables_the_code_reads(path: Path) -> None:
    unit = _unit(path)
    service = dict(unit["Service"])
    exec_start = service["ExecStart"].split()
    assert exec_start[0] == "/opt/mallwatt/bin/mallwatt"
    command = _check_command(exec_start[1:], path.name)
    envs = [v.split("=", 1) for k, v in unit["Service"] if k == "Environment"]
    for name, _ in envs:
        assert _read_by_code(name) or name in COMMAND_ENV.get(command, {}), f"{path.name}: {name}"
    env = dict(envs)
    assert env["MALLWATT_HOME"].startswith("%S/mallwatt/")
    assert service["StateDirectory"] == env["MALLWATT_HOME"].removeprefix("%S/")
    assert env["MALLWATT_KAFKA_CREDENTIALS"] == "%d/kafka.json"
    credential = service["LoadCredential"]
    principal = re.fullmatch(r"kafka\.json:/etc/mallwatt/credentials/(\w+)\.json", credential).group(1)
    assert principal in PRINCIPALS
    assert service["User"] == "mallwatt"
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"
    files = [v for k, v in unit["Service"] if k == "EnvironmentFile"]
    assert files[0] == "/etc/mallwatt/mallwatt.env"
    if command == "worker":
        assert env["MALLWATT_WORKER_NAME"] == "%H-%i" and "%i" in service["ExecStart"]


def test_systemd_env_examples_hold_variables_the_code_reads() -> None:
    for name in ("mallwatt.env.example", "clickhouse.env.example"):
        for line in (SYSTEMD / name).read_text().splitlines():
            if line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                assert _read_by_code(key), f"{name}: {key} is read by no code"
    sink = _unit(SYSTEMD / "mallwatt-sink.service")
    assert ("EnvironmentFile", "/etc/mallwatt/clickhouse.env") in sink["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """systemd's own parser, on a scratch root holding the units and a stand-in binary."""
    (tmp_path / "opt/mallwatt/bin").mkdir(parents=True)
    binary = tmp_path / "opt/mallwatt/bin/mallwatt"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    system = next((p for p in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
                   if (p / "sysinit.target").exists()), None)
    if system is None:
        pytest.skip("no system units to verify against")
    shutil.copytree(system, tmp_path / "usr/lib/systemd/system", symlinks=True)
    names = []
    for path in UNITS:
        name = path.name.replace("@.", "@M01." if "collector" in path.name else "@9464.")
        shutil.copy(path, units / path.name)
        names.append(name)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", *names],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
