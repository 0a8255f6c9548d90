"""What operators see: Prometheus metrics, reflection, the health check CLI, logfmt lines, and
every server option settable from the environment. Real servers on loopback, real clients."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from offload import RunningServer, decode, load_pipeline
from offload._cloud.metrics import ServerMetrics, StreamMetrics
from offload._cloud.serve import SERVICE_NAME
from offload._env import env_name, option_actions
from offload.healthcheck import main as healthcheck
from offload.server import build_parser
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, ROOT, self_signed_certificate, spawn_server, state

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the real /metrics endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metered(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(COUNTER, metrics_port=0, metrics_max_devices=2)


def test_metrics_count_items_bytes_times_and_fold_extra_devices(metered: RunningServer) -> None:
    assert metered.metrics_port is not None
    sent: list[pb.TaskState] = []
    answers: list[pb.ItemResult] = []
    with grpc.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        # Three devices, a cap of two labels: the third is counted as "other". The counter
        # pipeline fails values that are multiples of 5 (item 4 of each device, value 5).
        for device in ["pi-1", "pi-2", "pi-3"]:
            states = [state(i, i + 1, device=device, run_id="m") for i in range(6)]
            sent += states
            answers += stub.ExecuteRemaining(iter(states), timeout=10)
    samples = scrape(metered.metrics_port)
    for label in ["pi-1", "pi-2", "other"]:
        assert metric(samples, "offload_items_total", device=label, status="completed") == 5
        assert metric(samples, "offload_items_total", device=label, status="failed") == 1
    assert not any(dict(labels).get("device") == "pi-3" for _, labels in samples)
    # Bytes are exactly the messages' sizes on the wire.
    assert metric(samples, "offload_received_bytes_total") == sum(s.ByteSize() for s in sent)
    assert metric(samples, "offload_sent_bytes_total") == sum(a.ByteSize() for a in answers)
    # Per-task histogram: task 1 ran for all 18 items, task 2 only for the 15 that passed it.
    assert metric(samples, "offload_task_seconds_count", task="1", name="check") == 18
    assert metric(samples, "offload_task_seconds_count", task="2", name="count") == 15
    assert metric(samples, "offload_task_seconds_sum", task="2", name="count") > 0
    assert metric(samples, "offload_item_cpu_seconds_count") == 18
    cpu = sum(a.server_cpu_seconds for a in answers)
    assert metric(samples, "offload_item_cpu_seconds_sum") == pytest.approx(cpu)
    assert metric(samples, "offload_active_streams") == 0


def test_active_streams_counts_open_streams(metered: RunningServer) -> None:
    assert metered.metrics_port is not None
    outbox: list[pb.TaskState] = [state(0, 1, run_id="open")]
    more = threading.Event()

    def requests() -> Iterator[pb.TaskState]:
        yield outbox[0]
        more.wait(10)  # keep the stream open until the test has looked

    with grpc.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        call = pb_grpc.OffloadStub(channel).ExecuteRemaining(requests(), timeout=20)
        first = next(call)  # the server has answered: the stream is open on its side
        assert first.status == pb.ItemResult.COMPLETED
        assert metric(scrape(metered.metrics_port), "offload_active_streams") == 1
        more.set()
        assert list(call) == []
    assert metric(scrape(metered.metrics_port), "offload_active_streams") == 0


def test_stream_metrics_count_raw_bytes_of_a_generic_handler() -> None:
    """The interceptor does not depend on how the service is registered: a handler that takes
    its requests as raw bytes (no deserializer) is measured the same way."""
    metrics = ServerMetrics(load_pipeline(COUNTER))

    def echo(requests: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[pb.ItemResult]:
        for raw in requests:
            yield pb.ItemResult(item=pb.TaskState.FromString(raw).item)

    handler = grpc.stream_stream_rpc_method_handler(
        echo, request_deserializer=None, response_serializer=pb.ItemResult.SerializeToString
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[StreamMetrics(metrics)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE_NAME, {"ExecuteRemaining": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        states = [state(i, i + 1, run_id="raw") for i in range(3)]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers = list(pb_grpc.OffloadStub(channel).ExecuteRemaining(iter(states), timeout=10))
    finally:
        server.stop(None)
    assert [a.item for a in answers] == [0, 1, 2]
    value = metrics.registry.get_sample_value
    assert value("offload_received_bytes_total") == sum(s.ByteSize() for s in states)
    assert value("offload_sent_bytes_total") == sum(a.ByteSize() for a in answers)
    assert value("offload_active_streams") == 0


def test_a_replayed_answer_is_counted_but_its_work_is_not(metered: RunningServer) -> None:
    assert metered.metrics_port is not None
    with grpc.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        list(stub.ExecuteRemaining(iter([state(0, 1, run_id="re")]), timeout=10))
        again = list(stub.ExecuteRemaining(iter([state(0, 1, run_id="re")]), timeout=10))
    assert again[0].duplicate
    samples = scrape(metered.metrics_port)
    assert metric(samples, "offload_items_total", device="d1", status="completed") == 2
    assert metric(samples, "offload_item_cpu_seconds_count") == 1


def test_metrics_endpoint_closes_with_the_server(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER, metrics_port=0)
    assert server.metrics_port is not None
    scrape(server.metrics_port)
    server.stop(grace=0.5)
    with pytest.raises(OSError):
        scrape(server.metrics_port)


def test_without_metrics_port_there_is_no_endpoint(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    assert server.metrics is None and server.metrics_port is None


def reflection_services(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
    return sorted(s.name for s in response.list_services_response.service)


def test_reflection_lists_the_services_and_describes_the_schema(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    assert reflection_services(server.port) == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "offload.v1.Offload",
    ]
    # What grpcurl does: rebuild the schema from the server alone, without the .proto.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("offload.v1.Offload").methods_by_name["ExecuteRemaining"]
        assert method.input_type.full_name == "offload.v1.TaskState"
        assert method.output_type.full_name == "offload.v1.ItemResult"
        assert method.client_streaming and method.server_streaming
        array = pool.FindMessageTypeByName("offload.v1.NDArray")
        assert [f.name for f in array.fields] == ["dtype", "shape", "data", "scalar"]


def test_no_reflection_turns_it_off(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(COUNTER, reflection=False)
    with pytest.raises(grpc.RpcError) as err:
        reflection_services(server.port)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The service itself still answers.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        (answer,) = stub.ExecuteRemaining(iter([state(0, 1, run_id="nr")]), timeout=10)
    assert decode(answer.output)["seen"] == 1


def test_healthcheck_exits_0_when_serving_and_1_otherwise(
    start_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(COUNTER)
    env = {"OFFLOAD_HOST": "0.0.0.0", "OFFLOAD_PORT": str(server.port)}
    assert healthcheck([], env) == 0
    assert f"127.0.0.1:{server.port} offload.v1.Offload: SERVING" in capsys.readouterr().out
    server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck([], env) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert healthcheck(["--service", "no.such.Service"], env) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    server.stop(grace=0.5)
    assert healthcheck(["--timeout", "1"], env) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def tls_health_server(cert: Path, key: Path) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def test_healthcheck_over_tls_trusts_the_servers_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = self_signed_certificate(tmp_path, "offload.test")
    server, port = tls_health_server(cert, key)
    try:
        # As in the container: the server's own certificate (OFFLOAD_TLS_CERT) is the trust root.
        env = {"OFFLOAD_PORT": str(port), "OFFLOAD_TLS_CERT": str(cert)}
        named = {**env, "OFFLOAD_HEALTHCHECK_TLS_SERVER_NAME": "offload.test"}
        assert healthcheck([], named) == 0, capsys.readouterr().err
        # The certificate does not name 127.0.0.1: without the name, verification fails.
        assert healthcheck(["--timeout", "2"], env) == 1
        # And a plaintext check of a TLS port fails rather than passing by accident.
        assert healthcheck(["--timeout", "2"], {"OFFLOAD_PORT": str(port)}) == 1
    finally:
        server.stop(None)
    # The deployment guide's certificate names 127.0.0.1 too: then nothing else is needed.
    cert, key = self_signed_certificate(tmp_path, "guide.test", "IP:127.0.0.1")
    server, port = tls_health_server(cert, key)
    try:
        assert healthcheck([], {"OFFLOAD_PORT": str(port), "OFFLOAD_TLS_CERT": str(cert)}) == 0
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--timeout", "-1"], "--timeout -1.0: give a positive number of seconds"),
        (["--timeout", "nan"], "--timeout nan: give a positive number of seconds"),
        (["--tls-ca", "/no/such.pem"], "--tls-ca /no/such.pem: cannot read it"),
        (["--tls-ca", "{key}"], "--tls-ca {key} holds no usable CA certificate"),
        (["--tls-ca", "{cert}", "--tls-cert", "{key}", "--tls-key", "{cert}"], "swapped?"),
    ],
)
def test_healthcheck_option_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    cert, key = self_signed_certificate(tmp_path, "offload.test")
    paths = {"cert": str(cert), "key": str(key)}
    result = subprocess.run(
        [sys.executable, "-m", "offload.healthcheck", *(a.format(**paths) for a in args)],
        env={**ENV, "OFFLOAD_PORT": "1"},  # nothing listens there: the options fail first
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert not any(re.match(r"[EW]\d{4} ", line) for line in result.stderr.splitlines())  # gRPC
    assert expected.format(**paths) in result.stderr.splitlines()[-1]


def option_sample(action: argparse.Action) -> tuple[str, object]:
    """A value for the option's variable that differs from its default, and what it parses to."""
    if action.nargs == 0:  # a flag: the variable holds the opposite of the default setting
        return ("0", False) if action.default else ("1", True)
    if action.choices:
        choice = next(c for c in action.choices if c != action.default)
        return str(choice), choice
    if action.type is int:
        return "4321", 4321
    if action.type is float:
        return "2.5", 2.5
    return "env-value", "env-value"


