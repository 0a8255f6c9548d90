"""What several test modules share, other than fixtures (those are in conftest.py): paths, client
runs, wire messages for the counter pipeline, command lines, certificates and comparisons."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    ItemContext,
    Pipeline,
    encode,
    load_pipeline,
)
from offload._device.embedded import EmbeddedServer
from offload._pipeline import Outcome, run_tasks
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
WEBCAM_CLIP = ROOT.parent / "shared" / "data" / "ball_real_webcam.mp4"
COUNTER = "tests.apps.counter"
CTX = ItemContext("dev", "run", 7, 123.0, on_server=False)
GOOD_TASKS = """
def capture():
    return True, 1


def keep(x):
    return True, x
"""  # the source of two valid tasks, for pipeline modules written by a test

# The tests' own environment must not configure the clients they start.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")},
    "PYTHONPATH": str(ROOT),
}


class ClientThread:
    """A real client (gRPC transport, --output in memory) running in a thread of the test.

    ``server`` is a port on loopback or a target as --server takes it (a list of replicas, dns:).
    """

    def __init__(
        self,
        pipeline: str,
        server: int | str,
        frames: int,
        local_tasks: int = 3,
        client_class: type[Client] = Client,
        **config: Any,
    ) -> None:
        self.pipeline = load_pipeline(pipeline)
        if hasattr(self.pipeline.module, "set_source"):
            self.pipeline.set_source("synthetic")
        target = f"127.0.0.1:{server}" if isinstance(server, int) else server
        self.config = ClientConfig(
            pipeline=pipeline, local_tasks=local_tasks, frames=frames, server=target, **config
        )
        self.transport = GrpcTransport.from_config(self.config)
        self.out = io.StringIO()
        self.client = client_class(self.pipeline, self.config, self.transport, self.out)
        self.report: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = self.client.run()
        finally:
            self.transport.close()

    @property
    def finished(self) -> int:
        return self.client.recorder.finished_count

    def join(self, timeout: float = 120) -> tuple[list[str], dict[str, Any]]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the client did not finish"
        return self.out.getvalue().splitlines(), self.report

    def records(self, timeout: float = 120) -> list[dict[str, Any]]:
        """The --output lines, parsed, once the run has ended."""
        return [json.loads(line) for line in self.join(timeout)[0]]


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


def context(item: int, device: str = "dev-a", run: str = "run-1", at: float = 0.0) -> ItemContext:
    return ItemContext(device_id=device, run_id=run, item=item, capture_time=at, on_server=False)


def run_all(pipeline: Pipeline, item: int, **kw: Any) -> Outcome:
    """One item through all the tasks, exactly as the framework runs them."""
    return run_tasks(pipeline, 0, len(pipeline), None, context(item, **kw))


def install(name: str, **attrs: Any) -> str:
    """A pipeline module made of ``attrs`` (``tasks=[...]``), importable as ``name``."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return name


def state(
    item: int, value: Any, next_task: int = 1, device: str = "d1", **fields: Any
) -> pb.TaskState:
    """A TaskState for the counter pipeline; ``fields`` override or add message fields."""
    pipeline = load_pipeline(COUNTER)
    msg = pb.TaskState(
        pipeline=fields.pop("pipeline", pipeline.name),
        fingerprint=fields.pop("fingerprint", pipeline.fingerprint),
        device_id=device,
        run_id=fields.pop("run_id", "r1"),
        item=item,
        next_task=next_task,
        **fields,
    )
    msg.args.CopyFrom(encode(value))
    return msg


