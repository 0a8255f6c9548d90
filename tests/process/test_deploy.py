"""Deployment without a Docker engine: what Dockerfile.server copies, builds and runs exists and
works; the wheel carries generated stubs and console scripts; a device install stays lean."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from offload import RunningServer

from ..helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile.server"
SERVER_ONLY = ("grpc_health", "grpc_reflection", "prometheus_client")
SERVER_PACKAGES = {"grpcio-health-checking", "grpcio-reflection", "prometheus-client"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for args in self.all("ENV"):
            pairs.update(re.findall(r"(\w+)=(\S+)", args))
        return pairs


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: instructions joined across continuation lines."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base, name or None))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    command = json.loads(args)
    assert isinstance(command, list), f"{args}: use the exec (JSON) form"
    return [str(c) for c in command]


def dockerignore_patterns() -> list[re.Pattern[str]]:
    """.dockerignore as regular expressions (Docker's syntax: *, ?, **; no ! exceptions used)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not handled by this test"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        patterns.append(re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")))
    return patterns


def ignored(relative: Path, patterns: list[re.Pattern[str]]) -> bool:
    """Docker excludes a path when a pattern matches it or any directory above it."""
    parts = relative.parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY instructions from the build context."""
    copies = []
    for args in stage.all("COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)


def test_the_image_is_multi_stage_slim_and_runs_unprivileged(stages: list[Stage]) -> None:
    build, final = stages[0], stages[-1]
    assert len(stages) == 2 and build.name == "build"
    assert all(re.fullmatch(r"python:3\.\d+-slim", s.base) for s in stages)
    assert any(args.startswith("--from=build ") for args in final.all("COPY"))
    # The build tools stay in the build stage: the final one installs nothing itself.
    assert not any("pip install" in args for args in final.all("RUN"))
    (user,) = final.all("USER")
    assert user not in {"root", "0"} and user.split(":")[0].isdigit()
    assert f"--uid {user.split(':')[0]}" in " ".join(final.all("RUN"))
    env = final.env()
    assert sorted(final.all("EXPOSE")[0].split()) == sorted(
        [env["OFFLOAD_PORT"], env["OFFLOAD_METRICS_PORT"]]
    )
    assert exec_form(final.all("ENTRYPOINT")[0]) == ["python", "-m", "offload.server"]


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    assert copy_sources(stages[0]), "the build stage copies the sources"
    for sources, _ in [c for stage in stages for c in copy_sources(stage)]:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file"
            assert not ignored(Path(source.rstrip("/")), patterns), f"{source} is .dockerignored"
    # Locally generated stubs never reach the image: the build stage generates its own.
    assert ignored(Path("offload/v1/offload_pb2.py"), patterns)
    assert ignored(Path("offload/v1/offload_pb2_grpc.pyi"), patterns)
    assert ignored(Path(".venv/bin/python"), patterns)
    assert not ignored(Path("offload/v1/__init__.py"), patterns)


def build_context_copy(stage: Stage, into: Path) -> Path:
    """What the build stage's COPY instructions put in its WORKDIR, with .dockerignore applied."""
    patterns = dockerignore_patterns()
    for sources, destination in copy_sources(stage):
        for source in sources:
            src = ROOT / source
            target = into / destination if destination.endswith("/") else into
            if src.is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
                continue
            for file in src.rglob("*"):
                relative = file.relative_to(ROOT)
                if file.is_file() and not ignored(relative, patterns):
                    out = into / destination / file.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
    return into


@pytest.fixture(scope="module")
def wheel(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from exactly what the image's build stage copies (the build hook runs
    grpcio-tools, as it does inside `pip install .`; no network: the venv has the tools)."""
    (install,) = [a for a in stages[0].all("RUN") if "pip install" in a]
    assert '".[server,demo]"' in install, "the image installs the server and demo extras"
    context = build_context_copy(stages[0], tmp_path_factory.mktemp("context"))
    assert not (context / "offload/v1/offload_pb2.py").exists()
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("-w", str(out), str(context)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("offload-*.whl")
    return built


def test_the_wheel_carries_offload_alone_with_stubs_scripts_and_a_lean_base(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")}
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    # One top-level package: no `examples` (or `tests`) in a user's site-packages.
    assert {n.split("/")[0] for n in names} == {"offload", info}
    assert {"offload/v1/offload_pb2.py", "offload/v1/offload_pb2_grpc.py"} <= names
    assert "offload/healthcheck.py" in names
    assets = {"index.html", "login.html", "dashboard.js", "uPlot.iife.min.js", "uPlot.LICENSE"}
    assert {f"offload/_cloud/dashboard_assets/{a}" for a in assets} <= names
    assert "offload-client = offload.client:main" in entry_points
    assert "offload-server = offload.server:main" in entry_points
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]

    def extra(name: str) -> set[str]:
        return {r.name for r in requires if r.marker and r.marker.evaluate({"extra": name})}

    base = {r.name for r in requires if r.marker is None}
    assert base == {"grpcio", "protobuf", "numpy", "psutil"}  # no OpenCV: that is the demo's
    assert extra("server") == SERVER_PACKAGES
    assert extra("demo") == {"opencv-python-headless"}
    assert not any(s.operator == "==" for r in requires for s in r.specifier), "ranges, not pins"


def test_console_scripts_of_the_installed_wheel_run(
    wheel: Path, stages: list[Stage], tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"),
            *("--target", str(target), str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Run from directories outside the checkout, so that nothing comes from it.
    env = {**os.environ, "PYTHONPATH": str(target)}
    empty = tmp_path / "empty"
    empty.mkdir()
    # The image's working directory, as its final stage's COPY lays it out: the demo is there.
    app = build_context_copy(stages[-1], tmp_path / "app")

    def run(cwd: Path, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    client_script, server_script = (
        str(target / "bin/offload-client"),
        str(target / "bin/offload-server"),
    )
    where = run(
        empty, sys.executable, "-c", "import offload.v1.offload_pb2 as m; print(m.__file__)"
    )
    assert where.stdout.startswith(str(target)), where
    # The default pipeline is the demo, which the wheel does not hold: one line says so.
    refused = run(empty, client_script, "--frames", "5", "--device-id", "wheel")
    assert refused.returncode == 2, refused
    assert refused.stderr.count("\n") == 1 and "run from the root of a checkout" in refused.stderr
    assert "--pipeline package.module" in refused.stderr
    fingerprint = run(app, server_script, "--print-fingerprint")
    assert re.fullmatch(r"[0-9a-f]{16}\n", fingerprint.stdout), fingerprint
    client = run(app, client_script, "--frames", "5", "--device-id", "wheel")
    assert client.returncode == 0, client.stderr
    assert "offload summary" in client.stdout


BLOCK_SERVER_PACKAGES = (
    "import runpy, sys\n"
    f"for name in {SERVER_ONLY!r}:\n"
    "    sys.modules[name] = None  # importing it now raises ImportError, as if not installed\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def without_server_packages(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_SERVER_PACKAGES, module, *args],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_device_runs_without_the_server_packages(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server()
    out = tmp_path / "out.jsonl"
    remote = without_server_packages(
        "offload.client",
        "--local-tasks",
        "3",
        "--server",
        f"127.0.0.1:{server.port}",
        "--frames",
        "10",
        "--output",
        str(out),
    )
    assert remote.returncode == 0, remote.stderr
    assert len(out.read_text().splitlines()) == 10
    local = without_server_packages("offload.client", "--frames", "3")
    assert local.returncode == 0, local.stderr
    # A server runs without them too; only metrics are refused, saying what to install.
    refused = without_server_packages("offload.server", "--port", "0", "--metrics-port", "0")
    assert refused.returncode == 2
    assert "pip install '.[server]'" in refused.stderr  # from this checkout
    assert "Traceback" not in refused.stderr


def test_the_image_entry_point_and_healthcheck_work_with_the_image_environment(
    stages: list[Stage],
) -> None:
    """The final stage's ENTRYPOINT started with its ENV (ports moved to free ones on
    loopback), then its HEALTHCHECK command, then a scrape of the EXPOSEd metrics endpoint."""
    final = stages[-1]
    image_env = {k: v for k, v in final.env().items() if k != "PATH"}
    env = {
        **os.environ,
        **image_env,
        "PYTHONPATH": str(ROOT),
        "OFFLOAD_HOST": "127.0.0.1",
        "OFFLOAD_PORT": "0",
        "OFFLOAD_METRICS_PORT": "0",
        "OFFLOAD_ANNOUNCE": "1",
    }
    entry = exec_form(final.all("ENTRYPOINT")[0])
    (healthcheck,) = final.all("HEALTHCHECK")
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert entry[0] == probe[0] == "python"
    server = subprocess.Popen(
        [sys.executable, *entry[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        metrics_port = int(server.stdout.readline().rsplit(":", 1)[1])
        check = subprocess.run(
            [sys.executable, *probe[1:]],
            check=False,
            env={**env, "OFFLOAD_HOST": image_env["OFFLOAD_HOST"], "OFFLOAD_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        assert "SERVING" in check.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert b"offload_active_streams 0.0" in response.read()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0
