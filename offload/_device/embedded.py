"""An embedded server: the real server in a child process on loopback, for a split without
``--server``. Same code as ``python -m offload.server``; stopped when the client exits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from ..exceptions import ServerError


class EmbeddedServer:
    def __init__(
        self, pipeline: str, startup_timeout: float = 30.0, max_message_bytes: int | None = None
    ) -> None:
        # The device's OFFLOAD_* settings are not the embedded server's: OFFLOAD_TOKEN or
        # OFFLOAD_TLS_CERT there would make it refuse this client, which sends neither to it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        # The child must import the same pipeline module as we do, from the same places.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(Path.cwd()), *sys.path, env.get("PYTHONPATH", "")] if p
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "offload.server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--pipeline",
                pipeline,
                "--announce",
                "--no-reflection",  # nobody browses a child on loopback
                "--log-level",
                "WARNING",
                *(["--max-message-bytes", str(max_message_bytes)] if max_message_bytes else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            # Not in the terminal's process group: a Ctrl-C there is for the client, which
            # finishes its items in flight on this server before stopping it.
            start_new_session=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._stderr = _Relay(self.process.stderr)
        line: list[str] = []
        stdout = self.process.stdout
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_timeout)  # the announcement, or EOF as soon as the child exits
        announced = line[0].strip() if line else ""
        if not announced.startswith("listening on "):
            exited = bool(line)
            self.stop()
            self._stderr.finished.wait(5)
            cause = self._stderr.last_line() or (
                f"exit code {self.process.returncode}" if exited else "no answer"
            )
            cause = cause.removeprefix("error: ")
            when = "failed to start" if exited else f"did not start within {startup_timeout:.0f} s"
            raise ServerError(
                f"the embedded server {when}: {cause}. Fix that, or start "
                "`python -m offload.server` yourself and pass --server"
            )
        self._stderr.start_relaying()  # from now on its warnings reach our stderr as they come
        self.port = int(announced.rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


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
