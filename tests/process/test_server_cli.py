"""The server's command line as an operator meets it: a port in use, bad options, a lean
install, SIGTERM. Real server processes on loopback, real files, real client streams."""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from offload import ConfigError, ServerConfig, _extras, serve
from offload._device.embedded import EmbeddedServer
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, ROOT, self_signed_certificate, spawn_server, state

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Makes the `server` extra's packages unimportable, as in a device's `pip install .`: put on
# PYTHONPATH, it is imported by every Python started with that path, the embedded server too.
LEAN_SITECUSTOMIZE = """\
import sys

EXTRA = ("grpc_health", "grpc_reflection", "prometheus_client")


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def server(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "offload.server", "--announce", *args],
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Start a server that must refuse to start: its one-line error (it must not serve)."""
    process = server(*args, env=env)
    try:
        assert process.stdout is not None
        announced = process.stdout.readline()  # "" once it exits; a line if it serves
        assert announced == "", f"started anyway: {announced}"
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    return stderr


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def running_server() -> Iterator[Callable[..., tuple[subprocess.Popen[str], int]]]:
    """Start ``python -m offload.server`` processes on 127.0.0.1; all stopped afterwards."""
    started: list[EmbeddedServer] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], int]:
        started.append(spawn_server(*args))
        return started[-1].process, started[-1].port

    yield start
    for server in started:
        server.stop(30)  # SIGTERM: a group of processes stops with its parent


