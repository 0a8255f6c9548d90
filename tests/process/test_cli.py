"""The command lines as users run them: a server started by hand, the embedded server, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from offload import ClientConfig, ClientSecurity, ConfigError, Limits, LinkConfig
from offload._env import option_actions
from offload.client import build_parser

from ..helpers import ENV, ROOT, WEBCAM_CLIP, cli_output, free_port, offload, spawn_server


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A usage or configuration error: exit 2, one line on stderr, nothing run."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def server_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m offload.server`` on 127.0.0.1, port 0, as a user would start it."""
    server = spawn_server(relay_log=False)
    yield server.process, server.port
    server.kill()
    server.stop()


@pytest.mark.parametrize("k", ["0", "8", "-1"])
def test_split_out_of_range_names_the_range_and_the_tasks(k: str) -> None:
    result = offload("offload.client", "--local-tasks", k)
    assert result.returncode == 2
    assert f"--local-tasks {k} is out of range: use 1..6" in result.stderr
    assert "0: capture, 1: blur_hsv, 2: mask" in result.stderr


REMOTE = ["--local-tasks", "1", "--server", "127.0.0.1:1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "no.such.pipeline"], "cannot import pipeline module 'no.such.pipeline'"),
        (["--pipeline", ""], "--pipeline is empty"),
        (["--source", "/no/such/clip.mp4"], "/no/such/clip.mp4"),
        (["--source", ""], "--source is empty"),
        (["--window", "0"], "--window 0: at least 1 item must be in flight"),
        (["--frames", "-3"], "--frames -3: give 0 or more items"),
        (["--frames", "many"], "argument --frames: invalid int value: 'many'"),
        (["--fps", "0", "--local-tasks", "3"], "--fps 0: the target must be a positive"),
        (["--fps", "nan", "--local-tasks", "3"], "--fps nan: the target must be a positive"),
        (
            ["--fps", "10", "--local-tasks", "7"],
            "--fps needs a starting split that uses the server",
        ),
        (["--control-period", "0"], "--control-period 0: give a number of seconds, more than 0"),
        (["--connect-timeout", "-1"], "--connect-timeout -1: give a number of seconds, 0 or more"),
        (["--connect-timeout", "inf"], "--connect-timeout inf: give a number of seconds"),
        (["--device-id", ""], "--device-id '': give this device a name"),
        (["--device-id", "  "], "--device-id '  ': give this device a name"),
        (["--emulate-link", "fast", "--local-tasks", "2"], "--emulate-link 'fast': the rate"),
        (["--emulate-link", "20mbit"], "--emulate-link shapes the traffic to a server"),
        (["--emulate-slowdown", "0.5"], "--emulate-slowdown 0.5: use 1 (off) or more"),
        (["--emulate-slowdown", "nan"], "--emulate-slowdown nan: use 1 (off) or more"),
        (["--max-message-bytes", "1000"], "--max-message-bytes 1000: use 1024 to 2147483647"),
        (["--max-message-bytes", str(2**31)], f"--max-message-bytes {2**31}: use 1024 to"),
        (["--buffer", "0"], "--buffer 0: at least 1 item must fit"),
        (["--item-timeout", "0"], "--item-timeout 0: give a number of seconds, more than 0"),
        (["--resend-grace", "-1"], "--resend-grace -1: give a number of seconds, 0 or more"),
        (["--server", "cloud.example.com", "--local-tasks", "2"], "give HOST:PORT, e.g. cloud"),
        ([*REMOTE, "--tls-cert", "device.pem"], "needs both --tls-cert and --tls-key"),
        ([*REMOTE, "--tls-ca", "/no/such/ca.pem"], "--tls-ca /no/such/ca.pem: cannot read it"),
        ([*REMOTE, "--token", ""], "--token is empty"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    assert message in one_error_line(offload("offload.client", *args))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClientConfig(connect_timeout=-1),
        lambda: ClientConfig(device_id=""),
        lambda: ClientConfig(window=0),
        lambda: ClientConfig(frames=-1),
        lambda: ClientConfig(fps=0),
        lambda: ClientConfig(control_period=0),
        lambda: ClientConfig(slowdown=0.5),
        lambda: ClientConfig(server=""),
        lambda: LinkConfig(item_timeout=float("nan")),
        lambda: Limits(max_message_bytes=10),
        lambda: ClientSecurity(tls_cert="device.pem"),
    ],
    ids=[
        "connect-timeout",
        "device-id",
        "window",
        "frames",
        "fps",
        "control-period",
        "emulate-slowdown",
        "server",
        "item-timeout",
        "max-message-bytes",
        "tls-cert",
    ],
)
def test_the_config_refuses_nonsense_naming_the_option(
    make: Any, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(ConfigError, match=f"--{request.node.callspec.id}"):
        make()


def test_a_server_without_a_split_is_refused_rather_than_ignored() -> None:
    line = one_error_line(offload("offload.client", "--server", "127.0.0.1:1", "--frames", "1"))
    assert "--server 127.0.0.1:1 needs a split: add --local-tasks K" in line
    assert "or run client-only without --server" in line
    line = one_error_line(offload("offload.client", env={"OFFLOAD_SERVER": "127.0.0.1:1"}))
    assert "add --local-tasks K" in line and "(from OFFLOAD_SERVER in the environment)" in line


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OFFLOAD_MAX_MESSAGE_BYTES",
            "abc",
            "OFFLOAD_MAX_MESSAGE_BYTES='abc' is not a valid value for --max-message-bytes: set "
            "it to an integer, or unset it",
        ),
        (
            "OFFLOAD_LOG_LEVEL",
            "LOUD",
            "OFFLOAD_LOG_LEVEL='LOUD': choose from DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("OFFLOAD_TLS", "maybe", "OFFLOAD_TLS='maybe': use 1/true/yes/on or 0/false/no/off"),
        (
            "OFFLOAD_WINDOW",
            "0",
            "--window 0: at least 1 item must be in flight (from OFFLOAD_WINDOW in the "
            "environment)",
        ),
        (
            "OFFLOAD_LINGER_MS",
            "-5",
            "--linger-ms -5: give milliseconds, 0 or more (from OFFLOAD_LINGER_MS in the "
            "environment)",
        ),
    ],
)
def test_bad_environment_values_are_one_line_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    result = offload("offload.client", "--frames", "1", env={variable: value})
    assert message in one_error_line(result)


