"""The README's examples run as written (real servers on port 0)."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from offload import RunningServer, load_pipeline

from ..helpers import ROOT, run_split


def section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    assert title in readme, f"README: no section {title!r}"
    return readme.split(title, 1)[1].split("\n## ", 1)[0]


def block(text: str, language: str) -> str:
    code = re.search(rf"```{language}\n(.*?)```", text, re.S)
    assert code is not None, f"README: no {language} block"
    return code.group(1)


def test_the_library_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "readme_example.py"
    script.write_text(block(section("### As a library"), "python"))
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert float(printed) > 0  # completed items per second


@pytest.fixture
def readme_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The pipeline module of "Writing your own pipeline", saved where its first line says."""
    code = block(section("## Writing your own pipeline"), "python")
    path = re.match(r"# (\S+)\.py\n", code)
    assert path is not None, "README: the pipeline example does not start with '# its/path.py'"
    target = tmp_path / f"{path.group(1)}.py"
    target.parent.mkdir(parents=True)
    target.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = path.group(1).replace("/", ".")
    yield name
    for module in [m for m in sys.modules if m == name or name.startswith(m + ".")]:
        del sys.modules[module]


def test_the_pipeline_example_gives_the_same_results_at_every_split_run_after_run(
    readme_pipeline: str, start_server: Callable[..., RunningServer]
) -> None:
    pipeline = load_pipeline(readme_pipeline)
    frames = 40
    expected, _ = run_split(pipeline, None, source="7", frames=frames)
    records = [json.loads(line) for line in expected]
    assert {r["status"] for r in records} == {"completed", "filtered"}  # alarms, and filtered
    alarms = [r["result"]["alarm"] for r in records if r["status"] == "completed"]
    assert alarms == list(range(1, len(alarms) + 1))
    server = start_server(pipeline)  # one long-lived server: its state outlives each run
    for k in range(1, len(pipeline)):
        for _ in range(2):
            lines, report = run_split(pipeline, k, server.port, source="7", frames=frames)
            assert report["error"] is None
            assert lines == expected, f"split {k}"


def test_the_pipeline_example_command_line_runs_from_the_folder_above_the_module(
    readme_pipeline: str, tmp_path: Path
) -> None:
    text = section("## Writing your own pipeline")
    command = shlex.split(block(text, "sh"))
    assert command[:3] == ["python", "-m", "offload.client"]
    result = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = Path(tmp_path / command[command.index("--output") + 1]).read_text().splitlines()
    assert len(output) == int(command[command.index("--frames") + 1])
    assert all(json.loads(line)["status"] in ("completed", "filtered") for line in output)
