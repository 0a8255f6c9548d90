"""What the numbers were measured on: stated in every result file and in the summary."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpcio", "protobuf", "numpy", "opencv-python-headless", "psutil", "matplotlib")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _commit() -> str:
    """The commit measured; "-dirty" if code differs from it (earlier results do not count)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        changed = _git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


def describe() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": _commit(),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }


def one_line(machine: dict[str, Any]) -> str:
    v = machine["versions"]
    return (
        f"{machine['cores']} cores ({machine['cpu_model']}), load average "
        f"{' '.join(str(x) for x in machine['load_average'])} at start, Python "
        f"{machine['python']}, grpcio {v['grpcio']}, protobuf {v['protobuf']}, numpy "
        f"{v['numpy']}, OpenCV {v['opencv-python-headless']}; commit {machine['commit']}, "
        f"{machine['when']}"
        + ("; device side pinned to CPU 0, servers to CPU 1" if machine.get("pinned") else "")
    )
