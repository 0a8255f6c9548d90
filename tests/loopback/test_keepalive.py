"""Keepalive: the settings of both sides agree, so pings never earn a too_many_pings GOAWAY."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from offload import ClientConfig, Keepalive, RunningServer, decode
from offload._device.transport import client_options
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, state

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
