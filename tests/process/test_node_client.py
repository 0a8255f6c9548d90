"""The Node.js client (clients/node/) against a real server: another language, same .proto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from offload import RunningServer

from ..helpers import ROOT, documented_block, run_documented

NODE_CLIENT = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    installed = (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir()
    if node is None or not installed:
        missing = "node" if node is None else "clients/node/node_modules (run `make node-deps`)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing: CI installs it (.ci/run, make node-deps)")
        pytest.skip(f"{missing} is missing")
    return node


def fingerprint() -> str:
    """As the client's documentation says: ask the server's command line."""
    result = subprocess.run(
        [sys.executable, "-m", "offload.server", "--print-fingerprint"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def run_node(node: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_CLIENT / "offload-client.js"), "--server", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_node_client_streams_frames_and_the_server_finds_the_ball(
    node: str, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server()
    frames = 8
    result = run_node(
        node, server.port, "--fingerprint", fingerprint(), "--frames", str(frames),
        "--device-id", "node-test", "--window", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["item"] for a in answers] == list(range(frames))
    assert all(a["status"] == "completed" for a in answers), answers
    for a in answers:
        # Tasks 1-6 ran on the server on the frame built in JavaScript: the ball it found is
        # where the Node client drew it (the centroid of a disc, within a pixel or two).
        drawn, found = a["drawn_centre"], a["result"]["centre"]
        assert abs(found[0] - drawn[0]) <= 2 and abs(found[1] - drawn[1]) <= 2, a
        assert 38 <= a["result"]["radius"] <= 44
        assert a["result"]["items_seen"] == a["item"] + 1  # aggregated per device on the server
        assert a["server_cpu_ms"] > 0
    assert answers[-1]["result"]["trail"][-1] == answers[-1]["result"]["centre"]
    assert f"{frames} completed, 0 filtered, 0 failed" in result.stderr


def test_node_client_reports_a_refused_stream(
    node: str, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server()
    result = run_node(node, server.port, "--fingerprint", "0000000000000000", "--frames", "1")
    assert result.returncode == 1
    assert "error: server answered FAILED_PRECONDITION: pipeline mismatch" in result.stderr


def test_node_client_usage_errors(node: str) -> None:
    result = run_node(node, 1, "--frames", "2")
    assert result.returncode == 2
    assert "--fingerprint is required" in result.stderr


def test_the_documented_node_steps_run_as_written_from_the_repository_root(
    node: str, start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """docs/clients.md's Node.js commands, run as one script from the root. Two stand-ins: an
    `npm` that records where it ran (nothing is downloaded), and this test's server on port 0
    for the `python -m offload.server &` line. `python` is this venv's, as once activated."""
    script = documented_block("Node.js")
    assert "\npython -m offload.server &" in script
    server = start_server()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "npm").write_text('#!/bin/sh\necho "$PWD $*" > "$NPM_RAN"\n')
    (stubs / "npm").chmod(0o755)
    result = run_documented(
        script, server.port, ROOT, 120, [str(stubs)], NPM_RAN=str(tmp_path / "npm-ran")
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "npm-ran").read_text().split() == [str(NODE_CLIENT), "ci"]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["status"] for a in answers] == ["completed"] * 10