def test_every_server_option_is_settable_from_the_environment() -> None:
    actions = option_actions(build_parser({}))
    assert len(actions) >= 10
    for action in actions:
        if action.dest == "print_fingerprint":
            continue
        raw, expected = option_sample(action)
        name = env_name(action)
        args = build_parser({name: raw}).parse_args([])
        assert getattr(args, action.dest) == expected, name
        assert f"[env {name}]" in (action.help or "")
    # The command line still wins over the environment.
    assert build_parser({"OFFLOAD_PORT": "1"}).parse_args(["--port", "2"]).port == 2
    assert build_parser({"OFFLOAD_REFLECTION": "0"}).parse_args([]).reflection is False


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OFFLOAD_PORT", "http", "OFFLOAD_PORT='http' is not a valid value for --port"),
        ("OFFLOAD_REFLECTION", "maybe", "OFFLOAD_REFLECTION='maybe': use 1/true/yes/on"),
        ("OFFLOAD_LOG_LEVEL", "chatty", "OFFLOAD_LOG_LEVEL='chatty': choose from DEBUG"),
        ("OFFLOAD_METRICS_PORT", "70000", "--metrics-port 70000 is not a port"),
    ],
)
def test_a_bad_environment_value_is_a_clear_error(variable: str, value: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "offload.server"],
        env={**ENV, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_print_fingerprint_matches_the_loaded_pipeline() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "offload.server", "--print-fingerprint", "--pipeline", COUNTER],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == load_pipeline(COUNTER).fingerprint


