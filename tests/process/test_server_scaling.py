"""Server options for many devices: processes sharing a port, OpenCV threads, the allocator."""

from __future__ import annotations

import platform
import signal
import socket
import sys
from pathlib import Path

import cv2
import psutil
import pytest

from offload import ServerConfig, serve
from offload._allocator import keep_large_buffers

from ..helpers import cli_output, offload, spawn_server


def listening_ports(process: psutil.Process) -> set[int]:
    return {c.laddr.port for c in process.net_connections("tcp") if c.status == "LISTEN"}


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_processes_share_the_port_and_stop_together(tmp_path: Path) -> None:
    server = spawn_server("--processes", "2")
    process, port = server.process, server.port
    try:
        children = psutil.Process(process.pid).children()
        assert len(children) == 2
        # Both serve the one port (the kernel spreads connections); the parent only supervises.
        assert all(port in listening_ports(child) for child in children)
        assert port not in listening_ports(psutil.Process(process.pid))
        reference = cli_output(tmp_path, "local", "--frames", "20")
        for k in (1, 5):
            served = cli_output(
                tmp_path,
                f"k{k}",
                "--frames",
                "20",
                "--local-tasks",
                str(k),
                "--server",
                f"127.0.0.1:{port}",
            )
            assert served == reference, f"split {k}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        server.kill()
        server.stop()


def test_processes_must_be_positive() -> None:
    result = offload("offload.server", "--processes", "0", "--port", "0")
    assert result.returncode == 2
    assert "--processes must be at least 1" in result.stderr


def test_task_threads_must_not_be_negative() -> None:
    result = offload("offload.server", "--task-threads", "-1", "--port", "0")
    assert result.returncode == 2
    assert "--task-threads must be at least 0" in result.stderr


@pytest.mark.parametrize(("task_threads", "expected"), [(1, 1), (3, 3), (None, "default")])
def test_the_server_caps_opencv_threads_per_task(
    task_threads: int | None, expected: int | str
) -> None:
    cv2.setNumThreads(-1)  # OpenCV's own default, whatever an earlier test left
    default = cv2.getNumThreads()
    config = ServerConfig(host="127.0.0.1", port=0, task_threads=task_threads)
    running = serve(config)
    try:
        assert cv2.getNumThreads() == (default if expected == "default" else expected)
    finally:
        running.stop(None)
        cv2.setNumThreads(-1)


def test_a_busy_port_is_a_clear_error_with_processes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = offload(
            "offload.server", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"
        )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --port {port}: address already in use")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_processes_stop_when_their_parent_is_killed() -> None:
    server = spawn_server("--processes", "2")
    process = server.process
    try:
        children = psutil.Process(process.pid).children()
        assert len(children) == 2
        process.kill()  # no chance to forward anything
        # Each stops as on SIGTERM: within its grace period.
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the children went on serving without their parent"
    finally:
        server.kill()
        server.stop()


def test_allocator_tuning_applies_where_glibc_is() -> None:
    assert keep_large_buffers() is (platform.libc_ver()[0] == "glibc")
