"""Deployment without a Docker engine: what Dockerfile.server copies, builds and runs exists and
works; the wheel carries generated stubs and console scripts; a device install stays lean."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from packaging.requirements import Requirement

from deploy.image.build import dockerignore_patterns, ignored, pip_settings
from offload import RunningServer
from offload._env import env_name, option_actions
from offload.server import build_parser

from ..helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile.server"
SERVER_ONLY = ("grpc_health", "grpc_reflection", "prometheus_client", "redis")
SERVER_PACKAGES = {
    "grpcio-health-checking",
    "grpcio-reflection",
    "prometheus-client",
    "redis",
    "zstandard",
    "lz4",
}


@dataclass
class Stage:
    base: str  # with the global ARGs' defaults in
    name: str | None
    written: str = ""  # the base as FROM writes it
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for args in self.all("ENV"):
            pairs.update(re.findall(r"(\w+)=(\S+)", args))
        return pairs


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: instructions joined across continuation lines; the ARGs
    before the first FROM are the defaults of the variables FROM may use."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            written, _, name = args.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], written)
            stages.append(Stage(base, name or None, written))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    command = json.loads(args)
    assert isinstance(command, list), f"{args}: use the exec (JSON) form"
    return [str(c) for c in command]


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
    # One base for both (the environment's interpreter is the base's), by default the Python
    # of requires-python's floor; `make image` may pass a stand-in (ARG BASE).
    assert [s.written for s in stages] == ["${BASE}", "${BASE}"]
    floor = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floor is not None and build.base == f"python:{floor.group(1)}-slim"
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
    no_redis = without_server_packages("offload.server", "--port", "0", "--state", "redis://x:1/0")
    assert no_redis.returncode == 2, no_redis.stderr
    assert "--state redis:// needs redis" in no_redis.stderr and "Traceback" not in no_redis.stderr


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


CLOUD_INIT = ROOT / "deploy" / "compute-engine" / "cloud-init.yaml"
COS_COMMANDS = ("/usr/bin/docker", "/usr/bin/docker-credential-gcr", "/bin/bash", "/bin/mkdir")


@pytest.fixture(scope="module")
def cloud_config() -> dict[str, Any]:
    text = CLOUD_INIT.read_text()
    assert text.startswith("#cloud-config\n"), "cloud-init reads user data as config by its header"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def written_file(cloud_config: dict[str, Any], path: str) -> str:
    (content,) = [f["content"] for f in cloud_config["write_files"] if f["path"] == path]
    return str(content)


def unit_directives(unit: str) -> dict[str, list[str]]:
    """A systemd unit's directives (continuation lines joined), each with all its values."""
    directives: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", unit).splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_the_compute_engine_cloud_config_writes_the_units_and_starts_the_server(
    cloud_config: dict[str, Any],
) -> None:
    paths = {f["path"]: f for f in cloud_config["write_files"]}
    assert set(paths) == {
        "/etc/offload/fetch.sh",
        "/etc/systemd/system/offload-fetch.service",
        "/etc/systemd/system/offload-server.service",
    }
    assert all(isinstance(f["permissions"], str) for f in paths.values()), "octal as a string"
    assert cloud_config["runcmd"] == [
        "systemctl daemon-reload",
        "systemctl start offload-server.service",
    ]
    server = unit_directives(
        written_file(cloud_config, "/etc/systemd/system/offload-server.service")
    )
    assert server["Restart"] == ["always"]
    assert (
        "offload-fetch.service" in server["Requires"][0] and "docker.service" in server["After"][0]
    )


