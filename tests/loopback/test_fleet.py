"""Several replicas: a device given a list of servers fails over to another one at once when its
stream breaks, resending the unanswered items there. Real servers on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload import (
    ClientConfig,
    ClientSecurity,
    GrpcTransport,
    LinkConfig,
    RunningServer,
    ServerConfig,
    ServerSecurity,
    load_pipeline,
    serve,
)
from offload._cloud.serve import HEALTH_MAX_BYTES
from offload._wire import METHOD
from tests.apps import tally

from ..helpers import ClientThread, Pki, free_port, run_split, wait_until

TALLY = "tests.apps.tally"


def start_device(server: str, frames: int, **config: Any) -> ClientThread:
    """A real client streaming ``frames`` tally items to ``server`` (a list of replicas)."""
    return ClientThread(TALLY, server, frames, local_tasks=1, **config)


def kill(server: RunningServer) -> None:
    """Cancel every stream at once, as a dead replica's would end (no drain, no grace)."""
    server.server.stop(None)


def test_a_broken_stream_fails_over_to_another_replica_and_resends_its_unanswered_items(
    start_server: Callable[..., RunningServer],
) -> None:
    replicas = [start_server(TALLY) for _ in range(3)]
    frames = 300
    hung = 60  # the replica serving the device blocks on this item: it is in flight when killed
    tally.hang_on_server(hung)
    try:
        # Held while no replica answers: an item that ran here would show in ran_locally.
        device = start_device(
            ",".join(f"127.0.0.1:{r.port}" for r in replicas),
            frames,
            link=LinkConfig(outage="hold-last"),
        )
        assert wait_until(lambda: any(r.servicer.active_streams for r in replicas), 30)
        assert wait_until(lambda: device.client.recorder.answers >= hung - 8, 30)
        serving = [r for r in replicas if r.servicer.active_streams]
        assert len(serving) == 1  # one stream, on one replica
        kill(serving[0])
    finally:
        tally.reset()  # the killed replica's hung item ends; its answer has nowhere to go
    lines = device.records()
    link = device.report["link"]
    assert device.report["error"] is None
    assert [line["item"] for line in lines] == list(range(frames))
    assert {line["status"] for line in lines} == {"completed"}
    assert link["ran_locally"] == 0 and link["disconnects"] >= 1 and link["resent"] >= 1
    # The replicas share tally's module state in this process: the aggregate saw every item, in
    # item order. (An item the killed replica ran but whose answer it never sent runs again on
    # the next: that it counts once is the shared state store's part, not the device's.)
    seen = [line["result"]["seen"] for line in lines]
    assert seen == sorted(set(seen)) and seen[-1] >= frames
    assert sum(r.servicer.active_streams for r in replicas) <= 1


def test_a_list_with_a_replica_down_from_the_start_streams_to_the_others(
    start_server: Callable[..., RunningServer],
) -> None:
    up = start_server(TALLY)
    down = start_server(TALLY)
    kill(down)
    device = start_device(
        f"127.0.0.1:{down.port},127.0.0.1:{up.port}", 50, link=LinkConfig(outage="hold-last")
    )
    lines = device.records()
    assert device.report["error"] is None
    assert [line["status"] for line in lines] == ["completed"] * 50
    assert device.report["link"]["ran_locally"] == 0


def test_a_dns_name_reaches_the_replica_behind_it(
    start_server: Callable[..., RunningServer],
) -> None:
    # localhost has records for 127.0.0.1 and, on most machines, ::1: the server binds only the
    # first, and the device uses whichever record answers.
    server = start_server(TALLY)
    device = start_device(f"dns:///localhost:{server.port}", 20)
    assert [line["status"] for line in device.records()] == ["completed"] * 20
    assert device.report["link"]["ran_locally"] == 0


def client_only(frames: int) -> list[dict[str, Any]]:
    tally.restart()
    lines, _ = run_split(load_pipeline(TALLY), None, frames=frames)
    return [json.loads(line) for line in lines]


def test_hold_last_keeps_items_while_no_server_answers_and_the_server_runs_the_last_task() -> None:
    frames = 30
    port = free_port()  # nothing listens there yet: the outage
    tally.restart()
    device = start_device(f"127.0.0.1:{port}", frames, link=LinkConfig(outage="hold-last"))
    link = device.client.link
    assert link is not None
    # Every item ran its tasks but the last here, and waits: nothing has ended.
    assert wait_until(lambda: link.stats.held == frames, 60)
    assert device.out.getvalue() == "" and device.client.recorder.finished_count == 0
    pipeline = load_pipeline(TALLY)
    server = serve(ServerConfig(pipeline=TALLY, host="127.0.0.1", port=port), pipeline)
    try:
        lines = device.records()
    finally:
        server.stop(1.0)
    assert device.report["error"] is None and device.report["link"]["ran_locally"] == 0
    # Sent at the last task's cut, each ran its last task once, on the server.
    assert [line["result"] for line in lines] == [line["result"] for line in client_only(frames)]


