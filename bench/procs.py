"""Servers under test run as child processes on loopback; each announces its port on stdout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from offload._device.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parents[1]
# CPUs the servers are confined to (``python -m bench --pin-cores``); None: the whole machine.
SERVER_CPUS: set[int] | None = None


class ServerProcess(EmbeddedServer):
    """A server the bench measures, on ``SERVER_CPUS``: ``args``, the python arguments of a
    program that prints ``listening on HOST:PORT`` once ready (a baseline), or None for
    ``offload.server`` itself with ``options``."""

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        pipeline: str = "bench.pipeline",
        port: int = 0,
        options: Sequence[str] = (),
        root: Path = ROOT,
    ) -> None:
        super().__init__(
            pipeline,
            startup_timeout=60.0,
            options=options,
            port=port,
            command=args,
            env=dict(os.environ, PYTHONPATH=str(root)),
            cwd=root,
            cpus=SERVER_CPUS,
        )

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)


def offload_server(
    pipeline: str = "bench.pipeline",
    port: int = 0,
    extra: tuple[str, ...] = (),
    root: Path = ROOT,
) -> ServerProcess:
    """``offload.server``; ``root``: another checkout's (a baseline commit, side by side)."""
    options = ("--log-level", "WARNING", *extra)
    return ServerProcess(pipeline=pipeline, port=port, options=options, root=root)


def seed_server(receive: str, pipeline: str = "bench.pipeline") -> ServerProcess:
    return ServerProcess(["-m", "bench.seed", "--pipeline", pipeline, "--receive", receive])