def test_a_second_server_on_a_port_in_use_fails_at_once_saying_so(
    running_server: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    _, port = running_server("--port", "0")
    for host in ["127.0.0.1", "0.0.0.0"]:
        line = one_line(refused("--host", host, "--port", str(port)))
        assert f"--port {port}: address already in use" in line
        assert "choose another --port" in line and "--processes N" in line


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_no_server_joins_the_port_of_a_group_of_processes(
    running_server: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    _, port = running_server("--port", "0", "--processes", "2")
    for extra in [[], ["--processes", "2"]]:
        line = one_line(refused("--host", "127.0.0.1", "--port", str(port), *extra))
        assert f"--port {port}: address already in use" in line


def test_serve_refuses_a_port_in_use_unless_told_to_share_it() -> None:
    first = serve(ServerConfig(pipeline=COUNTER, host="127.0.0.1", port=0))
    try:
        taken = ServerConfig(pipeline=COUNTER, host="127.0.0.1", port=first.port)
        with pytest.raises(ConfigError, match=f"--port {first.port}: address already in use"):
            serve(taken)
    finally:
        first.stop(None)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pems")
    cert, key = self_signed_certificate(directory, "server", "IP:127.0.0.1")
    other_cert, other_key = self_signed_certificate(directory, "other")
    encrypted = directory / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret"),
            *("-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    text = directory / "notes.txt"
    text.write_text("not a certificate\n")
    return {
        "cert": cert,
        "key": key,
        "other_key": other_key,
        "other_cert": other_cert,
        "encrypted": encrypted,
        "text": text,
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--tls-cert", "key", "--tls-key", "cert"], "--tls-cert {key} holds a private key"),
        (["--tls-cert", "cert", "--tls-key", "other_key"], "--tls-key {other_key} is not the"),
        (["--tls-cert", "cert", "--tls-key", "encrypted"], "--tls-key {encrypted} is encrypted"),
        (["--tls-cert", "text", "--tls-key", "key"], "--tls-cert {text} holds no PEM cert"),
        (["--tls-cert", "cert", "--tls-key", "text"], "--tls-key {text} holds no PEM private"),
        (["--tls-cert", "cert", "--tls-key", "/no/such.key"], "--tls-key /no/such.key: cannot"),
        (["--tls-cert", "cert", "--tls-key", "key", "--tls-client-ca", "key"], "--tls-client-ca"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address"),
        (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
    ],
)
def test_a_bad_server_option_is_one_line_naming_it_not_a_traceback(
    pems: dict[str, Path], options: list[str], expected: str
) -> None:
    args = [str(pems.get(o, o)) for o in options]
    if "--host" not in args:
        args += ["--host", "127.0.0.1"]
    line = one_line(refused(*args, "--port", "0"))
    assert expected.format(**{k: str(v) for k, v in pems.items()}) in line


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--grace", "nan"], "--grace nan: give a number of seconds"),
        (["--max-message-bytes", str(2**31)], "--max-message-bytes must be at most 2147483647"),
        (["--host", ""], "--host is empty"),
    ],
)
def test_out_of_range_server_options_are_usage_errors(options: list[str], expected: str) -> None:
    assert expected in refused(*options, "--port", "0").splitlines()[-1]


def test_a_server_serves_on_an_ipv6_literal(
    running_server: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError:
        pytest.skip("no IPv6 loopback here")
    process = server("--host", "::1", "--port", "0")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on [::1]:"), process.communicate(timeout=10)
    finally:
        process.kill()
        process.communicate(timeout=10)


def test_sigterm_ends_an_open_stream_unavailable_saying_the_server_shuts_down(
    running_server: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    process, port = running_server("--port", "0", "--pipeline", COUNTER)
    outbox: queue.Queue[pb.TaskState | None] = queue.Queue()

    def requests() -> Iterator[pb.TaskState]:
        while (item := outbox.get()) is not None:
            yield item

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answers = pb_grpc.OffloadStub(channel).ExecuteRemaining(requests(), timeout=60)
        try:
            outbox.put(state(0, 1, run_id="term"))
            assert next(answers).status == pb.ItemResult.COMPLETED
            process.send_signal(signal.SIGTERM)  # the stream is open, waiting for an item
            with pytest.raises(grpc.RpcError) as err:
                next(answers)
        finally:
            outbox.put(None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the server is shutting down: reconnect" in (err.value.details() or "")
    assert process.wait(timeout=30) == 0


@pytest.fixture
def lean(tmp_path: Path) -> dict[str, str]:
    """The environment of a device install: the server extra's packages cannot be imported."""
    site = tmp_path / "lean-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LEAN_SITECUSTOMIZE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    check = subprocess.run(
        [sys.executable, "-c", "import prometheus_client"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert "No module named 'prometheus_client'" in check.stderr  # the seam holds
    return env


def test_a_split_runs_with_the_embedded_server_on_a_lean_install(
    lean: dict[str, str], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "offload.client", "--local-tasks", "3", "--frames", "5"),
            *("--report", str(report)),
        ],
        cwd=ROOT,
        env=lean,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "started an embedded server" in result.stderr
    assert "reflection" not in result.stderr  # the embedded server does without it, silently
    tasks = json.loads(report.read_text())["tasks"]
    assert [t["ran_on"] for t in tasks] == ["device"] * 3 + ["server"] * 4


def test_metrics_without_prometheus_client_say_what_to_install(lean: dict[str, str]) -> None:
    line = one_line(refused("--port", "0", "--metrics-port", "0", env=lean))
    # Run from the checkout: its extra is installed from here.
    assert line == (
        "error: --metrics-port needs prometheus-client, which a device install leaves out: "
        "pip install '.[server]'"
    )


def fake_install(
    site: Path, direct_url: dict[str, object] | None
) -> importlib.metadata.Distribution:
    """offload as pip leaves it in ``site``: the package and its .dist-info."""
    (site / "offload").mkdir(parents=True)
    (site / "offload" / "__init__.py").write_text("")
    info = site / "offload-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: offload\nVersion: 0.1.0\n"
        'Requires-Dist: grpcio-reflection==1.85.1; extra == "server"\n'
    )
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return importlib.metadata.PathDistribution(info)


def test_the_install_command_for_the_server_extra_fits_how_offload_was_installed(
    tmp_path: Path,
) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "offload").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    wheel = tmp_path / "offload-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    cases: list[tuple[dict[str, object] | None, Path, str]] = [
        (None, tmp_path, "pip install 'offload[server]'"),  # from an index
        ({"url": checkout.as_uri(), "dir_info": {}}, checkout, "pip install '.[server]'"),
        ({"url": checkout.as_uri(), "dir_info": {}}, tmp_path, f"pip install '{checkout}[server]'"),
        ({"url": wheel.as_uri(), "archive_info": {}}, tmp_path, f"pip install '{wheel}[server]'"),
        (
            {"url": "https://example.org/offload.git", "vcs_info": {"vcs": "git"}},
            tmp_path,
            "pip install 'grpcio-reflection==1.85.1'",
        ),
    ]
    for index, (direct_url, cwd, expected) in enumerate(cases):
        site = tmp_path / f"site{index}"
        distribution = fake_install(site, direct_url)
        assert _extras.pip_install_server_extra(site / "offload", distribution, cwd) == expected
    # Run from a checkout (PYTHONPATH or an editable install): the checkout's extra.
    assert _extras.pip_install_server_extra(checkout / "offload", None, checkout) == (
        "pip install '.[server]'"
    )
    editable = fake_install(
        tmp_path / "site-e", {"url": checkout.as_uri(), "dir_info": {"editable": True}}
    )
    assert _extras.pip_install_server_extra(checkout / "offload", editable, tmp_path) == (
        f"pip install -e '{checkout}[server]'"
    )


SERVERLESS_PIPELINE = """\
import sys

if sys.argv[0].endswith("server.py"):
    raise RuntimeError("this pipeline cannot load on a server")


def capture():
    return 1


def double(x):
    return 2 * x


tasks = [capture, double]
"""


def test_an_embedded_server_that_cannot_start_says_why_at_once(tmp_path: Path) -> None:
    (tmp_path / "serverless.py").write_text(SERVERLESS_PIPELINE)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "offload.client", "--pipeline", "serverless"),
            *("--local-tasks", "1", "--frames", "3"),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "the embedded server failed to start: " in result.stderr
    assert "RuntimeError: this pipeline cannot load on a server" in result.stderr
    assert "did not start within" not in result.stderr


def test_the_embedded_server_ignores_a_real_servers_environment(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "offload.client", "--local-tasks", "3", "--frames", "3"),
            *("--report", str(report)),
        ],
        cwd=ROOT,
        # Set for a server on this machine: the embedded one takes none of it.
        env={**ENV, "OFFLOAD_TOKEN": "s3cret", "OFFLOAD_PROCESSES": "2", "OFFLOAD_WORKERS": "0"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "UNAUTHENTICATED" not in result.stderr
    assert json.loads(report.read_text())["link"]["ran_locally"] == 0