def test_a_device_streams_across_connection_age_goaways_and_every_item_is_answered_once(
    start_server: Callable[..., RunningServer],
) -> None:
    # A connection lives ~0.5 s (jitter +-10%), its stream 0.2 s more, then ends UNAVAILABLE.
    server = start_server(TALLY, max_connection_age=0.5, max_connection_age_grace=0.2)
    tally.restart()
    device = start_device(f"127.0.0.1:{server.port}", 10**6, link=LinkConfig(outage="hold-last"))
    link = device.client.link
    assert link is not None
    assert wait_until(lambda: link.stats.connects >= 4, 60)
    device.client.stop()
    lines = device.records()
    assert device.report["error"] is None
    assert device.report["link"]["ran_locally"] == 0 and device.report["link"]["disconnects"] >= 3
    assert {line["status"] for line in lines} == {"completed"}
    # One replica: each item ran its last task once (a resent one was replayed, not re-run).
    assert [line["result"]["seen"] for line in lines] == list(range(1, len(lines) + 1))


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_the_health_port_serves_grpc_health_alone_in_plaintext_beside_a_tls_listener(
    start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    security = ServerSecurity(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    server = start_server(TALLY, security=security, health_port=0)
    assert server.health_port is not None and server.health_port != server.port
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.health_port) == serving
    assert health_status(server.health_port, "offload.v1.Offload") == serving
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        method = channel.stream_stream(METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            list(method(iter([b""]), timeout=5))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # only health is served there
    # Stopping says NOT_SERVING on the health port while a stream drains (its item hangs, so
    # the drain lasts until the item is released), then closes the port.
    tally.hang_on_server(3)
    try:
        holder = start_device(
            f"127.0.0.1:{server.port}",
            10,
            security=device_tls(pki),
            link=LinkConfig(resend_grace=0.0),
        )
        assert wait_until(lambda: holder.client.recorder.answers == 3, 30)
        stopping = threading.Thread(target=server.stop, args=(30.0,))
        stopping.start()
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert wait_until(lambda: health_status(server.health_port or 0) == not_serving, 30)
    finally:
        tally.reset()
    stopping.join(30)
    assert not stopping.is_alive()
    with pytest.raises(grpc.RpcError):
        health_status(server.health_port)  # closed with the server
    holder.client.stop()
    holder.records()


def device_tls(pki: Pki) -> ClientSecurity:
    return ClientSecurity(tls_ca=str(pki.ca))


def test_a_list_of_replicas_speaks_tls_checked_against_the_first_address(
    start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    # The certificate names 127.0.0.1 (and localhost): gRPC alone would check the whole list.
    security = ServerSecurity(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    replicas = [start_server(TALLY, security=security) for _ in range(2)]
    device = start_device(
        ",".join(f"127.0.0.1:{r.port}" for r in replicas), 20, security=device_tls(pki)
    )
    assert [line["status"] for line in device.records()] == ["completed"] * 20
    assert device.report["link"]["ran_locally"] == 0 and device.report["error"] is None


def test_the_health_port_refuses_a_request_over_its_bound(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(TALLY, health_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        request = health_pb2.HealthCheckRequest(service="x" * HEALTH_MAX_BYTES)
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(server.health_port or 0) == health_pb2.HealthCheckResponse.SERVING


def test_the_health_port_holds_no_watch_open(start_server: Callable[..., RunningServer]) -> None:
    # A Watch is a call held open: enough of them would leave the probes none.
    server = start_server(TALLY, health_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(watch)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_devices_in_one_process_each_get_a_connection_of_their_own(
    start_server: Callable[..., RunningServer],
) -> None:
    # gRPC shares one connection among channels of identical settings unless told otherwise; the
    # server's streams-per-connection limit would then queue a gateway's (or a test's) devices.
    server = start_server(TALLY, streams_per_connection=1)
    config = ClientConfig(pipeline=TALLY, local_tasks=1, server=f"127.0.0.1:{server.port}")
    transports = [GrpcTransport.from_config(config) for _ in range(3)]
    stop = threading.Event()

    def quiet() -> Iterator[bytes]:  # headers, then nothing until the test ends
        stop.wait(30)
        yield from ()

    calls = [t.channel.stream_stream(METHOD)(quiet()) for t in transports]
    try:
        assert wait_until(lambda: server.servicer.active_streams == len(transports), 10)
    finally:
        stop.set()
        for call in calls:
            call.cancel()
        for t in transports:
            t.close()
