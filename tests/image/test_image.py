"""The built server image, run as it is configured: ``make image-test`` (after ``make image``; not
part of ``make test``). ``IMAGE`` names the image (default ``localhost/offload-server:<version>``).

The image's own ENTRYPOINT runs as its own USER and WORKDIR in a buildah container (chroot
isolation: the host's network, so it binds 127.0.0.1 at a free port); its HEALTHCHECK command
runs in the same container, as Docker would run it. A device from this checkout streams items
through it and must get what a client-only run gets. The last test proves that these checks fail
on a broken image.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload import __version__

from ..helpers import ENV, ROOT, cli_output, free_port

IMAGE = os.environ.get("IMAGE") or f"localhost/offload-server:{__version__}"
BUILDAH = ("buildah", "--storage-driver", "vfs")
# The bound docs/deployment.md states: all the image's layers, uncompressed (as stored).
MAX_IMAGE_BYTES = 500 * 10**6
STARTUP_TIMEOUT = 120.0  # a hang guard, not a speed target: the server announces when serving


def buildah(*args: str) -> str:
    done = subprocess.run(
        [*BUILDAH, *args], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    user: str
    workdir: str
    env: dict[str, str]
    exposed: set[int]
    healthcheck: list[str]
    size: int


def image_config(name: str) -> ImageConfig:
    """What the image says of itself (``buildah inspect``), and its size in storage."""
    info = json.loads(buildah("inspect", "--type", "image", name))
    oci, docker = info["OCIv1"]["config"], info["Docker"]["config"]
    test = (docker.get("Healthcheck") or {}).get("Test") or []
    layers = json.loads(info["Manifest"])["layers"]
    return ImageConfig(
        entrypoint=oci.get("Entrypoint") or [],
        user=oci.get("User", ""),
        workdir=oci.get("WorkingDir", ""),
        env=dict(e.split("=", 1) for e in oci.get("Env") or []),
        exposed={int(p.split("/")[0]) for p in oci.get("ExposedPorts") or {}},
        healthcheck=test[1:] if test[:1] == ["CMD"] else test,
        size=sum(int(layer["size"]) for layer in layers),
    )


@pytest.fixture(scope="module")
def config() -> ImageConfig:
    return image_config(IMAGE)


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    """A working container of the image, as ``docker create`` makes one."""
    name = buildah("from", "--pull-never", "--name", f"offload-image-test-{os.getpid()}", IMAGE)
    yield name.strip()
    buildah("rm", name.strip())


@dataclass
class ImageServer:
    process: subprocess.Popen[str]
    env: dict[str, str]
    port: int
    metrics_port: int
    serving: psutil.Process  # the process that listens on the gRPC port

    def stop(self) -> int:
        """SIGTERM to the entry point's process, as ``docker stop`` sends it; its exit code."""
        self.serving.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)
        return self.process.returncode


def run_in(container: str, env: dict[str, str], *command: str) -> list[str]:
    """``buildah run`` of ``command`` in the container, as its configured user and directory."""
    flags = [f"--env={k}={v}" for k, v in env.items()]
    return [*BUILDAH, "run", "--isolation", "chroot", *flags, container, "--", *command]


def in_container(
    container: str, env: dict[str, str], *command: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_in(container, env, *command), capture_output=True, text=True, check=False, timeout=120
    )