def exchange(stub: pb_grpc.OffloadStub, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    return list(stub.ExecuteRemaining(iter(states), timeout=10))


def assert_same(a: Any, b: Any) -> None:
    """Equal values of the same types all the way down (arrays: dtype, shape; NaN equals NaN)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and (a == b or (np.isnan(a) and np.isnan(b)))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):  # NaN equals nothing, itself included
        assert math.isnan(b)
    else:
        assert a == b


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offload(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m *args`` from the repository, in the tests' environment (``ENV``)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_server(
    *options: str,
    pipeline: str | None = None,
    port: int = 0,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    relay_log: bool = True,
) -> EmbeddedServer:
    """``python -m offload.server --host 127.0.0.1 --port PORT --announce *options`` in the tests'
    environment (``ENV``), once it has announced its port. ``relay_log=False``: its stderr is
    left in ``.process.stderr`` for the test to read."""
    return EmbeddedServer(
        pipeline,
        options=options,
        port=port,
        env={**ENV, **(env or {})},
        cwd=cwd,
        relay_log=relay_log,
        startup_timeout=60,
    )


def cli_output(tmp_path: Path, name: str, *args: str) -> list[str]:
    """The output lines of ``python -m offload.client *args``, which must succeed."""
    out = tmp_path / f"{name}.jsonl"
    result = offload("offload.client", "--output", str(out), "--device-id", "cli", *args)
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines()


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


@dataclass
class Pki:
    """The files of the ``pki`` fixture (conftest.py)."""

    ca: Path
    server_cert: Path
    server_key: Path
    device_cert: Path  # names "device-7"
    device_key: Path
    rogue_ca: Path  # a CA the server does not trust...
    rogue_cert: Path  # ...and a certificate it signed for "device-7"
    rogue_key: Path


class RedisServer:
    """A real ``redis-server`` on a free loopback port, its files in ``directory``; restartable
    on the same port with its data (append-only file, fsync always)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            reason = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason}: .ci/run installs it on CI")
            pytest.skip(f"{reason}; CI runs these tests")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis  # noqa: PLC0415  (the server extra)

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--protected-mode", "no", "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            ready = wait_until(lambda: _answers(client), 30)
        finally:
            client.close()
        assert ready, (self.directory / "redis.log").read_text()

    def client(self) -> Any:
        import redis  # noqa: PLC0415

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the append-only file is complete)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _answers(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # not up yet (refused) or still loading its data
        return False


class Relay:
    """A TCP relay in front of server ports, as a Service is: each new connection goes to the
    first target that accepts it; when that target dies, its connections are cut (the device
    reconnects, and lands on the next live target)."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = list(targets)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._open: list[tuple[int, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = None
            for target in list(self.targets):
                with contextlib.suppress(OSError):
                    upstream = socket.create_connection(("127.0.0.1", target), timeout=1)
                    upstream.settimeout(None)
                    break
            if upstream is None:
                client.close()
                continue
            with self._lock:
                self._open += [(target, client), (target, upstream)]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def cut(self, target: int) -> None:
        """End the connections to ``target`` (a balancer dropping an endpoint that failed)."""
        with self._lock:
            cut = [s for t, s in self._open if t == target]
            self._open = [(t, s) for t, s in self._open if t != target]
        for s in cut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for s in (sink, source):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def documented_block(heading: str, language: str = "sh") -> str:
    """The first ``language`` code block under docs/clients.md's ``## heading``."""
    section = (ROOT / "docs" / "clients.md").read_text().split(f"\n## {heading}", 1)[1]
    block = re.search(rf"```{language}\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    assert block is not None, f"docs/clients.md: no {language} block under ## {heading}"
    return block.group(1)


def run_documented(
    script: str, port: int, cwd: Path, timeout: float, path: Sequence[str] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """A documented shell script, run as written with ``bash -e``, ``python`` this venv's (as
    once activated), the directories ``path`` first on PATH and ``env`` added; the test's server
    on ``port`` stands for the docs' on 50051 and for their `python -m offload.server &` line."""
    script = re.sub(r"^python -m offload\.server &.*\n", "", script, flags=re.M)
    script = script.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    search = os.pathsep.join([*path, str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env={**os.environ, "PATH": search, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
