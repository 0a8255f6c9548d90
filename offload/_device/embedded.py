"""An embedded server: the real server in a child process on loopback, for a split without
``--server``, and the one way tests and the bench start a server process. Same code as
``python -m offload.server``; stopped when the client exits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from ..exceptions import ServerError

# What the client's own child does without: reflection (nobody browses a child on loopback), the
# info log (its warnings are enough, among the client's lines) and GOAWAY by connection age (it
# has no replicas to rebalance over).
EMBEDDED_OPTIONS = ("--no-reflection", "--log-level", "WARNING", "--max-connection-age", "0")


class EmbeddedServer:
    """Starts a server process that announces ``listening on HOST:PORT``, waits for that line,
    and stops it. ``options`` are added to the command line; ``command`` replaces
    ``-m offload.server ...`` for another program that announces the same way (the bench's
    baselines). ``relay_log=False`` leaves the server's stderr in ``process.stderr`` for the
    caller to read; ``cpus`` confines the server to those CPUs."""

    def __init__(
        self,
        pipeline: str | None = None,
        startup_timeout: float = 30.0,
        max_message_bytes: int | None = None,
        *,
        options: Sequence[str] = EMBEDDED_OPTIONS,
        port: int = 0,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        relay_log: bool = True,
        cpus: set[int] | None = None,
    ) -> None:
        if env is None:
            env = _embedded_env()
        if command is None:
            command = [
                *("-m", "offload.server", "--host", "127.0.0.1", "--port", str(port)),
                *(["--pipeline", pipeline] if pipeline else []),
                "--announce",
                *options,
                *(["--max-message-bytes", str(max_message_bytes)] if max_message_bytes else []),
            ]
        # A child inherits the affinity of the thread that forks it, and its threads inherit it
        # in turn: confine this thread around the fork (no preexec_fn: unsafe with threads).
        mine = os.sched_getaffinity(0) if cpus else None
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=dict(env),
                cwd=cwd,
                # Not in the terminal's process group: a Ctrl-C there is for the client, which
                # finishes its items in flight on this server before stopping it.
                start_new_session=True,
            )
        finally:
            if mine is not None:
                os.sched_setaffinity(0, mine)
        assert self.process.stdout is not None and self.process.stderr is not None
        self._stderr = _Relay(self.process.stderr) if relay_log else None
        line: list[str] = []
        stdout = self.process.stdout
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_timeout)  # the announcement, or EOF as soon as the child exits
        announced = line[0].strip() if line else ""
        if not announced.startswith("listening on "):
            exited = bool(line)
            self._end()
            cause = self._last_stderr_line() or (
                f"exit code {self.process.returncode}" if exited else "no answer"
            )
            cause = cause.removeprefix("error: ")
            when = "failed to start" if exited else f"did not start within {startup_timeout:.0f} s"
            self.stop()
            raise ServerError(
                f"the embedded server {when}: {cause}. Fix that, or start "
                "`python -m offload.server` yourself and pass --server"
            )
        if self._stderr is not None:
            self._stderr.start_relaying()  # from now on its warnings reach our stderr as they come
        self.port = int(announced.rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def send_signal(self, signum: int) -> None:
        """For fault tests: SIGSTOP, SIGCONT, SIGKILL..."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """Stop it without a chance to finish anything."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (it finishes its streams), then SIGKILL after ``timeout`` seconds."""
        self._end(timeout)
        for stream in (self.process.stdout, None if self._stderr else self.process.stderr):
            if stream is not None:
                stream.close()

    def _end(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _last_stderr_line(self) -> str:
        if self._stderr is not None:
            self._stderr.finished.wait(5)
            return self._stderr.last_line()
        assert self.process.stderr is not None
        lines = [line.strip() for line in self.process.stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _embedded_env() -> dict[str, str]:
    # The device's OFFLOAD_* settings are not the embedded server's: OFFLOAD_TOKEN or
    # OFFLOAD_TLS_CERT there would make it refuse this client, which sends neither to it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    # The child must import the same pipeline module as we do, from the same places.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path.cwd()), *sys.path, env.get("PYTHONPATH", "")] if p
    )
    return env


class _Relay:
    """Reads the child's stderr: held back until it serves (a failed start is said in one line,
    with its cause), then copied to ours line by line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._held: list[str] = []
        self._relaying = False
        self._lock = threading.Lock()
        self.finished = threading.Event()
        threading.Thread(target=self._run, name="offload-embedded-stderr", daemon=True).start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                with self._lock:
                    if self._relaying:
                        sys.stderr.write(line)
                    else:
                        self._held.append(line)
        except ValueError:  # closed under us at exit
            pass
        finally:
            self.finished.set()

    def start_relaying(self) -> None:
        with self._lock:
            self._relaying = True
            sys.stderr.writelines(self._held)
            self._held = []

    def last_line(self) -> str:
        with self._lock:
            lines = [line.strip() for line in self._held if line.strip()]
        return lines[-1] if lines else ""
