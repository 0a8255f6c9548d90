"""The README's library example runs as written (a real server on port 0)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from .conftest import ROOT


def test_the_library_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### As a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README: no python block under 'As a library'"
    script = tmp_path / "readme_example.py"
    script.write_text(code.group(1))
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert float(printed) > 0  # completed items per second
