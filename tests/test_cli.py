"""The command lines as users run them: a server started by hand, the embedded server, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, WEBCAM_CLIP

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def offload(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def server_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m offload.server`` on 127.0.0.1, port 0, as a user would start it."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--announce",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line
    yield process, int(line.rsplit(":", 1)[1])
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


@pytest.mark.parametrize("k", ["0", "8", "-1"])
def test_split_out_of_range_names_the_range_and_the_tasks(k: str) -> None:
    result = offload("offload.client", "--local-tasks", k)
    assert result.returncode == 2
    assert f"--local-tasks {k} is out of range: use 1..6" in result.stderr
    assert "0: capture, 1: blur_hsv, 2: mask" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "no.such.pipeline"], "cannot import pipeline module 'no.such.pipeline'"),
        (["--source", "/no/such/clip.mp4"], "/no/such/clip.mp4"),
        (["--window", "0"], "--window 0"),
        (["--frames", "-3"], "--frames must be 0 or more"),
        (["--fps", "0", "--local-tasks", "3"], "--fps 0.0: the target must be a positive"),
        (
            ["--fps", "10", "--local-tasks", "7"],
            "--fps needs a starting split that uses the server",
        ),
        (["--emulate-link", "fast"], "--emulate-link 'fast': the rate must be"),
        (["--emulate-slowdown", "0.5"], "--emulate-slowdown 0.5: use 1 (off) or more"),
    ],
)
def test_bad_options_are_clear_errors(args: list[str], message: str) -> None:
    result = offload("offload.client", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_shows_examples() -> None:
    result = offload("offload.client", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--local-tasks 3" in result.stdout


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = offload(
        "offload.client",
        "--local-tasks",
        "2",
        "--server",
        f"127.0.0.1:{port}",
        "--frames",
        "3",
        "--connect-timeout",
        "1",
    )
    assert result.returncode == 1
    assert f"cannot reach the server at 127.0.0.1:{port}" in result.stderr


def cli_output(tmp_path: Path, name: str, *args: str) -> list[str]:
    out = tmp_path / f"{name}.jsonl"
    result = offload("offload.client", "--output", str(out), "--device-id", "cli", *args)
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines()


def test_server_by_hand_gives_client_only_results_at_every_split(
    tmp_path: Path, server_process: tuple[subprocess.Popen[str], int]
) -> None:
    _, port = server_process
    reference = cli_output(tmp_path, "local", "--frames", "40")
    assert len(reference) == 40
    for k in range(1, 8):
        lines = cli_output(
            tmp_path,
            f"k{k}",
            "--frames",
            "40",
            "--local-tasks",
            str(k),
            "--server",
            f"127.0.0.1:{port}",
        )
        assert lines == reference, f"split {k}"


@pytest.mark.skipif(not WEBCAM_CLIP.exists(), reason=f"webcam clip not found at {WEBCAM_CLIP}")
def test_webcam_clip_through_the_command_line(
    tmp_path: Path, server_process: tuple[subprocess.Popen[str], int]
) -> None:
    _, port = server_process
    reference = cli_output(tmp_path, "local", "--source", str(WEBCAM_CLIP), "--frames", "120")
    remote = cli_output(
        tmp_path,
        "k2",
        "--source",
        str(WEBCAM_CLIP),
        "--frames",
        "120",
        "--local-tasks",
        "2",
        "--server",
        f"127.0.0.1:{port}",
    )
    assert remote == reference
    assert json.loads(reference[0])["status"] == "filtered"  # the ball enters at frame 27


def test_embedded_server_when_no_server_is_given(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = offload(
        "offload.client", "--local-tasks", "3", "--frames", "30", "--report", str(report_path)
    )
    assert result.returncode == 0, result.stderr
    assert "started an embedded server on 127.0.0.1:" in result.stderr
    assert "offload summary" in result.stdout and "throughput" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["items"]["captured"] == 30
    assert report["items"]["completed"] + report["items"]["filtered"] == 30
    assert [t["ran_on"] for t in report["tasks"]] == ["device"] * 3 + ["server"] * 4
    assert report["bytes"]["sent"] > 30 * 500 * 375  # a frame and its mask per item


def test_sigterm_stops_the_server_gracefully(
    server_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, _ = server_process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    assert "event=stopping signal=SIGTERM" in process.stderr.read()


def test_ctrl_c_stops_the_client_cleanly_with_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    report_path = tmp_path / "report.json"
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.client",
            "--local-tasks",
            "4",
            "--output",
            str(out),
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The synthetic camera never ends: wait until items are flowing, then press Ctrl-C.
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 1000) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    assert "SIGINT: finishing items in flight" in stderr
    assert "offload summary" in stdout
    report = json.loads(report_path.read_text())
    lines = out.read_text().splitlines()
    # Nothing lost: every captured item ended and has its line, in order.
    assert len(lines) == report["items"]["captured"] > 0
    assert [json.loads(line)["item"] for line in lines] == list(range(len(lines)))
