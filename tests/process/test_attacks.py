"""Hostile conditions that need server processes (issue 18): the memory a server process takes
under an attack, and a child of ``--processes N`` killed as the OOM killer would is replaced."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import grpc
import psutil
import pytest

from ..helpers import cli_output, spawn_server, wait_until
from ..loopback.test_attacks import ECHOING, METHOD, many_lists, raw_state

MiB = 1024 * 1024


def memory(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the most ever) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/PID/status")
def test_messages_of_millions_of_elements_cost_the_server_no_more_than_their_bytes() -> None:
    server = spawn_server(pipeline=ECHOING)
    try:
        pid = server.process.pid
        before = memory(pid, "VmRSS")
        attack = raw_state(many_lists(40, 99_999))  # 16 MB, 4 million elements
        codes: list[grpc.StatusCode] = []

        def send() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = channel.stream_stream(METHOD)
                try:
                    list(call(iter([attack]), timeout=120))
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        streams = [threading.Thread(target=send) for _ in range(4)]
        for thread in streams:
            thread.start()
        for thread in streams:
            thread.join()
        grown = memory(pid, "VmHWM") - before
        # Each message is held as bytes (gRPC's and Python's copy), never parsed: parsing them
        # took the server from 56 to 1127 MiB.
        assert grown < 4 * 2 * len(attack) + 64 * MiB, f"{grown / MiB:.0f} MiB"
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and the parent-death signal")
def test_a_killed_server_process_is_replaced_and_the_port_stays_served(tmp_path: Path) -> None:
    server = spawn_server("--processes", "2", relay_log=False)
    process, port = server.process, server.port
    try:
        parent = psutil.Process(process.pid)
        first = parent.children()
        assert len(first) == 2
        first[0].kill()  # SIGKILL: no chance to say anything

        def replaced() -> bool:
            children = parent.children()
            return len(children) == 2 and first[0].pid not in {c.pid for c in children}

        assert wait_until(replaced, 60), "the killed process was not replaced"
        new = next(c for c in parent.children() if c.pid != first[1].pid)
        assert wait_until(
            lambda: (
                port in {c.laddr.port for c in new.net_connections("tcp") if c.status == "LISTEN"}
            ),
            60,
        )
        assert process.poll() is None  # the parent went on supervising
        reference = cli_output(tmp_path, "local", "--frames", "10")
        served = cli_output(
            tmp_path,
            "served",
            "--frames",
            "10",
            "--local-tasks",
            "1",
            "--server",
            f"127.0.0.1:{port}",
        )
        assert served == reference
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # a replaced child's death is not the exit code
        assert process.stderr is not None
        log = process.stderr.read()
    finally:
        server.kill()
        server.stop()
    assert "event=child-restart index=" in log and f"pid={first[0].pid} code=-9" in log
