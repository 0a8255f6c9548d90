"""Hostile clients on loopback (issue 18): each test mounts one attack against a real server and
checks the bound that holds it, whatever the machine's speed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from offload import RunningServer, encode, load_pipeline
from offload._cloud.executor import MAX_ERROR_CHARS
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import install

KiB = 1024
MiB = 1024 * KiB


def _emit() -> tuple[bool, bytes]:
    return True, b""


def _echo_or_raise(data: bytes) -> tuple[bool, bytes]:
    """A careless task: its error echoes its whole input; otherwise it passes it on."""
    if data.startswith(b"!"):
        raise ValueError(data)
    return True, data


def _answer(data: bytes) -> tuple[bool, dict[str, Any]]:
    return True, {"data": data}


ECHOING = install("attack_echoing", tasks=[_emit, _echo_or_raise, _answer])


def echoing_state(data: bytes, item: int, run: str = "r") -> pb.TaskState:
    pipeline = load_pipeline(ECHOING)
    msg = pb.TaskState(
        pipeline=pipeline.name,
        fingerprint=pipeline.fingerprint,
        device_id="attacker",
        run_id=run,
        item=item,
        next_task=1,
    )
    msg.args.CopyFrom(encode(data))
    return msg


def send(port: int, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(pb_grpc.OffloadStub(channel).ExecuteRemaining(iter(states), timeout=60))


# --- item 3: remembered answers ---------------------------------------------------------------


def test_a_task_error_echoing_a_large_input_is_cut_and_remembered_small(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    items = 20
    answers = send(server.port, [echoing_state(b"!" * MiB, i) for i in range(items)])
    assert all(a.status == pb.ItemResult.FAILED for a in answers)
    assert all(len(a.error) < MAX_ERROR_CHARS + 100 for a in answers)
    assert answers[0].error.startswith("ValueError: b'!!!")
    assert "characters cut by the server" in answers[0].error
    # 20 MiB of input, ~4 kB remembered per item.
    assert server.servicer.executor.remembered_bytes < items * (MAX_ERROR_CHARS + 200)


def test_remembered_answers_are_bounded_in_bytes_within_a_run_and_over_all_runs(
    start_server: Callable[..., RunningServer],
) -> None:
    budget = 256 * KiB
    server = start_server(ECHOING, dedup_bytes=budget)
    executor = server.servicer.executor
    for run in ("r1", "r2", "r3"):
        # Each answer is ~64 KiB: 10 of them are 2.5 times the budget.
        states = [echoing_state(b"x" * (64 * KiB), i, run) for i in range(10)]
        assert all(a.status == pb.ItemResult.COMPLETED for a in send(server.port, states))
        assert 0 < executor.remembered_bytes <= budget
    # The newest answers are still replayed; the oldest ones of the same run were forgotten.
    resent = send(server.port, [echoing_state(b"x" * (64 * KiB), 9, "r3")])
    assert resent[0].duplicate and resent[0].status == pb.ItemResult.COMPLETED
    forgotten = send(server.port, [echoing_state(b"x" * (64 * KiB), 0, "r3")])
    assert forgotten[0].duplicate and forgotten[0].status == pb.ItemResult.FAILED
    assert "dedup_bytes=262144" in forgotten[0].error
