"""Debian packages the project needs at test time (e.g. Chromium for the page test), installed
by the project itself: ``ensure_packages(["chromium"])``.

Fast when everything is installed (one ``dpkg-query``, then remembered for the process);
otherwise ``apt-get install`` non-interactively (DEBIAN_FRONTEND=noninteractive, no stdin,
waiting up to 5 minutes for the dpkg lock another installer holds), as root or through
``sudo -n`` (never a password prompt), refreshing the package lists first only when they
do not know a package. A machine where that cannot work (no apt-get, not root and no
password-less sudo, no package source) raises DebianUnavailable saying why, which a test
turns into a skip; CI runs as root on Debian, so there it installs and runs.

    python -m infra.debian chromium fonts-noto-cjk     # the same from a shell
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

_known_installed: set[str] = set()
BROWSER_PACKAGES = ("chromium", "fonts-noto-cjk")  # the page is zh-CN: CJK glyphs for screenshots


class DebianUnavailable(RuntimeError):
    """Packages cannot be installed on this machine; the message says why."""


def installed(packages: Iterable[str]) -> dict[str, bool]:
    names = list(packages)
    if not names:
        return {}
    if shutil.which("dpkg-query") is None:
        return dict.fromkeys(names, False)
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *names], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, check=False)
    ok = {line.split()[0].split(":")[0] for line in proc.stdout.splitlines()
          if line.endswith("install ok installed")}
    return {n: n in ok for n in names}


def _privilege() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is None:
        raise DebianUnavailable("not root and sudo is not installed")
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if probe.returncode != 0:
        raise DebianUnavailable("not root and sudo needs a password (sudo -n failed)")
    return ["sudo", "-n"]


def _apt(prefix: list[str], args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    cmd = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y",
           "-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Options::=--force-confdef",
           "-o", "Dpkg::Options::=--force-confold", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DebianUnavailable(f"apt-get {' '.join(args)} did not finish in {timeout_s:.0f} s") from None


def _update(prefix: list[str], timeout_s: float) -> None:
    update = _apt(prefix, ["update"], timeout_s)
    if update.returncode != 0:
        raise DebianUnavailable(f"apt-get update failed: {update.stderr.strip()[-800:]}")


def _unknown_to_apt(packages: Sequence[str]) -> list[str]:
    proc = subprocess.run(["apt-cache", "policy", *packages], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    known, current = set(), None
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" "):
            current = line.rstrip(":")
        elif current and line.strip().startswith("Candidate:") and "(none)" not in line:
            known.add(current)
    return [p for p in packages if p not in known]


def ensure_packages(packages: Iterable[str], *, timeout_s: float = 1200.0) -> float:
    """Install what is missing; returns the seconds spent (0.0 when all were there)."""
    wanted = [p for p in packages if p not in _known_installed]
    if not wanted:
        return 0.0
    missing = [p for p, ok in installed(wanted).items() if not ok]
    if not missing:
        _known_installed.update(wanted)
        return 0.0
    if shutil.which("apt-get") is None:
        raise DebianUnavailable(f"{', '.join(missing)} missing and this machine has no apt-get (not Debian)")
    started = time.monotonic()
    prefix = _privilege()
    updated = False
    if _unknown_to_apt(missing):  # lists never fetched, or too old to know the package
        _update(prefix, timeout_s)
        updated = True
        unknown = _unknown_to_apt(missing)
        if unknown:
            raise DebianUnavailable(f"no package source offers {', '.join(unknown)}")
    proc = _apt(prefix, ["install", *missing], timeout_s)
    if proc.returncode != 0 and not updated:  # stale lists name files the mirror no longer has
        _update(prefix, timeout_s)
        proc = _apt(prefix, ["install", *missing], timeout_s)
    if proc.returncode != 0:
        raise DebianUnavailable(f"apt-get install {' '.join(missing)} failed: {proc.stderr.strip()[-800:]}")
    still = [p for p, ok in installed(missing).items() if not ok]
    if still:
        raise DebianUnavailable(f"apt-get reported success but {', '.join(still)} is not installed")
    _known_installed.update(wanted)
    return time.monotonic() - started


def chromium_executable() -> str:
    """Debian's Chromium (and CJK fonts), installed if missing; the path to run."""
    ensure_packages(BROWSER_PACKAGES)
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        raise DebianUnavailable(f"chromium installed but {path} is not executable")
    return path


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(BROWSER_PACKAGES)
    try:
        spent = ensure_packages(names)
    except DebianUnavailable as exc:
        print(f"cannot install {' '.join(names)}: {exc}", file=sys.stderr)
        return 1
    print(f"installed: {' '.join(names)} ({spent:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
