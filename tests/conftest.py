"""Shared fixtures: real gRPC servers on ephemeral loopback ports, pipelines, the webcam clip."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.ball_tracking import reset_state
from offload import ClientConfig, GrpcTransport, Pipeline, ServerConfig, load_pipeline, serve
from offload._cloud.serve import RunningServer
from offload._device.client import Client

ROOT = Path(__file__).resolve().parents[1]
WEBCAM_CLIP = ROOT.parent / "shared" / "data" / "ball_real_webcam.mp4"


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


def run_split(
    pipeline: Pipeline,
    local_tasks: int | None,
    port: int | None = None,
    source: str | None = None,
    **options: Any,
) -> tuple[list[str], dict[str, Any]]:
    """Run a client at a split against a server on ``port``; returns (output lines, report)."""
    if source is not None:
        pipeline.set_source(source)
    config = ClientConfig(
        pipeline=pipeline.name, local_tasks=local_tasks, device_id="test-device", **options
    )
    transport = None
    if local_tasks is not None and local_tasks < len(pipeline) and port is not None:
        transport = GrpcTransport.from_config(config, f"127.0.0.1:{port}")
    out = io.StringIO()
    try:
        report = Client(pipeline, config, transport, out).run()
    finally:
        if transport is not None:
            transport.close()
    return out.getvalue().splitlines(), report


def self_signed_certificate(directory: Path, name: str, *also: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (and ``also``: "IP:127.0.0.1", ...) and its key,
    made by the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
            *("-addext", "subjectAltName=" + ",".join([f"DNS:{name}", *also])),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
