"""A failure on the device's side of the link ends the run with one clear line, never a hang:
a full output disk, an answer the device cannot handle. Real servers on loopback."""

from __future__ import annotations

import errno
import io
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from offload import Client, ClientConfig, GrpcTransport, RunningServer, load_pipeline
from offload._device.ledger import Ledger
from offload._device.link import Pending
from offload.v1 import offload_pb2 as pb

from ..helpers import COUNTER

FRAMES = 100_000  # far more than any bounded run gets through: the failure must end it


class FullDisk(io.StringIO):
    """An output file whose disk fills up after ``lines`` lines."""

    name = "/mnt/full/results.jsonl"

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.left = lines

    def write(self, text: str) -> int:
        if self.left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= text.count("\n")
        return super().write(text)


def run_bounded(client: Client, timeout: float) -> dict[str, Any]:
    """``client.run()`` in a thread; fails the test if it has not ended within ``timeout``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = client.run()
        except BaseException as exc:
            outcome["raised"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        client.stop()
        if client.link is not None:
            client.link.abort("the test gave up")
        raise AssertionError(f"the run did not end within {timeout:.1f} s: it hangs")
    assert "raised" not in outcome, outcome.get("raised")
    report: dict[str, Any] = outcome["report"]
    return report


def item_seconds(server: RunningServer, config: ClientConfig) -> float:
    """Seconds per item of an honest run of 20 items against ``server``."""
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{server.port}")
    began = time.perf_counter()
    try:
        report = Client(load_pipeline(COUNTER), config, transport, io.StringIO()).run()
    finally:
        transport.close()
    assert report["error"] is None
    return (time.perf_counter() - began) / 20


def bound(per_item: float, items: int) -> float:
    # Generous against a loaded machine, yet far below the FRAMES the run was asked for.
    return 10.0 + 50 * per_item * items


def run_until_it_fails(
    server: RunningServer, make: type[Client], ends_after: int, output: IO[str] | None = None
) -> dict[str, Any]:
    """Run ``make`` for FRAMES items against ``server``, bounded by the time of ``ends_after``
    items (measured first) plus a window: the failure must end the run long before FRAMES."""
    per_item = item_seconds(server, ClientConfig(pipeline=COUNTER, local_tasks=1, frames=20))
    config = ClientConfig(pipeline=COUNTER, local_tasks=1, frames=FRAMES)
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{server.port}")
    try:
        client = make(load_pipeline(COUNTER), config, transport, output)
        return run_bounded(client, bound(per_item, ends_after + config.window))
    finally:
        transport.close()


def test_a_full_output_disk_ends_the_run_with_an_error_naming_the_file(
    start_server: Callable[..., RunningServer],
) -> None:
    output = FullDisk(lines=5)
    report = run_until_it_fails(start_server(COUNTER), Client, 5, output)
    error = report["error"]
    assert error is not None and "\n" not in error
    assert "--output /mnt/full/results.jsonl" in error and "No space left on device" in error
    assert report["items"]["captured"] < FRAMES
    assert output.getvalue().count("\n") == 5


class BrokenLedger(Ledger):
    """Handling the third answer raises what no OffloadError covers (a bug, NumPy...)."""

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None:
        if answer.item == 2:
            raise RuntimeError("cannot handle this answer")
        super().answered(pending, answer, size)


class BrokenClient(Client):
    ledger_class = BrokenLedger


def test_an_answer_the_device_fails_to_handle_ends_the_run_with_an_error(
    start_server: Callable[..., RunningServer],
) -> None:
    report = run_until_it_fails(start_server(COUNTER), BrokenClient, 3)
    error = report["error"]
    assert error is not None and "\n" not in error
    assert "RuntimeError: cannot handle this answer" in error
    assert report["items"]["captured"] < FRAMES
