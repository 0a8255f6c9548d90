"""What the packaging promises holds: dependency ranges with exact pins in constraints.txt, which
every install of ours uses; a Python floor that the pinned dependencies support and CI runs on; a
framework that never needs the demo's OpenCV; docs that name only files that exist."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..helpers import ROOT


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def dependencies() -> list[Requirement]:
    """The runtime dependencies and those of every extra."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for e in extras for r in e)]]


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"constraints.txt: {line}"
        assert not requirement.extras and requirement.marker is None, f"constraints.txt: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(spec.version)
    return pins


def python_floor() -> Version:
    requires = pyproject()["project"]["requires-python"]
    match = re.fullmatch(r">=(\d+\.\d+)", requires)
    assert match, f"requires-python = {requires!r}: expected >=X.Y"
    return Version(match.group(1))


def test_every_dependency_is_a_range_with_an_exact_pin_in_the_constraints() -> None:
    pins = constraints()
    for requirement in dependencies():
        operators = {s.operator for s in requirement.specifier}
        assert ">=" in operators and not operators & {"==", "==="}, (
            f"{requirement}: a library declares a range with a lower bound; the exact version "
            "goes into constraints.txt"
        )
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is not in range"


def test_the_build_requirement_is_pinned_at_the_grpcio_floor() -> None:
    """The stubs grpcio-tools X generates refuse a grpcio older than X: the build uses exactly
    the version that the grpcio range starts from (and constraints.txt pins the same)."""
    build: dict[str, Requirement] = {
        canonicalize_name(r.name): r
        for r in map(Requirement, pyproject()["build-system"]["requires"])
    }
    (tools,) = build["grpcio-tools"].specifier
    assert tools.operator == "=="
    (grpcio,) = [r for r in dependencies() if r.name == "grpcio"]
    (floor,) = [s.version for s in grpcio.specifier if s.operator == ">="]
    assert Version(floor) == Version(tools.version)
    assert constraints()["grpcio-tools"] == Version(tools.version)


def test_every_pinned_dependency_supports_the_declared_python_floor() -> None:
    """The floor is true: each installed pinned package accepts it (numpy 2.4 needs 3.11)."""
    floor = python_floor()
    checked = []
    for name, pin in constraints().items():
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra not installed here (bench)
        if Version(distribution.version) != pin:
            continue
        requires = (distribution.metadata.get_all("Requires-Python") or [""])[0]
        assert SpecifierSet(requires).contains(f"{floor}.0"), (
            f"{name}=={pin} requires Python {requires}; requires-python says >={floor}"
        )
        checked.append(name)
    assert {"numpy", "grpcio", "protobuf", "opencv-python-headless", "pytest"} <= set(checked)


def test_the_python_floor_is_the_same_everywhere() -> None:
    floor = python_floor()
    config = pyproject()["tool"]
    assert config["ruff"]["target-version"] == f"py{floor.major}{floor.minor}"
    assert config["mypy"]["python_version"] == str(floor)
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1]
    assert f"Python {floor} or newer" in install
    # The image runs the Python the suite is proven on (its default base; the stand-in of
    # `make image` is Debian's Python of the same minor version).
    bases = re.findall(
        r"^ARG BASE=python:(\S+)-slim$", (ROOT / "Dockerfile.server").read_text(), re.M
    )
    assert bases == [str(floor)]


def test_ci_runs_the_suite_on_the_python_floor() -> None:
    """.ci/run makes the venv from python<floor>; here the suite checks it really runs on it."""
    if not os.environ.get("CI"):
        pytest.skip("CI only: a developer may run the suite on a newer Python")
    assert Version("{}.{}".format(*sys.version_info[:2])) == python_floor()


def test_every_install_of_ours_uses_the_constraints() -> None:
    """make (and so CI) and the server image install at the exact versions of constraints.txt,
    the package's build requirements included, with the demo extra (the default pipeline)."""
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = re.sub(r"\\\n", " ", (ROOT / "Dockerfile.server").read_text())
    pip_installs = [
        line
        for line in [*makefile.splitlines(), *dockerfile.splitlines()]
        if "pip install" in line and not line.lstrip().startswith("#")
    ]
    assert len(pip_installs) >= 3 and all("-c constraints.txt" in i for i in pip_installs)
    (pip_install,) = re.findall(r"^PIP_INSTALL := (.*)$", makefile, re.M)
    assert "-c constraints.txt --build-constraint constraints.txt" in pip_install
    assert re.findall(r"^\t\$\(PIP_INSTALL\) (.*)$", makefile, re.M) == [
        "-e '.[server,demo,dev]'",
        "-e '.[server,demo,dev,bench]'",
    ]
    assert '--build-constraint constraints.txt ".[server,demo]"' in " ".join(dockerfile.split())
    # CI installs through make alone.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install" not in ci and "make " in ci


def test_the_framework_never_imports_opencv() -> None:
    """OpenCV is the demo's (the `demo` extra), not a dependency of offload."""
    imports = []
    for path in sorted((ROOT / "offload").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            imports += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "cv2"]
    assert imports == []
    project = pyproject()["project"]
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    demo = {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["demo"]
    }
    assert "opencv-python-headless" not in core and "opencv-python-headless" in demo


def test_the_docs_name_only_files_that_exist() -> None:
    """Every relative link and every `.md` file the README and docs/ mention is in the repo."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        mentioned = re.findall(r"(?<![\w/.:-])([\w./-]+\.md)\b", text)
        for target in {*links, *mentioned}:
            if "://" in target or target.startswith("mailto:"):
                continue
            if not ((doc.parent / target).exists() or (ROOT / target).exists()):
                missing.append(f"{doc.relative_to(ROOT)}: {target}")
    assert missing == []
