"""Several server processes sharing one port (``--processes N``), forked before any serves.

One Python process runs the tasks of all its streams under one GIL; on a multi-core machine
with many devices, N processes bound to the same port with ``SO_REUSEPORT`` (which gRPC sets)
let the kernel spread connections between them. Forking happens before gRPC starts anything in
this process, as gRPC requires. Each process keeps its own per-device state: a device's stream
lives on one process, but aggregation across devices sees only the devices of its process, and
a reconnecting device may land on another process (its resent items are then not recognised).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

from ..exceptions import ConfigError, OffloadError
from .serve import bind_problem


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT: fixes port 0 for every child and
    keeps the port ours until they are up; connections never reach an unlistened socket.

    A port that anything holds already is refused first (a bind without SO_REUSEPORT fails
    then), so that the children share it only with each other, never with another server.
    """
    problem = bind_problem(host, port)
    if problem is not None:
        raise ConfigError(problem)
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind --host {host} --port {port}: {exc.strerror}") from None
    return sock


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this child when the parent dies: a SIGKILLed parent's children would otherwise
    go on serving the port unsupervised (and the restarted server find it in use)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


def run_processes(
    count: int, child: Callable[[int, Callable[[], None]], int]
) -> tuple[list[int], Callable[[], int]]:
    """Fork ``count`` children running ``child(index, ready)``; ``ready()`` tells the parent
    the child serves. Returns the children's pids (once all are ready) and ``wait``, which
    forwards SIGTERM / SIGINT to them and returns the worst exit code."""
    pids: list[int] = []
    pipes: list[int] = []
    parent = os.getpid()
    for index in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            _stop_with_parent(parent)
            os.close(read_end)
            for other in pipes:
                os.close(other)

            def ready(fd: int = write_end) -> None:
                os.write(fd, b"1")
                os.close(fd)

            code = 1
            try:
                code = child(index, ready)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        pids.append(pid)
        pipes.append(read_end)
    failed = False
    for fd in pipes:
        failed |= os.read(fd, 1) != b"1"  # EOF: the child exited before serving
        os.close(fd)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait() -> int:
        worst = 0
        remaining = set(pids)
        while remaining:
            pid, status = os.wait()
            if pid not in remaining:
                continue
            remaining.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and remaining:
                forward(signal.SIGTERM, None)  # one failed: stop the rest, do not limp on
            worst = max(worst, abs(code))
        return worst

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if failed:
        forward(signal.SIGTERM, None)
        wait()
        raise OffloadError("a server process failed to start; its error is above")
    return pids, wait
