"""Outage mode hold-last with a durable buffer: a device killed (SIGKILL) while no server answers
loses nothing; restarted, it resends what it held once a server is back, each item once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from offload._device.buffer import FILE_NAME
from offload._device.client import RECOVERED_FILE

from ..helpers import ENV, ROOT, free_port, offload, spawn_server, wait_until

TALLY = "tests.apps.tally"  # emit, work, tally: task 1 runs here while held, tally on the server


def held(folder: Path, at_task: int = 2) -> int:
    """Rows of the durable buffer whose item waits at ``at_task`` (read as another process)."""
    path = folder / FILE_NAME
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            (n,) = db.execute(
                "SELECT count(*) FROM held WHERE next_task = ?", (at_task,)
            ).fetchone()
        except sqlite3.OperationalError:  # the table is not made yet
            return 0
    return int(n)


def device(port: int, folder: Path, frames: int, output: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.client",
            "--pipeline",
            TALLY,
            "--local-tasks",
            "1",
            "--server",
            f"127.0.0.1:{port}",
            "--outage",
            "hold-last",
            "--buffer-dir",
            str(folder),
            "--device-id",
            "pi-1",
            "--frames",
            str(frames),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def client_only(frames: int, tmp_path: Path) -> list[Any]:
    output = tmp_path / f"client-only-{frames}.jsonl"
    done = offload(
        "offload.client", "--pipeline", TALLY, "--frames", str(frames), "--output", str(output)
    )
    assert done.returncode == 0, done.stderr
    return [line["result"] for line in lines(output)]


def test_a_device_killed_during_an_outage_resends_what_it_held_once_a_server_is_back(
    tmp_path: Path,
) -> None:
    port = free_port()  # no server there: the outage
    folder = tmp_path / "buffer"
    folder.mkdir()
    first = device(port, folder, 12, tmp_path / "first.jsonl")
    try:
        # Every item ran its tasks but the last here and is on disk, waiting for the server.
        assert wait_until(lambda: held(folder) == 12, 60), "the first run did not hold its items"
    finally:
        first.kill()  # the reboot: no handler runs
        first.wait(30)
    assert (tmp_path / "first.jsonl").read_text() == ""  # nothing ended: no aggregate here
    second = device(port, folder, 5, tmp_path / "second.jsonl")
    try:
        # Still no server: the restarted device holds its own items beside the earlier ones.
        assert wait_until(lambda: held(folder) == 17, 60), "the second run did not hold its items"
        server = spawn_server("--log-level", "WARNING", pipeline=TALLY, port=port)
        try:
            _, stderr = second.communicate(timeout=120)
        finally:
            server.stop()
    finally:
        second.kill()
    assert second.returncode == 0, stderr
    assert "event=recovered runs=1 items=12" in stderr
    recovered = lines(folder / RECOVERED_FILE)
    # The first run's items, each answered once, by the server, as a client-only run ends them.
    assert [line["item"] for line in recovered] == list(range(12))
    assert len({line["run_id"] for line in recovered}) == 1
    assert [line["result"] for line in recovered] == client_only(12, tmp_path)
    assert [line["result"] for line in lines(tmp_path / "second.jsonl")] == client_only(5, tmp_path)
    assert held(folder, 1) + held(folder, 2) == 0  # nothing left behind


def test_a_buffer_dir_that_does_not_exist_is_a_usage_error_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = offload(
        "offload.client",
        *("--local-tasks", "1", "--server", "127.0.0.1:1", "--outage", "hold-last"),
        *("--buffer-dir", str(missing), "--frames", "1"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --buffer-dir {missing}: no such folder; create it (it keeps items held for the "
        "server across restarts)"
    ]
