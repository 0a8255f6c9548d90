"""An embedded server: the real server in a child process on loopback, for a split without
``--server``. Same code as ``python -m offload.server``; stopped when the client exits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from .exceptions import ServerError


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
                "--log-level",
                "WARNING",
                *(["--max-message-bytes", str(max_message_bytes)] if max_message_bytes else []),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            # Not in the terminal's process group: a Ctrl-C there is for the client, which
            # finishes its items in flight on this server before stopping it.
            start_new_session=True,
        )
        line: list[str] = []
        assert self.process.stdout is not None
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(startup_timeout)
        announced = line[0].strip() if line else ""
        if not announced.startswith("listening on "):
            self.stop()
            raise ServerError(
                f"the embedded server did not start within {startup_timeout:.0f} s "
                f"(exit code {self.process.poll()}); its errors are above. Try starting "
                "`python -m offload.server` yourself and pass --server"
            )
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
