"""Several server processes sharing one port (``--processes N``), forked before any serves.

One Python process runs the tasks of all its streams under one GIL; on a multi-core machine
with many devices, N processes bound to the same port with ``SO_REUSEPORT`` (which gRPC sets)
let the kernel spread connections between them. Forking happens before gRPC starts anything in
this process, as gRPC requires. Each process keeps its own per-device state: a device's stream
lives on one process, but aggregation across devices sees only the devices of its process, and
a reconnecting device may land on another process (its resent items are then not recognised).
A child that dies is replaced; children die with their parent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

from ..exceptions import ConfigError, OffloadError
from .serve import bind_problem

log = logging.getLogger("offload.server")


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


RESTARTS = 5  # a child dying this often within RESTART_WINDOW seconds is a crash loop: stop
RESTART_WINDOW = 60.0


def run_processes(
    count: int, child: Callable[[int, Callable[[], None]], int]
) -> tuple[list[int], Callable[[], int]]:
    """Fork ``count`` children running ``child(index, ready)``; ``ready()`` tells the parent
    the child serves. Returns the children's pids (once all are ready; the list follows
    restarts) and ``wait``, which forwards SIGTERM / SIGINT to them, restarts a child that dies
    meanwhile (as the OOM killer's SIGKILL would), and returns the worst exit code."""
    parent = os.getpid()
    pids: list[int] = []
    index_of: dict[int, int] = {}
    waiting: set[int] = set()  # read ends of the ready pipes not read yet
    stopping = False

    def fork(index: int) -> tuple[int, int]:
        """A child serving as ``index``, and the pipe it says ``ready`` on."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: none of the parent's handlers or pipes
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _stop_with_parent(parent)
            os.close(read_end)
            for other in waiting:
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
        index_of[pid] = index
        waiting.add(read_end)
        return pid, read_end

    def started(fd: int) -> bool:
        try:
            return os.read(fd, 1) == b"1"  # EOF: the child exited before serving
        finally:
            os.close(fd)
            waiting.discard(fd)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait() -> int:
        worst = 0
        restarts: list[float] = []
        while pids:
            pid, status = os.wait()
            if pid not in index_of:
                continue
            pids.remove(pid)
            index = index_of.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                worst = max(worst, abs(code))
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > RESTARTS:
                log.error(
                    "event=child-crash-loop index=%d pid=%d code=%d restarts=%d window_s=%.0f",
                    index,
                    pid,
                    code,
                    RESTARTS,
                    RESTART_WINDOW,
                )
                forward(signal.SIGTERM, None)
                worst = max(worst, abs(code), 1)
                continue
            log.warning("event=child-restart index=%d pid=%d code=%d", index, pid, code)
            _new, fd = fork(index)
            if not started(fd):
                forward(signal.SIGTERM, None)  # it cannot start again: stop, do not limp on
                worst = 1
        return worst

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pipes = [fork(index)[1] for index in range(count)]
    failed = False
    for fd in pipes:
        failed |= not started(fd)
    if failed:
        forward(signal.SIGTERM, None)
        wait()
        raise OffloadError("a server process failed to start; its error is above")
    return pids, wait
