"""Keepalive: the settings of both sides agree, so pings never earn a too_many_pings GOAWAY."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    Keepalive,
    Limits,
    RunningServer,
    decode,
    load_pipeline,
)
from offload._cloud.serve import RECEIVE_WINDOW
from offload._device.emulation import LinkEmulator, LinkSpec
from offload._device.transport import client_options
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, state

ECHO = "tests.apps.echo"
FAST_CLIENT = ClientConfig(keepalive=Keepalive(time=1.0, timeout=2.0))
# Long enough for the strict server to count its 3 strikes (gRPC pings at most once a second).
IDLE_SECONDS = 7.0


def idle_stream(port: int) -> tuple[pb.ItemResult | None, grpc.RpcError | None]:
    """One item, a silence with pings flowing, one more item: the second answer or the error."""
    outbox: queue.SimpleQueue[pb.TaskState | None] = queue.SimpleQueue()

    def requests() -> Iterator[pb.TaskState]:
        while (item := outbox.get()) is not None:
            yield item

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options(FAST_CLIENT)) as ch:
        call = pb_grpc.OffloadStub(ch).ExecuteRemaining(requests(), timeout=30)
        try:
            outbox.put(state(0, 1, run_id=f"ka{port}"))
            next(call)
            # The silence is the point of the test: the link carries only keepalive pings.
            threading.Event().wait(IDLE_SECONDS)
            outbox.put(state(1, 2, run_id=f"ka{port}"))
            answer = next(call)
            outbox.put(None)
            return answer, None
        except grpc.RpcError as exc:
            return None, exc
        finally:
            outbox.put(None)


def test_pings_within_the_servers_policy_keep_the_stream_and_a_strict_server_refuses_them(
    start_server: Callable[..., RunningServer],
) -> None:
    tolerant = start_server(COUNTER, keepalive=Keepalive(time=1, timeout=2, min_ping_interval=0.25))
    # The control experiment: the same client against a server that accepts a ping only every
    # 30 s is sent GOAWAY too_many_pings, so this test would catch settings that disagree.
    strict = start_server(COUNTER, keepalive=Keepalive(time=30, timeout=2, min_ping_interval=30))
    outcomes: dict[str, tuple[pb.ItemResult | None, grpc.RpcError | None]] = {}
    runs = [
        threading.Thread(target=lambda n=name, s=server: outcomes.update({n: idle_stream(s.port)}))
        for name, server in (("tolerant", tolerant), ("strict", strict))
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    answer, error = outcomes["tolerant"]
    assert error is None, error
    assert answer is not None and decode(answer.output)["seen"] == 2
    _, error = outcomes["strict"]
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "too_many_pings" in (error.details() or "").lower().replace(" ", "_")


def test_the_default_keepalive_settings_agree() -> None:
    defaults = Keepalive()
    assert defaults.min_ping_interval <= defaults.time / 2


def test_a_slow_link_busy_with_a_window_of_large_items_keeps_its_stream(
    start_server: Callable[..., RunningServer],
) -> None:
    # Pings wait behind the data queued in the link: a window of 2 MB items queues 4 s of it
    # here, four times the ping timeout. The server's receive window bounds what the device may
    # have queued (RECEIVE_WINDOW: a quarter of the timeout at this link's rate), so a ping's
    # answer arrives in time however many items are in flight, and the stream is kept.
    keepalive = Keepalive(time=0.5, timeout=1.0, min_ping_interval=0.25)
    limits = Limits(max_message_bytes=4 * 2**20)
    server = start_server(ECHO, keepalive=keepalive, limits=limits)
    rate = 4 * RECEIVE_WINDOW / keepalive.timeout
    link = LinkEmulator(f"127.0.0.1:{server.port}", LinkSpec(rate, 0.02))
    items = 16
    pipeline = load_pipeline(ECHO)
    pipeline.set_source(",".join([str(int(rate / 2))] * items))
    config = ClientConfig(
        pipeline=ECHO,
        local_tasks=1,
        window=8,
        compression="none",
        keepalive=keepalive,
        limits=limits,
    )
    transport = GrpcTransport.from_config(config, link.target)
    try:
        report = Client(pipeline, config, transport, io.StringIO()).run()
    finally:
        transport.close()
        link.close()
    assert report["error"] is None
    assert report["link"]["disconnects"] == 0, report["link"]["events"]
    assert report["items"]["completed"] == items
