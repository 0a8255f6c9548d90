"""docs/clients.md's Go device, compiled from the .proto with Debian's Go packages and run against
a real server exactly as the section writes it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from offload import RunningServer

from ..helpers import ROOT, documented_block, run_documented

TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
GOCODE = Path("/usr/share/gocode/src")
PACKAGES = (
    "golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev "
    "golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc"
)


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
    app = tmp_path / "src" / "example.com" / "yourapp"
    app.mkdir(parents=True)
    (app / "main.go").write_text(documented_block("Go", "go"))
    (app / "protos").symlink_to(ROOT / "protos")
    server = start_server()
    result = run_documented(
        documented_block("Go"),
        server.port,
        app,
        540,
        PYTHONPATH=str(ROOT),  # for `python -m offload.server --print-fingerprint`: this tree's
        GOPATH=str(tmp_path),
        GOCACHE=str(ROOT / "build" / "go-cache"),  # kept between runs, like build/cpp
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["COMPLETED ball at 250 180"]
