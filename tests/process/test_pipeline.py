"""The Task Interface across processes: a missing package, task code that differs between the
device and a server process, fingerprints of source-less modules, callable objects as tasks."""

from __future__ import annotations

import compileall
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    PipelineMismatch,
    RunningServer,
    load_pipeline,
)
from offload._pipeline import run_tasks

from ..helpers import CTX, GOOD_TASKS, ROOT, install, run_split, spawn_server

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_the_client_reports_a_missing_package_of_the_pipeline_in_one_line_exit_2(
    module_dir: Callable[..., Path], tmp_path: Path
) -> None:
    module_dir("needs_scipy_app", "import no_such_package_xyz\n" + GOOD_TASKS)
    result = subprocess.run(
        [sys.executable, "-m", "offload.client", "--pipeline", "needs_scipy_app"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: pipeline module 'needs_scipy_app' imports 'no_such_package_xyz', which is not "
        "installed here: install the package that provides it (on the device and the server)\n"
    )


PUMP = """
__version__ = "1"


def read():
    return True, 3


def scale(x):
    return True, x * {factor}


tasks = [read, scale]
"""


@pytest.fixture
def pump_server(module_dir: Callable[..., Path], tmp_path: Path) -> Iterator[int]:
    """``offload.server`` in a process of its own, running pump from its own folder."""
    module_dir("pump", PUMP.format(factor=2), tmp_path / "server")
    sys.modules.pop("pump", None)
    server = spawn_server("--log-level", "WARNING", pipeline="pump", cwd=tmp_path / "server")
    yield server.port
    server.kill()
    server.stop()


def load_pump(module_dir: Callable[..., Path], folder: Path, factor: int) -> Any:
    sys.modules.pop("pump", None)
    module_dir("pump", PUMP.format(factor=factor), folder)
    sys.path.insert(0, str(folder))
    try:
        return load_pipeline("pump")
    finally:
        sys.path.remove(str(folder))


def test_a_server_refuses_a_device_whose_task_code_differs(
    pump_server: int, module_dir: Callable[..., Path], tmp_path: Path
) -> None:
    other = load_pump(module_dir, tmp_path / "device", factor=3)  # same name, same __version__
    config = ClientConfig(pipeline="pump", local_tasks=1, device_id="d", frames=3)
    transport = GrpcTransport.from_config(ClientConfig(), f"127.0.0.1:{pump_server}")
    try:
        client = Client(other, config, transport)
        report = client.run()
    finally:
        transport.close()
    assert isinstance(client.error, PipelineMismatch)
    assert re.fullmatch(
        "server answered FAILED_PRECONDITION: pipeline mismatch: the item is for 'pump' "
        r"\(fingerprint '\w+'\) but this server runs 'pump' \(fingerprint '\w+'\); start both "
        "sides with the same --pipeline and version",
        report["error"],
    )
    assert report["items"]["completed"] == 0


def test_the_same_file_in_another_process_and_folder_is_accepted(
    pump_server: int, module_dir: Callable[..., Path], tmp_path: Path
) -> None:
    same = load_pump(module_dir, tmp_path / "device", factor=2)
    lines, report = run_split(same, 1, pump_server, frames=3)
    assert report["error"] is None
    assert lines == [f'{{"item":{i},"status":"completed","result":6}}' for i in range(3)]


SOURCELESS = """
def capture():
    return True, 1


def classify(x):
    def double(y):
        return 2 * y
    return True, ("small" if x in {{"a", "b", "c", "d", "e", "f"}} else double(x) + {offset})


tasks = [capture, classify]
"""


def print_fingerprint(folder: Path, seed: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "offload.server", "--print-fingerprint", "--pipeline", "nosrc"],
        cwd=folder,
        env={**ENV, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_a_pipeline_without_source_is_fingerprinted_by_its_bytecode_alike_in_every_process(
    tmp_path: Path,
) -> None:
    fingerprints: list[list[str]] = []
    for offset in (1, 1, 2):
        folder = tmp_path / f"offset{offset}-{len(fingerprints)}"
        folder.mkdir()
        (folder / "nosrc.py").write_text(SOURCELESS.format(offset=offset))
        assert compileall.compile_file(str(folder / "nosrc.py"), legacy=True, quiet=1)
        (folder / "nosrc.py").unlink()  # only nosrc.pyc is left: no source to read
        fingerprints.append([print_fingerprint(folder, seed) for seed in ("1", "2")])
    assert fingerprints[0] == fingerprints[1] == [fingerprints[0][0]] * 2
    assert fingerprints[2][0] != fingerprints[0][0]


@dataclass
class Above:
    """A configurable task: a callable object (a dataclass instance is unhashable)."""

    level: float

    def __call__(self, x: float) -> Any:
        return x > self.level, x


def test_a_callable_object_is_a_task_named_by_its_class_here_and_on_a_server(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(install("callable_app", tasks=[lambda: (True, 1.0), Above(0.5)]))
    assert pipeline.describe() == "0: <lambda>, 1: Above"
    assert run_tasks(pipeline, 0, 2, None, CTX).value == 1.0
    lines, report = run_split(pipeline, 1, start_server(pipeline).port, frames=2)
    assert report["error"] is None
    assert lines == [f'{{"item":{i},"status":"completed","result":1.0}}' for i in range(2)]
