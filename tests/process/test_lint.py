"""The lint rules that keep unpickling (and eval) out of the code really fail on use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ..helpers import ROOT


def ruff(source: str, filename: str = "offload/_probe.py") -> subprocess.CompletedProcess[str]:
    """Lint ``source`` as if it were a file of the package, with the project's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename", filename, "-"],
        input=source,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("import pickle\n", "TID251"),
        ("from pickle import loads\n", "TID251"),
        ("import _pickle\n", "TID251"),
        ("import marshal\n", "TID251"),
        ("import shelve\n", "TID251"),
        ("import pickle as p\n\np.loads(b'')\n", "S301"),
        ("x = eval('1')\n", "S307"),
    ],
)
@pytest.mark.parametrize("filename", ["offload/_probe.py", "tests/test_probe.py"])
def test_pickle_and_eval_fail_the_lint(source: str, rule: str, filename: str) -> None:
    result = ruff(source, filename)
    assert result.returncode == 1, result.stdout + result.stderr
    assert rule in result.stdout


def test_clean_code_passes_the_same_lint() -> None:
    result = ruff('import json\n\nprint(json.loads("1"))\n')
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_never_mentions_pickle() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "offload").rglob("*.py"))
        if path.parent.name != "v1"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "pickle" in line.lower()
    ]
    assert hits == []
