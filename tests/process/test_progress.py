"""The client's live progress line as a user sees it: drawn on a terminal, not into a pipe."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

from ..helpers import ROOT


def test_the_client_draws_progress_on_a_terminal_only() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "offload.client", "--frames", "12", "--device-id", "tty"]
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=secondary, text=True
        )
        os.close(secondary)
        stdout, _ = process.communicate(timeout=120)
        terminal = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0
    # The terminal turns "\n" into "\r\n"; "\r" alone returns to redraw the line.
    final = terminal.decode().replace("\r\n", "\n").rsplit("\r", 1)[-1]
    assert re.fullmatch(
        r"offload: 12 done \((\d+) completed, (\d+) filtered, 0 failed\)  [\d.]+ items/s  "
        r"split 7\x1b\[K\n",
        final,
    ), final
    assert "offload summary" in stdout
    piped = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert piped.returncode == 0 and "items/s  split" not in piped.stderr
