"""The C++ client (clients/cpp/) against a real server: stubs generated from the same .proto by
protoc and gRPC's C++ plugin, compiled with Debian's gRPC. Its answers are compared with what the
Python device computes client-only for the very frames the C++ client sent."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from examples.ball_tracking import reset_state
from offload import Pipeline, RunningServer, ServerSecurity, current_item, load_pipeline

from ..helpers import (
    ROOT,
    Pki,
    assert_same,
    documented_block,
    free_port,
    run_documented,
    run_split,
)

BINARY = ROOT / "build" / "cpp" / "offload-client"
TOOLS = ("protoc", "grpc_cpp_plugin", "pkg-config", "g++", "make")
PACKAGES = "libgrpc++-dev protobuf-compiler-grpc pkg-config g++ make"
SHAPE = (375, 500, 3)
# The first test may build the client (make cpp-client: ~20 s of CPU, minutes on a loaded
# machine); every subprocess below has its own timeout.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cpp_client() -> Path:
    """The binary, built by `make cpp-client` once per session (a no-op when up to date)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        found = subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"], check=False)
        missing += [] if found.returncode == 0 else ["libgrpc++-dev"]
    if missing:
        reason = f"the C++ toolchain is missing ({', '.join(missing)}): apt-get install {PACKAGES}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI installs it (.ci/run)")
        pytest.skip(reason)
    build = subprocess.run(
        ["make", "--no-print-directory", "cpp-client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return BINARY


def run_cpp(
    binary: Path, port: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "--server", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env if env is not None else {k: v for k, v in os.environ.items() if "OFFLOAD" not in k},
    )


def sent_frames(folder: Path, count: int) -> list[np.ndarray]:
    """The frames the C++ client wrote with --save-frames: exactly the bytes it streamed."""
    return [
        np.fromfile(folder / f"frame-{item}.bgr", dtype=np.uint8).reshape(SHAPE)
        for item in range(count)
    ]


def client_only(tasks: Sequence[Any], frames: list[np.ndarray]) -> list[dict[str, Any]]:
    """The Python device's output lines, client-only, with ``frames`` as task 0's captures and
    ``tasks`` after it."""
    pending = iter(frames)

    def replay() -> tuple[bool, np.ndarray | None]:
        frame = next(pending, None)
        return (frame is not None), frame

    pipeline = Pipeline("tests.cpp_replay", (replay, *tasks), "replay")
    lines, _ = run_split(pipeline, None, frames=len(frames))
    return [json.loads(line) for line in lines]


def same_as_python(answers: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Each C++ answer has the Python line's fields, with equal values of the same JSON types."""
    assert len(answers) == len(reference)
    for answer, line in zip(answers, reference, strict=True):
        assert_same({key: answer.get(key) for key in line}, line)


def test_cpp_client_streams_frames_and_gets_what_python_computes_client_only(
    cpp_client: Path, start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    demo = load_pipeline("examples.ball_tracking")
    server = start_server()
    frames = 6
    result = run_cpp(
        cpp_client, server.port, "--fingerprint", demo.fingerprint, "--frames", str(frames),
        "--window", "3", "--device-id", "cpp-test", "--save-frames", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{frames} completed, 0 filtered, 0 failed" in result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["item"] for a in answers] == list(range(frames))
    for a in answers:
        # Tasks 1-6 ran on the server on the frame built in C++: the ball is where it was drawn.
        drawn, found = a["drawn_centre"], a["result"]["centre"]
        assert abs(found[0] - drawn[0]) <= 2 and abs(found[1] - drawn[1]) <= 2, a
        assert a["server_cpu_ms"] > 0
    # The server's per-device trail must not count into the Python run's "devices active".
    reset_state()
    same_as_python(answers, client_only(demo.tasks[1:], sent_frames(tmp_path, frames)))


def kinds(frame: np.ndarray) -> tuple[bool, dict[str, Any]]:
    """Every kind of value the codec carries, some from the frame; item 1 is filtered and item 2
    fails, so that those answers are compared too."""
    item = current_item().item
    if item == 1:
        return False, {}
    if item == 2:
        raise ValueError(f"item {item} fails on purpose")
    pixel = frame[0, 0]
    values = {
        "none": None,
        "bools": (True, False),
        "ints": [0, -(2**63), 2**63 - 1, int(pixel[0])],
        "floats": [0.1, -1e-300, 1e300, 41.0, math.inf, -math.inf, math.nan],
        "str": 'é "quoted"\n\ttab \\ \x01',
        "bytes": frame[0, :7].tobytes(),
        "u1": frame[:2, :3],
        "empty": np.zeros((0, 3), np.float32),
        "zero-d": np.array(7, np.int16),
        "scalar": np.float32(0.1),
        "bool-scalar": np.bool_(True),
        "dtypes": [
            (np.arange(6) - 3).astype(dtype)  # unsigned ones wrap around
            for dtype in ("|i1", "<u2", "<i2", "<u4", ">i4", "<i8", "<u8", ">f8", "<f4", "<f2")
        ],
        "half": np.array([0.1, -65504, 6e-8, np.inf, np.nan], np.float16),
        "complex": [np.array([1 + 2j, -0.5j], np.complex64), np.complex128(3 - 1e-9j)],
        "bool-array": frame[:2, :2, 0] > 120,
        "nested": {"list": [[], {}, ()], "map": {"x": [1, {"y": None}]}},
    }
    return True, values


def test_cpp_client_decodes_every_kind_of_value_as_the_python_device_prints_it(
    cpp_client: Path, start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pipeline = Pipeline("tests.cpp_kinds", (lambda: (True, None), kinds), "cppkinds")
    server = start_server(pipeline)
    result = run_cpp(
        cpp_client, server.port, "--pipeline", pipeline.name, "--fingerprint",
        pipeline.fingerprint, "--frames", "4", "--save-frames", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 frames to" in result.stderr and "2 completed, 1 filtered, 1 failed" in result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["status"] for a in answers] == ["completed", "filtered", "failed", "completed"]
    assert answers[2]["error"] == "ValueError: item 2 fails on purpose"
    same_as_python(answers, client_only([kinds], sent_frames(tmp_path, 4)))


def test_cpp_client_speaks_the_token_over_tls(
    cpp_client: Path, start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    security = ServerSecurity(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), token="s3cret"
    )
    server = start_server(security=security)
    fp = load_pipeline("examples.ball_tracking").fingerprint
    common = ("--fingerprint", fp, "--frames", "2", "--tls-ca", str(pki.ca))
    env = {**os.environ, "OFFLOAD_TOKEN": "s3cret"}
    by_option = run_cpp(cpp_client, server.port, *common, "--token", "s3cret")
    by_env = run_cpp(cpp_client, server.port, *common, env=env)
    for result in (by_option, by_env):
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == [
            "completed"
        ] * 2
    for token, reason in ((), "no token"), (("--token", "wrong"), "wrong token"):
        refused = run_cpp(cpp_client, server.port, *common, *token)
        assert refused.returncode == 1
        assert refused.stdout == ""
        (line,) = refused.stderr.splitlines()
        assert line.startswith(f"error: server answered UNAUTHENTICATED: {reason}: give the")


def test_cpp_client_reports_a_refused_stream_in_one_line(
    cpp_client: Path, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server()
    result = run_cpp(cpp_client, server.port, "--fingerprint", "0000000000000000", "--frames", "1")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: server answered FAILED_PRECONDITION: pipeline mismatch")


def test_cpp_client_asks_the_health_service_first_and_stops_when_not_serving(
    cpp_client: Path, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server()
    server.health.set("offload.v1.Offload", health_pb2.HealthCheckResponse.NOT_SERVING)
    fp = load_pipeline("examples.ball_tracking").fingerprint
    result = run_cpp(cpp_client, server.port, "--fingerprint", fp, "--frames", "1")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: the server at 127.0.0.1:{server.port} is not serving")
    assert "offload.v1.Offload (health: NOT_SERVING)" in line


def test_cpp_client_with_no_frames_to_send_closes_the_stream_and_ends(
    cpp_client: Path, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server()
    fp = load_pipeline("examples.ball_tracking").fingerprint
    result = run_cpp(cpp_client, server.port, "--fingerprint", fp, "--frames", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "0 frames to" in result.stderr and "0 completed, 0 filtered, 0 failed" in result.stderr


def test_cpp_client_reports_a_server_that_does_not_answer_in_one_line(cpp_client: Path) -> None:
    port = free_port()
    result = run_cpp(cpp_client, port, "--fingerprint", "0000000000000000")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: health check of 127.0.0.1:{port} failed: UNAVAILABLE")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "2"], "--fingerprint is required"),
        (["--fingerprint", "f", "--window", "0"], "--window 0: give a whole number >= 1"),
        (["--fingerprint", "f", "--frames", "x"], "--frames x: give a whole number >= 0"),
        (["--fingerprint", "f", "--colour", "red"], "unknown option --colour"),
        (["--fingerprint"], "--fingerprint needs a value"),
    ],
)
def test_cpp_client_usage_errors_are_one_line_and_exit_2(
    cpp_client: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [str(cpp_client), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line, line


def test_the_documented_cpp_steps_run_as_written_from_the_repository_root(
    cpp_client: Path, start_server: Callable[..., RunningServer]
) -> None:
    """docs/clients.md's C++ commands, run as one script from the root."""
    script = documented_block("C++")
    assert "\npython -m offload.server &" in script
    server = start_server()
    result = run_documented(script, server.port, ROOT, 600)  # (it runs `make cpp-client`)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["status"] for a in answers] == ["completed"] * 10