def test_every_client_option_can_come_from_the_environment() -> None:
    values: dict[str, tuple[str, object]] = {
        "local_tasks": ("3", 3),
        "fps": ("12.5", 12.5),
        "control_period": ("1.5", 1.5),
        "emulate_slowdown": ("4", 4.0),
        "emulate_link": ("20mbit,30ms", "20mbit,30ms"),
        "server": ("cloud:6000", "cloud:6000"),
        "pipeline": ("tests.apps.counter", "tests.apps.counter"),
        "source": ("synthetic:5", "synthetic:5"),
        "frames": ("40", 40),
        "window": ("3", 3),
        "device_id": ("pi-7", "pi-7"),
        "output": ("out.jsonl", "out.jsonl"),
        "report": ("run.json", "run.json"),
        "connect_timeout": ("2.5", 2.5),
        "max_message_bytes": ("65536", 65536),
        "compression": ("lz4", "lz4"),
        "buffer": ("5", 5),
        "when_full": ("drop-oldest", "drop-oldest"),
        "item_timeout": ("7", 7.0),
        "resend_grace": ("0", 0.0),
        "outage": ("hold-last", "hold-last"),
        "buffer_bytes": ("4096", 4096),
        "buffer_dir": ("/var/lib/offload", "/var/lib/offload"),
        "tls": ("1", True),
        "tls_ca": ("ca.pem", "ca.pem"),
        "tls_cert": ("device.pem", "device.pem"),
        "tls_key": ("device.key", "device.key"),
        "token": ("s3cret", "s3cret"),
        "log_level": ("debug", "DEBUG"),
        "batch_items": ("4", 4),
        "batch_bytes": ("65536", 65536),
        "linger_ms": ("25", 25.0),
        "device_workers": ("2", 2),
    }
    dests = {a.dest for a in option_actions(build_parser({}))}
    assert dests == set(values), "a new option needs a line here"
    environ = {f"OFFLOAD_{dest.upper()}": raw for dest, (raw, _) in values.items()}
    parser = build_parser(environ)
    args = parser.parse_args([])
    assert {dest: getattr(args, dest) for dest in values} == {d: v for d, (_, v) in values.items()}
    assert parser.parse_args(["--window", "9"]).window == 9  # the command line wins
    assert "OFFLOAD_WINDOW]" in parser.format_help()


