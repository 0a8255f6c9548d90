"""docs/clients.md's Go device, compiled from the .proto with Debian's Go packages and run against
a real server exactly as the section writes it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from offload import RunningServer

from ..helpers import ROOT

TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
GOCODE = Path("/usr/share/gocode/src")
PACKAGES = (
    "golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev "
    "golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc"
)


def go_section() -> str:
    text = (ROOT / "docs" / "clients.md").read_text()
    return text.split("\n## Go\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.timeout(600)  # the first build compiles grpc-go from Debian's sources (~20 s of CPU)
def test_the_documented_go_device_builds_and_the_server_finds_its_ball(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    missing += [] if (GOCODE / "google.golang.org" / "grpc").is_dir() else ["grpc-go sources"]
    if missing:
        reason = f"the Go toolchain is missing ({', '.join(missing)}): apt-get install {PACKAGES}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI installs it (.ci/run)")
        pytest.skip(reason)
    section = go_section()
    script = re.search(r"```sh\n(.*?)```", section, re.S)
    program = re.search(r"```go\n(.*?)```", section, re.S)
    assert script is not None and program is not None, "docs/clients.md: Go sh and go blocks"
    app = tmp_path / "src" / "example.com" / "yourapp"
    app.mkdir(parents=True)
    (app / "main.go").write_text(program.group(1))
    (app / "protos").symlink_to(ROOT / "protos")
    server = start_server()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "GO"))},
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": str(ROOT),  # `python -m offload.server --print-fingerprint`: this tree's
        "GOPATH": str(tmp_path),
        "GOCACHE": str(ROOT / "build" / "go-cache"),  # kept between runs, like build/cpp
    }
    commands = script.group(1).replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
    result = subprocess.run(
        ["bash", "-e", "-c", commands],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["COMPLETED ball at 250 180"]
