"""Shared fixtures: real gRPC servers on ephemeral loopback ports, pipeline modules written for a
test, throw-away certificates; and the ``slow`` mark on everything under tests/process/.

Helpers that are not fixtures are in ``tests/helpers.py``.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from examples.ball_tracking import reset_state
from offload import Pipeline, RunningServer, ServerConfig, load_pipeline, serve

from .helpers import Pki, RedisServer

PROCESS_TESTS = Path(__file__).resolve().parent / "process"


@pytest.hookimpl(tryfirst=True)  # before -m selects: `pytest -m "not slow"` leaves them out
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start processes, build packages or read the image's files are ``slow``."""
    for item in items:
        if item.path.is_relative_to(PROCESS_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fresh_ball_tracking_state() -> Iterator[None]:
    """The ball tracker aggregates across devices in module state ("devices active in the last
    30 s"): a device from an earlier test in this process must not change a later test's results."""
    yield
    reset_state()


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Start real servers on 127.0.0.1 port 0; all are stopped after the test."""
    running: list[RunningServer] = []

    def start(pipeline: str | Pipeline = "examples.ball_tracking", **options: Any) -> RunningServer:
        loaded = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
        config = ServerConfig(pipeline=loaded.name, host="127.0.0.1", port=0, **options)
        server = serve(config, loaded)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop(grace=1.0)


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Write pipeline modules into a folder on sys.path; forget them after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str, folder: Path = tmp_path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return path

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a device certificate, and a rogue CA with its own device's."""
    root = tmp_path_factory.mktemp("pki")

    def write(name: str, blob: trustme.Blob) -> Path:
        path = root / name
        blob.write_to_path(str(path))
        return path

    ca, rogue = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    device = ca.issue_cert("device-7")
    impostor = rogue.issue_cert("device-7")
    return Pki(
        ca=write("ca.pem", ca.cert_pem),
        server_cert=write("server.pem", server.cert_chain_pems[0]),
        server_key=write("server.key", server.private_key_pem),
        device_cert=write("device.pem", device.cert_chain_pems[0]),
        device_key=write("device.key", device.private_key_pem),
        rogue_ca=write("rogue-ca.pem", rogue.cert_pem),
        rogue_cert=write("rogue.pem", impostor.cert_chain_pems[0]),
        rogue_key=write("rogue.key", impostor.private_key_pem),
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (skipped without one, except on CI)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()