@pytest.mark.parametrize("option", ["--output", "--report"])
def test_a_file_in_a_missing_folder_is_refused_before_anything_runs(
    tmp_path: Path, option: str
) -> None:
    path = tmp_path / "missing" / "file.json"
    line = one_error_line(offload("offload.client", "--frames", "3", option, str(path)))
    assert f"{option} {path}: the folder {path.parent} does not exist" in line
    line = one_error_line(offload("offload.client", "--frames", "3", option, str(tmp_path)))
    assert f"{option} {tmp_path}: that is a folder" in line


def test_help_shows_examples() -> None:
    result = offload("offload.client", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--local-tasks 3" in result.stdout
    assert "'synthetic:SEED'" in result.stdout


@pytest.mark.parametrize(
    ("module", "script"),
    [("offload.client", "offload-client"), ("offload.server", "offload-server")],
)
def test_help_names_the_command_as_it_was_called(module: str, script: str) -> None:
    assert offload(module, "--help").stdout.startswith(f"usage: python -m {module}")
    path = Path(sys.executable).with_name(script)
    if not path.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    result = subprocess.run(
        [str(path), "--help"], env=ENV, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.startswith(f"usage: {script} ")
    assert "python -m" not in result.stdout


def test_the_help_examples_name_the_command_as_it_was_called() -> None:
    script = Path(sys.executable).with_name("offload-client")
    if not script.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    result = subprocess.run(
        [str(script), "--help"], env=ENV, capture_output=True, text=True, timeout=60, check=True
    )
    assert "  offload-client --local-tasks 3" in result.stdout


def test_a_refused_connection_is_noticed_at_once_and_said_once(tmp_path: Path) -> None:
    port = free_port()
    report_path = tmp_path / "report.json"
    result = offload(
        "offload.client",
        "--local-tasks",
        "2",
        "--server",
        f"127.0.0.1:{port}",
        "--frames",
        "3",
        # Waiting for it would outlast the subprocess's timeout.
        "--connect-timeout",
        "3600",
        "--report",
        str(report_path),
    )
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(said) == 1, result.stderr
    assert "connection refused: nothing listens on that port" in said[0]
    assert "running every task on this device meanwhile" in said[0]
    report = json.loads(report_path.read_text())
    assert report["items"]["completed"] + report["items"]["filtered"] == 3
    assert report["link"]["ran_locally"] == 3 and report["link"]["connects"] == 0
    assert {t["ran_on"] for t in report["tasks"]} == {"device"}


def test_server_by_hand_gives_client_only_results_at_every_split(
    tmp_path: Path, server_process: tuple[subprocess.Popen[str], int]
) -> None:
    _, port = server_process
    reference = cli_output(tmp_path, "local", "--frames", "40")
    assert len(reference) == 40
    for k in range(1, 8):
        lines = cli_output(
            tmp_path,
            f"k{k}",
            "--frames",
            "40",
            "--local-tasks",
            str(k),
            "--server",
            f"127.0.0.1:{port}",
        )
        assert lines == reference, f"split {k}"


@pytest.mark.skipif(not WEBCAM_CLIP.exists(), reason=f"webcam clip not found at {WEBCAM_CLIP}")
def test_webcam_clip_through_the_command_line(
    tmp_path: Path, server_process: tuple[subprocess.Popen[str], int]
) -> None:
    _, port = server_process
    reference = cli_output(tmp_path, "local", "--source", str(WEBCAM_CLIP), "--frames", "120")
    remote = cli_output(
        tmp_path,
        "k2",
        "--source",
        str(WEBCAM_CLIP),
        "--frames",
        "120",
        "--local-tasks",
        "2",
        "--server",
        f"127.0.0.1:{port}",
    )
    assert remote == reference
    assert json.loads(reference[0])["status"] == "filtered"  # the ball enters at frame 27


def test_embedded_server_when_no_server_is_given(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = offload(
        "offload.client", "--local-tasks", "3", "--frames", "30", "--report", str(report_path)
    )
    assert result.returncode == 0, result.stderr
    assert "started an embedded server on 127.0.0.1:" in result.stderr
    assert "offload summary" in result.stdout and "throughput" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["items"]["captured"] == 30
    assert report["items"]["completed"] + report["items"]["filtered"] == 30
    assert [t["ran_on"] for t in report["tasks"]] == ["device"] * 3 + ["server"] * 4
    assert report["bytes"]["sent"] > 30 * 500 * 375  # a frame and its mask per item


def test_the_embedded_server_takes_none_of_the_devices_settings(tmp_path: Path) -> None:
    # A device set up for its real server (OFFLOAD_TOKEN, OFFLOAD_TLS_CERT) runs a split without
    # --server: its embedded server must not demand what this client never sends it.
    report_path = tmp_path / "report.json"
    cert, key = tmp_path / "device.pem", tmp_path / "device.key"
    settings = {
        "OFFLOAD_TOKEN": "s3cret",
        "OFFLOAD_TLS_CERT": str(cert),
        "OFFLOAD_TLS_KEY": str(key),
    }
    result = offload(
        "offload.client",
        *("--local-tasks", "3", "--frames", "3", "--report", str(report_path)),
        env=settings,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["error"] is None
    assert report["items"]["completed"] + report["items"]["filtered"] == 3
    assert report["tasks"][6]["ran_on"] == "server"


def test_sigterm_stops_the_server_gracefully(
    server_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, _ = server_process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    assert "event=stopping signal=SIGTERM" in process.stderr.read()


class Lines:
    """The lines a process writes on a stream, as they come."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self.closed, timeout)
            line = found()
        assert line is not None, f"no {text!r} in {''.join(self.lines)}"
        return line

    def text(self, timeout: float = 10) -> str:
        """Everything, once the stream has ended (every writer has exited)."""
        with self._changed:
            self._changed.wait_for(lambda: self.closed, timeout)
            return "".join(self.lines)


@pytest.mark.parametrize("workers", ["1", "2"], ids=["1-worker", "2-workers"])
@pytest.mark.parametrize("split", [[], ["--local-tasks", "1"]], ids=["here", "at-the-server"])
def test_a_second_ctrl_c_stops_at_once_quietly_with_130(
    tmp_path: Path, split: list[str], workers: str
) -> None:
    # Task 1 never returns: finishing the item in flight would take forever.
    out = tmp_path / "out.jsonl"
    client = subprocess.Popen(
        [
            *(sys.executable, "-m", "offload.client", "--pipeline", "tests.apps.hang", *split),
            *("--output", str(out), "--device-workers", workers),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stderr is not None
    err = Lines(client.stderr)
    try:
        embedded = err.wait_for("started an embedded server on") if split else None
        err.wait_for("hang: item 1 is in task 1")
        client.send_signal(signal.SIGINT)
        err.wait_for("SIGINT: finishing items in flight (again to abort)")
        client.send_signal(signal.SIGINT)
        assert client.wait(timeout=60) == 130
    finally:
        client.kill()
        client.wait(timeout=10)
    said = err.text()
    assert "Traceback" not in said and "Exception" not in said, said
    # Items sent to the server end as interrupted, and so do items stuck on a device worker.
    # (An item stuck in a task inside the capture loop, one worker, is not captured yet: it has
    # no line.)
    ends = {(e["status"], e["error"]) for e in map(json.loads, out.read_text().splitlines())}
    assert ends == (
        {("not_run", "the run was interrupted before this item finished")}
        if split or workers != "1"
        else set()
    )
    if embedded is not None:  # the embedded server went with it
        port = int(embedded.rsplit(":", 1)[1])
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def test_ctrl_c_at_a_terminal_lets_the_embedded_server_finish_the_items_in_flight(
    tmp_path: Path,
) -> None:
    # A terminal sends Ctrl-C to its whole foreground process group, not to the client alone.
    out, report_path = tmp_path / "out.jsonl", tmp_path / "report.json"
    client = subprocess.Popen(
        [
            *(sys.executable, "-m", "offload.client", "--local-tasks", "3"),
            *("--output", str(out), "--report", str(report_path)),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert client.stderr is not None
    err = Lines(client.stderr)
    try:
        err.wait_for("started an embedded server on")
        deadline = time.monotonic() + 60
        while (not out.exists() or out.stat().st_size < 1000) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(client.pid, signal.SIGINT)
        assert client.wait(timeout=60) == 0, err.text()
    finally:
        client.kill()
        client.wait(timeout=10)
    said = err.text()
    assert "SIGINT: finishing items in flight" in said and "disconnected" not in said, said
    link = json.loads(report_path.read_text())["link"]
    assert link["disconnects"] == 0 and link["ran_locally"] == 0


@pytest.mark.parametrize("workers", ["1", "2"], ids=["1-worker", "2-workers"])
def test_ctrl_c_stops_the_client_cleanly_with_a_summary(tmp_path: Path, workers: str) -> None:
    out = tmp_path / "out.jsonl"
    report_path = tmp_path / "report.json"
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.client",
            "--device-workers",
            workers,
            "--local-tasks",
            "4",
            "--output",
            str(out),
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The synthetic camera never ends: wait until items are flowing, then press Ctrl-C.
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 1000) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    assert "SIGINT: finishing items in flight" in stderr
    assert "offload summary" in stdout
    report = json.loads(report_path.read_text())
    lines = out.read_text().splitlines()
    # Nothing lost: every captured item ended and has its line, in order.
    assert len(lines) == report["items"]["captured"] > 0
    assert [json.loads(line)["item"] for line in lines] == list(range(len(lines)))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a disk always full)")
def test_a_full_output_disk_ends_the_run_with_one_line_naming_the_file() -> None:
    # Against the embedded server: answers are written by the link's reader thread.
    result = offload(
        "offload.client",
        *("--local-tasks", "2", "--frames", "100000", "--output", "/dev/full"),
        timeout=100,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "--output /dev/full" in errors[0] and "No space left on device" in errors[0]


def test_device_workers_from_the_environment_give_the_output_of_one_worker(
    tmp_path: Path,
) -> None:
    args = ("--local-tasks", "4", "--frames", "60", "--source", "synthetic:3")
    one = cli_output(tmp_path, "one", *args)
    report = tmp_path / "report.json"
    result = offload(
        "offload.client",
        *("--output", str(tmp_path / "two.jsonl"), "--report", str(report), "--device-id", "cli"),
        *args,
        env={"OFFLOAD_DEVICE_WORKERS": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "two.jsonl").read_text().splitlines() == one
    assert json.loads(report.read_text())["device"]["workers"] == 2
    assert "  device     2 workers, " in result.stdout


def test_more_device_workers_than_the_window_is_one_line_naming_both() -> None:
    line = one_error_line(
        offload("offload.client", "--local-tasks", "3", "--window", "2", "--device-workers", "3")
    )
    assert line == (
        "error: --device-workers 3 exceeds --window 2: items on the device's workers and the "
        "one captured ahead (4) count against it; raise --window or give fewer"
    )
