"""The house plan, enforced: device code never loads cloud code, nor cloud code device code.

Read from the source (no import runs), so a violation fails here before it can hide behind a
lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ..helpers import ROOT

PACKAGE = ROOT / "offload"
SIDES = ("_device", "_cloud")


def _side(module: str) -> str | None:
    """``offload._device.link`` -> ``_device``; shared modules and the face -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SIDES else None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, whether at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "offload" or m.startswith("offload.")}


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts)


def _violation(importer: str, imported: str) -> str | None:
    mine, theirs = _side(importer), _side(imported)
    if importer in ("offload", "offload.testing", "offload.client", "offload.server"):
        allowed: tuple[str, ...] = {"offload": SIDES, "offload.testing": SIDES}.get(importer, ())
        if importer == "offload.client":
            allowed = ("_device",)
        if importer == "offload.server":
            allowed = ("_cloud",)
        return None if theirs is None or theirs in allowed else f"{importer} imports {imported}"
    if theirs is None:
        # A side may use shared modules; a shared module may use neither side, nor the face.
        if mine is None and imported in ("offload", "offload.testing"):
            return f"shared module {importer} imports {imported}"
        return None
    if mine is None:
        return f"shared module {importer} imports {imported} (a side)"
    return None if mine == theirs else f"{importer} ({mine}) imports {imported} ({theirs})"


def test_both_sides_exist_and_hold_code() -> None:
    for side in SIDES:
        assert any((PACKAGE / side).glob("*.py")), f"offload/{side}/ is missing"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_crosses_the_fence(path: Path) -> None:
    importer = _module_name(path)
    problems = [v for m in sorted(_imports(path)) if (v := _violation(importer, m))]
    assert not problems, problems


def test_the_fence_test_sees_a_crossing() -> None:
    assert _violation("offload._device.link", "offload._cloud.executor")
    assert _violation("offload._cloud.servicer", "offload._device.pending")
    assert _violation("offload._codec", "offload._cloud.executor")
    assert _violation("offload._codec", "offload.testing")
    assert _violation("offload.client", "offload._cloud.serve")
    assert _violation("offload._device.link", "offload._codec") is None
    assert _violation("offload.testing", "offload._cloud.executor") is None
