"""The installable package: the wheel carries what mallwatt reads at run time, and an installed
mallwatt runs from outside the source tree with its data under MALLWATT_HOME.

The wheel is built from this checkout, installed (without dependencies) into a fresh virtual
environment outside the repo whose only other packages are this checkout's dependencies (a
.pth line adds the dev environment's site-packages as a plain folder, so its editable install
of mallwatt is not active). From a temporary working folder it then runs `--version`,
`stack up` (Kafka on private ports, the warehouse migrations), a catalog query, a SQL
statement and `stack down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from ports import free_ports

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], dict(os.environ),
         tmp_path, timeout=600)
    [wheel] = list(wheels.glob("mallwatt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("sql/migrations/001_core.sql", "sql/queries/alerts_daily.sql", "schemas/payment.avsc",
                   "schemas/history/ledger_batch.v1.avsc", "collectors/profiles/acrel_ddsy1352.yaml",
                   "infra/grafana/dashboards/mallwatt.json", "pipelines/portal/static/index.html"):
        assert needed in names, f"{needed} missing from {wheel.name}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], dict(os.environ), tmp_path)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig;print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "mallwatt-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # deps only, as a folder
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         dict(os.environ), tmp_path)

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    port, ctrl = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLWATT_", "PYTHONPATH"))}
    env.update({"MALLWATT_HOME": str(home), "MALLWATT_KAFKA_PORT": str(port),
                "MALLWATT_KAFKA_CONTROLLER_PORT": str(ctrl), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
    mallwatt = str(venv / "bin" / "mallwatt")
    where = _run([str(venv / "bin" / "python"), "-c", "import pipelines, sql; print(pipelines.__file__, sql.__file__)"],
                 env, work)
    assert str(ROOT) not in where and str(site) in where, where  # the installed copy, not the checkout
    assert _run([mallwatt, "--version"], env, work).strip() == "mallwatt 0.1.0"
    try:
        up = _run([mallwatt, "stack", "up"], env, work, timeout=300)
        assert "'001'" in up and "'008'" in up  # every migration, from the installed package
        out = _run([mallwatt, "query", "alerts_daily", "--param", "from_day=2026-07-01", "--param",
                    "to_day=2026-07-02", "--format", "csv"], env, work)
        header = next(line for line in out.splitlines() if not line.startswith("#"))  # after the watermark note
        assert header.startswith("day,mall_id,kind"), out
        counted = _run([mallwatt, "sql", "SELECT count() AS n FROM mallwatt.audit_events"], env, work)
        assert "0" in counted
    finally:
        _run([mallwatt, "stack", "down"], env, work)
    assert (home / "kafka").is_dir() and (home / "chdb").is_dir()  # data under MALLWATT_HOME
    assert not (work / "var").exists()