def start_entry_point(container: str, config: ImageConfig) -> ImageServer:
    """The image's ENTRYPOINT with the image's environment, bound to 127.0.0.1 at free ports."""
    env = {
        "OFFLOAD_HOST": "127.0.0.1",
        "OFFLOAD_PORT": str(free_port()),
        "OFFLOAD_METRICS_PORT": str(free_port()),
        "OFFLOAD_ANNOUNCE": "1",
    }
    log = tempfile.TemporaryFile("w+")  # the server's log, never a pipe that could fill up
    process = subprocess.Popen(
        run_in(container, env, *config.entrypoint), stdout=subprocess.PIPE, stderr=log, text=True
    )
    assert process.stdout is not None
    announced: list[str] = []
    reader = threading.Thread(target=lambda: announced.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(STARTUP_TIMEOUT)
    if not announced or not announced[0].startswith("listening on "):
        process.kill()
        process.communicate(timeout=60)
        log.seek(0)
        lines = log.read().strip().splitlines() or ["(nothing on stderr)"]
        raise AssertionError(f"the entry point {config.entrypoint} did not serve: {lines[-1]}")
    port = int(env["OFFLOAD_PORT"])
    (serving,) = [
        psutil.Process(c.pid)
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    ]
    return ImageServer(process, env, port, int(env["OFFLOAD_METRICS_PORT"]), serving)


@pytest.fixture(scope="module")
def server(container: str, config: ImageConfig) -> Iterator[ImageServer]:
    running = start_entry_point(container, config)
    yield running
    if running.process.poll() is None:
        running.stop()


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return int(reply.status)


def test_the_image_runs_the_server_as_an_unprivileged_user_with_a_healthcheck(
    config: ImageConfig,
) -> None:
    assert config.entrypoint == ["python", "-m", "offload.server"]
    assert config.user.split(":")[0].isdigit() and int(config.user.split(":")[0]) != 0
    assert config.workdir == "/app"
    assert config.healthcheck == ["python", "-m", "offload.healthcheck"]
    assert config.exposed == {
        int(config.env["OFFLOAD_PORT"]),
        int(config.env["OFFLOAD_METRICS_PORT"]),
    }


def test_the_image_python_meets_requires_python(container: str) -> None:
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floor is not None
    version = in_container(
        container, {}, "python", "-c", "import sys; print(*sys.version_info[:2])"
    )
    assert version.returncode == 0, version.stderr
    assert tuple(map(int, version.stdout.split())) >= tuple(map(int, floor.groups()))


def test_the_image_is_smaller_than_its_stated_bound(config: ImageConfig) -> None:
    print(f"{IMAGE}: {config.size / 1e6:.0f} MB")
    assert config.size < MAX_IMAGE_BYTES, f"{config.size / 1e6:.0f} MB"


def test_the_entry_point_serves_as_the_image_user_and_its_healthcheck_passes(
    server: ImageServer, container: str, config: ImageConfig
) -> None:
    # The process on the port is the image's, in its working directory, not root.
    assert server.serving.uids().real == int(config.user.split(":")[0]) != 0
    assert server.serving.cwd().endswith(config.workdir)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health(server.port, "") == health(server.port, "offload.v1.Offload") == serving
    # The HEALTHCHECK command, in the container, with the container's environment.
    probe = in_container(container, server.env, *config.healthcheck)
    assert probe.returncode == 0, probe.stderr
    assert "SERVING" in probe.stdout


def test_a_device_streams_through_the_image_and_gets_client_only_results(
    server: ImageServer, tmp_path: Path
) -> None:
    reference = cli_output(tmp_path, "local", "--frames", "30")
    assert len(reference) == 30
    for k in (1, 3):
        remote = cli_output(
            tmp_path,
            f"k{k}",
            *("--frames", "30", "--local-tasks", str(k), "--server", f"127.0.0.1:{server.port}"),
        )
        assert remote == reference, f"split {k}"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        assert (
            'offload_items_total{device="cli",status="completed"} 60.0' in response.read().decode()
        )


def test_the_server_stops_on_sigterm_and_the_healthcheck_then_fails(
    server: ImageServer, container: str, config: ImageConfig
) -> None:
    assert server.stop() == 0
    probe = in_container(container, server.env, *config.healthcheck)
    assert probe.returncode == 1, probe


BREAKAGES = {
    # (buildah config options, the tests above that must then fail)
    "entry-point": (
        ["--entrypoint", '["python", "-m", "offload.no_such_module"]'],
        {
            "test_the_image_runs_the_server_as_an_unprivileged_user_with_a_healthcheck",
            "test_the_entry_point_serves_as_the_image_user_and_its_healthcheck_passes",
            "test_a_device_streams_through_the_image_and_gets_client_only_results",
        },
    ),
    "root-user": (
        ["--user", "0"],
        {
            "test_the_image_runs_the_server_as_an_unprivileged_user_with_a_healthcheck",
            "test_the_entry_point_serves_as_the_image_user_and_its_healthcheck_passes",
        },
    ),
}


@pytest.mark.skipif("OFFLOAD_IMAGE_TEST_BROKEN" in os.environ, reason="within the proof itself")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_these_checks_fail_on_a_broken_image(breakage: str, tmp_path: Path) -> None:
    """The image with one thing broken (``buildah config``), then this module run against it:
    exactly the tests that check that thing fail."""
    options, must_fail = BREAKAGES[breakage]
    broken = f"localhost/offload-server:broken-{breakage}"
    work = buildah("from", "--pull-never", IMAGE).strip()
    buildah("config", *options, work)
    buildah("commit", "--quiet", "--rm", work, broken)
    report = tmp_path / "report.xml"
    try:
        run = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
                *(f"--junitxml={report}", __file__),
            ],
            cwd=ROOT,
            env={**ENV, "IMAGE": broken, "OFFLOAD_IMAGE_TEST_BROKEN": "1"},
            capture_output=True,
            text=True,
            check=False,
            timeout=850,
        )
    finally:
        buildah("rmi", broken)
    assert run.returncode == 1, run.stdout[-2000:]
    failed = {
        case.attrib["name"]
        for case in ET.parse(report).iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    }
    assert must_fail <= failed, run.stdout[-2000:]
