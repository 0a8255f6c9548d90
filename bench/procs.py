"""Servers under test run as child processes on loopback; each announces its port on stdout."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CPUs the servers are confined to (``python -m bench --pin-cores``); None: the whole machine.
SERVER_CPUS: set[int] | None = None


class ServerProcess:
    """A child process that prints ``listening on HOST:PORT`` once ready; stopped by ``stop``."""

    def __init__(self, args: list[str], timeout: float = 60.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        # A child inherits the affinity of the thread that forks it, and its threads inherit it
        # in turn: confine this thread around the fork (no preexec_fn: unsafe with threads).
        mine = os.sched_getaffinity(0)
        if SERVER_CPUS:
            os.sched_setaffinity(0, SERVER_CPUS)
        try:
            self.process = subprocess.Popen(
                [sys.executable, *args],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                cwd=ROOT,
            )
        finally:
            os.sched_setaffinity(0, mine)
        line: list[str] = []
        assert self.process.stdout is not None
        stdout = self.process.stdout
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        announced = line[0].strip() if line else ""
        if not announced.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{args} did not start (exit code {self.process.poll()})")
        self.port = int(announced.rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def offload_server(
    pipeline: str = "bench.pipeline", port: int = 0, extra: tuple[str, ...] = ()
) -> ServerProcess:
    return ServerProcess(
        [
            "-m",
            "offload.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--pipeline",
            pipeline,
            "--announce",
            "--log-level",
            "WARNING",
            *extra,
        ]
    )


def seed_server(receive: str, pipeline: str = "bench.pipeline") -> ServerProcess:
    return ServerProcess(["-m", "bench.seed", "--pipeline", pipeline, "--receive", receive])
