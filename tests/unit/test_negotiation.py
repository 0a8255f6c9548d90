"""Packed lists and compression cross the cut only to a peer that said it reads them."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from offload import Client, ClientConfig, Limits, ServerConfig, load_pipeline
from offload.testing import InProcessTransport, RemoteExecutor
from offload.v1 import offload_pb2 as pb

MASK = "tests.apps.mask"
FRAMES = 12


def kinds(value: pb.Value) -> set[str]:
    """Every kind anywhere in ``value``."""
    kind = value.WhichOneof("kind") or "none"
    found: set[str] = {kind}
    if kind in ("list_value", "tuple_value"):
        for item in getattr(value, kind).items:
            found |= kinds(item)
    elif kind == "map_value":
        for entry in value.map_value.entries:
            found |= kinds(entry.value)
    return found


class Seen:
    """What crossed the cut each way, item by item."""

    def __init__(self, executor: RemoteExecutor) -> None:
        self.args: list[set[str]] = []
        self.outputs: list[set[str]] = []
        executor.add_listener(self.note)

    def note(self, state: pb.TaskState, answer: pb.ItemResult) -> None:
        self.args.append(kinds(state.args))
        self.outputs.append(kinds(answer.output))


class OlderServer(RemoteExecutor):
    """A server from before negotiation: its answers say nothing of what it reads."""

    def execute(self, state: pb.TaskState) -> pb.ItemResult:
        result = super().execute(state)
        result.ClearField("accepts")
        return result


def run(
    executor: RemoteExecutor, compression: str = "auto", split: int = 1
) -> tuple[list[str], dict[str, Any]]:
    pipeline = executor.pipeline
    config = ClientConfig(
        pipeline=pipeline.name, local_tasks=split, frames=FRAMES, compression=compression
    )
    out = io.StringIO()
    report = Client(pipeline, config, InProcessTransport(executor), out).run()
    assert report["error"] is None
    return out.getvalue().splitlines(), report


def client_only() -> list[str]:
    pipeline = load_pipeline(MASK)
    out = io.StringIO()
    Client(pipeline, ClientConfig(pipeline=MASK, frames=FRAMES), None, out).run()
    return out.getvalue().splitlines()


@pytest.mark.parametrize("compression", ["zstd", "lz4", "auto"])
def test_the_device_compresses_once_the_server_said_it_reads_it_and_results_are_unchanged(
    compression: str,
) -> None:
    executor = RemoteExecutor(load_pipeline(MASK))
    seen = Seen(executor)
    lines, report = run(executor, compression)
    assert lines == client_only()
    # Until the first answer the device cannot know what the server reads: those go plain (a
    # window's worth, and the one encoded while waiting for a credit, at most).
    first = next(i for i, k in enumerate(seen.args) if "compressed" in k)
    assert 1 <= first <= ClientConfig().window + 1
    assert all("compressed" in k for k in seen.args[first:])
    assert all("compressed" not in k for k in seen.args[:first])
    codec = "zstd" if compression == "auto" else compression
    assert report["compression"]["codecs"][codec]["items"] == FRAMES - first
    assert report["compression"]["codecs"][codec]["ratio"] > 10
    # The device said it reads both: its answers come packed and compressed.
    assert all("compressed" in k for k in seen.outputs)


def test_with_compression_none_nothing_is_compressed_on_the_way_up() -> None:
    executor = RemoteExecutor(load_pipeline(MASK))
    seen = Seen(executor)
    lines, report = run(executor, "none")
    assert lines == client_only()
    assert not any("compressed" in k for k in seen.args)
    assert report["compression"]["codecs"] == {}


def test_a_server_that_does_not_compress_answers_packs_them_for_a_device_that_reads_it() -> None:
    executor = RemoteExecutor(load_pipeline(MASK), ServerConfig(pipeline=MASK, compression="none"))
    seen = Seen(executor)
    lines, _ = run(executor, split=2)
    assert lines == client_only()
    assert all("packed_list" in k and "compressed" not in k for k in seen.outputs)


def test_a_server_that_says_nothing_of_what_it_reads_is_sent_only_plain_values() -> None:
    executor = OlderServer(load_pipeline(MASK))
    seen = Seen(executor)
    lines, report = run(executor, "zstd", split=2)
    assert lines == client_only()
    assert len(seen.args) == FRAMES
    assert not any(k & {"compressed", "packed_list"} for k in seen.args)
    assert report["compression"]["codecs"] == {}


def test_an_item_over_the_limit_is_refused_on_the_device_even_if_it_would_compress_below_it() -> (
    None
):
    limits = Limits(max_message_bytes=65536)
    pipeline = load_pipeline("tests.apps.echo")
    # Two small items; with one in flight, the third is encoded after the first answer said
    # what the server reads. Then 70 kB of one byte: 300 bytes in zstd.
    pipeline.set_source(",".join(["100", "100"] + ["70000"] * FRAMES))
    executor = RemoteExecutor(pipeline, ServerConfig(pipeline=pipeline.name, limits=limits))
    config = ClientConfig(pipeline=pipeline.name, local_tasks=1, limits=limits, window=1)
    out = io.StringIO()
    report = Client(pipeline, config, InProcessTransport(executor), out).run()
    assert report["error"] is None  # the server was never sent what it would refuse
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["status"] for line in lines] == ["completed"] * 2 + ["failed"] * FRAMES
    assert all("more than --max-message-bytes 65536" in line["error"] for line in lines[2:])
