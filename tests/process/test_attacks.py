"""Hostile conditions that need server processes (issue 18): a child of ``--processes N`` killed
as the OOM killer would is replaced, and the server goes on serving."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil
import pytest

from ..helpers import cli_output, spawn_server, wait_until


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