def test_cloud_init_accepts_the_compute_engine_cloud_config_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    if shutil.which("cloud-init") is None:
        pytest.skip("Debian's cloud-init package is not installed (.ci/run installs it)")

    def schema(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["cloud-init", "schema", "--config-file", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    valid = schema(CLOUD_INIT)
    assert valid.returncode == 0 and "Valid cloud-config" in valid.stdout, valid
    broken = tmp_path / "broken.yaml"
    config = yaml.safe_load(CLOUD_INIT.read_text())
    del config["write_files"][0]["path"]
    broken.write_text("#cloud-config\n" + yaml.safe_dump(config))
    refused = schema(broken)
    assert refused.returncode == 1 and "'path' is a required property" in refused.stderr, refused


def test_the_units_pass_systemd_analyze_verify_with_the_commands_of_container_optimized_os(
    cloud_config: dict[str, Any], tmp_path: Path
) -> None:
    """``systemd-analyze verify`` in a root holding systemd's own units, the two units, and
    stand-ins for what COS has (docker.service, docker, docker-credential-gcr, bash, mkdir)."""
    analyze, units = shutil.which("systemd-analyze"), Path("/usr/lib/systemd/system")
    if analyze is None or not (units / "multi-user.target").exists():
        pytest.skip("systemd-analyze and systemd's units are needed")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    for command in COS_COMMANDS:
        stand_in = root / command.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    (system / "docker.service").write_text("[Service]\nExecStart=/usr/bin/docker\n")
    names = ["offload-fetch.service", "offload-server.service"]
    for name in names:
        (system / name).write_text(written_file(cloud_config, f"/etc/systemd/system/{name}"))
    verify = subprocess.run(
        [analyze, f"--root={root}", "verify", *(f"/etc/systemd/system/{n}" for n in names)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    # Any complaint (an unknown directive, a missing command) is a failure, not only errors.
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def test_the_docker_run_line_publishes_the_image_ports_and_sets_server_variables(
    cloud_config: dict[str, Any], stages: list[Stage]
) -> None:
    final = stages[-1]
    server = unit_directives(
        written_file(cloud_config, "/etc/systemd/system/offload-server.service")
    )
    (exec_start,) = server["ExecStart"]
    words = shlex.split(exec_start)
    assert words[:3] == ["/usr/bin/docker", "run", "--rm"] and words[-1] == "${OFFLOAD_IMAGE}"

    def values(flag: str) -> list[str]:
        return [words[i + 1] for i, w in enumerate(words) if w == flag]

    published = {tuple(p.split(":")) for p in values("--publish")}
    exposed = set(final.all("EXPOSE")[0].split())
    assert published == {(port, port) for port in exposed}
    env = dict(e.split("=", 1) for e in values("--env"))
    # The env file holds what fetch.sh writes there: the token.
    fetch = written_file(cloud_config, "/etc/offload/fetch.sh")
    (env_file,) = values("--env-file")
    assert env_file == "/run/offload/server.env"
    from_file = re.findall(r"'(OFFLOAD_\w+)=%s\\n' \"\$\w+\" > \"\$run/server.env\"", fetch)
    assert from_file == ["OFFLOAD_TOKEN"]
    known = {env_name(a) for a in option_actions(build_parser({}))}
    assert {*env, *from_file} <= known, "every variable is a server option's"
    (volume,) = values("--volume")
    assert volume == "/run/offload/tls:/certs:ro"
    assert {os.path.dirname(env["OFFLOAD_TLS_CERT"]), os.path.dirname(env["OFFLOAD_TLS_KEY"])} == {
        "/certs"
    }
    assert server["EnvironmentFile"] == ["/run/offload/image.env"]
    # docker stop's timeout leaves the server its grace for the streams in flight.
    (stop,) = server["ExecStop"]
    assert int(stop.split("--time ")[1].split()[0]) > int(final.env().get("OFFLOAD_GRACE", "5"))


class FakeGoogle(http.server.BaseHTTPRequestHandler):
    """The metadata server and Secret Manager's REST API, as far as fetch.sh asks them."""

    image = "europe-west1-docker.pkg.dev/my-project/offload/offload-server:0.1.0"
    secrets: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        metadata = {
            "/computeMetadata/v1/instance/attributes/offload-image": self.image,
            "/computeMetadata/v1/project/project-id": "my-project",
            "/computeMetadata/v1/instance/service-accounts/default/token": json.dumps(
                {"access_token": "ya29.vm", "expires_in": 3599, "token_type": "Bearer"}
            ),
        }
        prefix, suffix = "/v1/projects/my-project/secrets/", "/versions/latest:access"
        body: str | None = None
        if self.path in metadata and self.headers["Metadata-Flavor"] == "Google":
            body = metadata[self.path]
        elif self.path.startswith(prefix) and self.path.endswith(suffix):
            name = self.path.removeprefix(prefix).removesuffix(suffix)
            if name in self.secrets and self.headers["Authorization"] == "Bearer ya29.vm":
                data = base64.b64encode(self.secrets[name]).decode()
                payload = {"data": data, "dataCrc32c": "1"}
                body = json.dumps({"name": name, "payload": payload}, indent=2)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write((body or "not found").encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="fetch.sh gives the key to uid 10001: root only")
def test_the_fetch_script_writes_the_image_and_the_secrets_for_the_container_user(
    cloud_config: dict[str, Any], tmp_path: Path
) -> None:
    script = tmp_path / "fetch.sh"
    script.write_text(written_file(cloud_config, "/etc/offload/fetch.sh"))
    cert, key = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", b"KEY\n"
    FakeGoogle.secrets = {
        "offload-token": b"t0ken",
        "offload-tls-cert": cert,
        "offload-tls-key": key,
    }
    google = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGoogle)
    threading.Thread(target=google.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{google.server_address[1]}"
    run_dir = tmp_path / "run"

    def fetch() -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ["PATH"],
            "METADATA_URL": f"{base}/computeMetadata/v1",
            "SECRET_MANAGER_URL": f"{base}/v1",
            "RUN_DIR": str(run_dir),
        }
        return subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    try:
        done = fetch()
        assert done.returncode == 0, done.stderr
        assert (run_dir / "image.env").read_text() == (
            f"OFFLOAD_IMAGE={FakeGoogle.image}\nOFFLOAD_REGISTRY=europe-west1-docker.pkg.dev\n"
        )
        assert (run_dir / "server.env").read_text() == "OFFLOAD_TOKEN=t0ken\n"
        assert (run_dir / "server.env").stat().st_mode & 0o777 == 0o600
        for name, content in (("server.crt", cert), ("server.key", key)):
            path = run_dir / "tls" / name
            assert path.read_bytes() == content
            assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (10001, 0o400)
        # A secret that cannot be read stops the unit (and so the server's start).
        del FakeGoogle.secrets["offload-tls-key"]
        failed = fetch()
        assert failed.returncode != 0 and "404" in failed.stderr, failed
    finally:
        google.shutdown()
        google.server_close()


def test_the_build_passes_pip_its_settings_with_the_environment_first_and_the_paths_they_name(
    tmp_path: Path,
) -> None:
    """``pip config list`` (as ``make image`` reads it) becomes one pip.conf for the build's
    secret; the local paths it names are what the build mounts (an index: with its files)."""
    index, wheels = tmp_path / "pypi" / "simple", tmp_path / "wheels"
    index.mkdir(parents=True)
    wheels.mkdir()
    listing = "\n".join(
        [
            f"global.extra-index-url='file://{index} https://mirror.example/simple'",
            "global.find-links='/nowhere/at/all'",
            "install.no-compile='1'",
            f":env:.find-links='{wheels}'",
            ":env:.config-file='/ignored.conf'",
        ]
    )
    text, paths = pip_settings(listing)
    assert text == (
        "[global]\n"
        f"extra-index-url = file://{index} https://mirror.example/simple\n"
        f"find-links = {wheels}\n"
        "[install]\nno-compile = 1\n"
    )
    assert paths == sorted([tmp_path / "pypi", wheels])
