"""The Kubernetes manifests pass `make lint-k8s` (yamllint, kubernetes-validate --strict, both
offline), and the same target fails on a broken copy, naming the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ..helpers import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"


def lint_k8s(folder: Path) -> subprocess.CompletedProcess[str]:
    # -o: the shared virtual environment is taken as it is, never rebuilt by this test.
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "lint-k8s", f"K8S_DIR={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_manifests_pass_yamllint_and_strict_schema_validation() -> None:
    result = lint_k8s(MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "said"),
    [
        # A field the schema does not have (strict), a wrong type, bad YAML indentation.
        ("deployment.yaml", "  replicas: 2", "  replica: 2", "deployment.yaml"),
        ("service.yaml", "port: 50051", "port: grpc-port", "service.yaml"),
        ("autoscaling.yaml", "  minReplicas: 2", "   minReplicas: 2", "autoscaling.yaml"),
    ],
)
def test_a_broken_manifest_fails_the_lint_naming_its_file(
    tmp_path: Path, file: str, old: str, new: str, said: str
) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(MANIFESTS, copy)
    text = (copy / file).read_text()
    assert old in text
    (copy / file).write_text(text.replace(old, new, 1))
    result = lint_k8s(copy)
    assert result.returncode != 0
    assert said in result.stdout + result.stderr