LOGFMT_FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?:\s+|$)')


def logfmt(line: str) -> dict[str, str]:
    """Split a logfmt line into fields; fail if any part of it is not a key=value field."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = LOGFMT_FIELD.match(line, position)
        assert match, f"not key=value at {line[position:]!r} in {line!r}"
        key, value = match.groups()
        fields[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields


def test_server_logs_one_logfmt_line_per_event() -> None:
    server = spawn_server(pipeline=COUNTER, relay_log=False)
    process, port = server.process, server.port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.OffloadStub(channel)
            device = 'kitchen pi "2"'  # spaces and quotes must not break the fields
            list(stub.ExecuteRemaining(iter([state(0, 1, device=device)]), timeout=10))
            with pytest.raises(grpc.RpcError):
                list(stub.ExecuteRemaining(iter([state(0, 1, fingerprint="x")]), timeout=10))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    lines = [logfmt(line) for line in stderr.splitlines()]
    assert all({"ts", "level", "logger", "event"} <= set(f) for f in lines), stderr
    events = [f["event"] for f in lines]
    for event in ["start", "connect", "disconnect", "reject", "stopping", "stopped"]:
        assert event in events, stderr
    connect = next(f for f in lines if f["event"] == "connect")
    assert connect["device"] == device
    reject = next(f for f in lines if f["event"] == "reject")
    assert reject["code"] == "FAILED_PRECONDITION"
    assert reject["reason"].startswith("pipeline mismatch: the item is for")


def test_the_deployment_guide_names_every_server_variable() -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    missing = [
        env_name(a)
        for a in option_actions(build_parser({}))
        if a.dest not in {"print_fingerprint", "announce"} and env_name(a) not in guide
    ]
    assert missing == [], "document these in docs/deployment.md"
