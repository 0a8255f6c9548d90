"""Faults: the server is away at start, dies mid-stream, stops answering, or the link drops.

Every captured item must end exactly once. Results are compared with an undisturbed run on a
pipeline whose last task is stateless (``tests.apps.ball_stateless``); a stateful aggregate is
checked for exactly-once counting where that is possible: while the server process survives.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    Keepalive,
    LinkConfig,
    Pipeline,
    RunningServer,
    ServerConfig,
    current_item,
    load_pipeline,
    serve,
)
from offload._device.embedded import EmbeddedServer
from offload._device.emulation import LinkEmulator, LinkSpec
from offload._device.ledger import Ledger
from offload._device.link import Pending
from offload._pipeline import fingerprint
from tests.apps import gate, tally

from ..helpers import ClientThread, Relay, free_port, run_split, spawn_server, wait_until

STATELESS = "tests.apps.ball_stateless"


@pytest.fixture
def server_processes() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python -m offload.server`` processes on a given loopback port."""
    started: list[EmbeddedServer] = []

    def start(port: int, pipeline: str = STATELESS) -> subprocess.Popen[str]:
        started.append(spawn_server("--log-level", "WARNING", pipeline=pipeline, port=port))
        return started[-1].process

    yield start
    for server in started:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.stop()


def reference(frames: int) -> list[str]:
    """The undisturbed run: client-only, every task on the device."""
    pipeline = load_pipeline(STATELESS)
    lines, _ = run_split(pipeline, None, source="synthetic", frames=frames)
    return lines


def assert_each_item_once(lines: list[str], frames: int) -> None:
    assert [json.loads(line)["item"] for line in lines] == list(range(frames))


def test_unreachable_at_start_runs_here_then_returns_to_the_split(
    server_processes: Callable[..., subprocess.Popen[str]],
) -> None:
    port = free_port()  # nothing listens there yet
    # As many frames as it takes: the run ends once the server has answered 20 items, however
    # long the server takes to start and the client to reconnect on this machine.
    run = ClientThread(STATELESS, port, 1_000_000, connect_timeout=0.2)
    assert wait_until(lambda: run.finished >= 20, 60)
    server_processes(port)
    assert wait_until(lambda: run.client.recorder.answers >= 20, 60)
    run.client.stop()
    lines, report = run.join()
    assert lines == reference(len(lines))
    link = report["link"]
    assert link["ran_locally"] >= 20  # run here while the server was away
    assert link["connects"] == 1 and report["error"] is None
    # Back to the configured split: later items ran tasks 3-6 on the server.
    assert all(t["server_runs"] > 0 for t in report["tasks"][3:])
    assert report["tasks"][2]["server_runs"] == 0


@pytest.mark.parametrize(
    ("signum", "resend_grace", "workers"),
    [
        (signal.SIGKILL, 5.0, 1),
        (signal.SIGKILL, 0.0, 1),
        (signal.SIGTERM, 5.0, 1),
        (signal.SIGKILL, 0.0, 2),
    ],
    ids=["sigkill-resend", "sigkill-run-here", "sigterm-resend", "sigkill-run-here-2-workers"],
)
def test_a_server_dying_mid_stream_loses_and_duplicates_nothing(
    server_processes: Callable[..., subprocess.Popen[str]],
    signum: signal.Signals,
    resend_grace: float,
    workers: int,
) -> None:
    frames = 300
    expected = reference(frames)
    port = free_port()
    first = server_processes(port)
    run = ClientThread(
        STATELESS,
        port,
        frames,
        link=LinkConfig(resend_grace=resend_grace),
        device_workers=workers,
    )
    assert wait_until(lambda: run.finished >= 40, 60)
    first.send_signal(signum)
    assert first.wait(15) == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
    server_processes(port)  # a replacement on the same address
    lines, report = run.join()
    assert_each_item_once(lines, frames)
    assert lines == expected  # same items, same results, no gaps, no duplicates
    link = report["link"]
    # Whether the unanswered items were resent to the replacement or run here depends on how
    # fast it starts; either way each ended once, with the undisturbed result.
    assert link["disconnects"] >= 1 and link["resent"] + link["ran_locally"] >= 1
    assert report["error"] is None
    assert report["items"]["failed"] == 0 and report["items"]["dropped"] == 0


class RunHereLedger(Ledger):
    """A ledger that notes when each item it ran here was captured and when it ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ran_here: list[tuple[float, float]] = []  # (captured, ended), perf_counter

    def run_locally(self, pending: Pending) -> None:
        super().run_locally(pending)
        self.ran_here.append((pending.began, time.perf_counter()))


class RunHereTimes(Client):
    """A client that notes when each item it ran here was captured and when it ended."""

    ledger_class = RunHereLedger

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.ledger, RunHereLedger)
        self.ran_here = self.ledger.ran_here


def test_new_items_run_here_at_once_while_unanswered_ones_wait_for_their_resend(
    server_processes: Callable[..., subprocess.Popen[str]],
) -> None:
    # A server SIGSTOPped until the window is full of unanswered items, then SIGKILLed: those
    # items wait --resend-grace for a reconnect, but items captured after the kill must not
    # wait behind them (they did: the local worker kept item order, so every new item waited
    # out the grace). A new item waits at most for the few queued ahead of it in the buffer.
    frames = 40
    _, alone = run_split(load_pipeline(STATELESS), None, source="synthetic", frames=frames)
    item_seconds = alone["elapsed_seconds"] / frames  # every task, on this machine now
    window, buffer = 2, 4
    prompt = 5 * (buffer + 2) * item_seconds  # the queue ahead, with room for a loaded machine
    grace = 4 * prompt
    port = free_port()
    server = server_processes(port)
    run = ClientThread(
        STATELESS,
        port,
        100_000,
        client_class=RunHereTimes,
        window=window,
        link=LinkConfig(buffer=buffer, resend_grace=grace, item_timeout=10 * grace),
    )
    client = run.client
    assert isinstance(client, RunHereTimes) and client.link is not None
    link = client.link
    assert wait_until(lambda: run.finished >= 10, 60)
    server.send_signal(signal.SIGSTOP)

    def unanswered() -> int:
        with link._lock:
            return sum(p.state == "sent" for p in link._pending.values())

    assert wait_until(lambda: unanswered() == window, 30)
    killed = time.perf_counter()
    server.send_signal(signal.SIGKILL)
    assert wait_until(lambda: sum(c > killed for c, _ in client.ran_here) >= 3 * buffer, 60)
    client.stop()
    lines, report = run.join()
    assert_each_item_once(lines, len(lines))
    assert {json.loads(line)["status"] for line in lines} == {"completed"}
    waits = [ended - captured for captured, ended in client.ran_here if captured > killed]
    assert max(waits) < prompt, (
        f"new items waited up to {max(waits):.2f} s during the outage (resend grace "
        f"{grace:.2f} s, one item takes {1000 * item_seconds:.1f} ms here)"
    )
    assert report["link"]["ran_locally"] >= window + 3 * buffer


class SendLedger(Ledger):
    """A ledger that notes the size of every item sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def sent(self, pending: Pending, size: int) -> None:
        super().sent(pending, size)
        self.sizes.append(size)


class SendCounts(Client):
    """A client that notes the size of every item it sends."""

    ledger_class = SendLedger

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.ledger, SendLedger)
        self.sizes = self.ledger.sizes


def attempts_within(seconds: float, cap: float) -> int:
    """Streams a device backing off 1, 2, 4 ... s (capped) may open in ``seconds``."""
    attempts, at = 1, 1.0  # the first at once, the next after 1 s
    while at <= seconds:
        attempts += 1
        at += min(cap, 2.0 ** (attempts - 1))
    return attempts


def test_a_device_refused_by_a_full_server_backs_off_and_runs_its_items_here(
    start_server: Callable[..., RunningServer],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crashes: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: crashes.append(f"{a.thread}: {a}"))
    caplog.set_level(logging.INFO, logger="offload.client")
    server = start_server("tests.apps.tally", workers=1)
    holder = ClientThread("tests.apps.tally", server.port, 1_000_000, local_tasks=1)
    assert wait_until(lambda: holder.client.recorder.answers >= 10, 60)  # holds the one stream
    link = LinkConfig()
    began = time.monotonic()
    run = ClientThread(
        "tests.apps.tally", server.port, 1_000_000, local_tasks=1, client_class=SendCounts
    )
    client = run.client
    assert isinstance(client, SendCounts) and client.link is not None
    stats = client.link.stats
    assert wait_until(lambda: stats.refused >= 3, 60)  # asked at 0, 1 and 3 s
    client.stop()
    lines, report = run.join()
    elapsed = time.monotonic() - began
    holder.client.stop()
    holder.join()
    attempts = attempts_within(elapsed, link.reconnect_backoff_max)
    assert report["link"]["connects"] <= attempts, report["link"]
    assert report["link"]["refused"] == report["link"]["connects"]  # never accepted
    # Each attempt after a refusal carries one item: a full server costs few bytes.
    assert len(client.sizes) <= run.config.window + attempts
    assert report["bytes"]["sent"] == sum(client.sizes)
    assert_each_item_once(lines, len(lines))
    assert {json.loads(line)["status"] for line in lines} == {"completed"}
    assert report["link"]["ran_locally"] == len(lines) == report["items"]["captured"]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "offload.client"
    ]
    assert len(warnings) == 1 and warnings[0].startswith("event=server-full"), warnings
    assert "RESOURCE_EXHAUSTED" in warnings[0]
    # The channel's readiness poll ended before it closed: no gRPC thread raised.
    state = getattr(run.transport.channel, "_connectivity_state", None)
    assert wait_until(lambda: not getattr(state, "polling", False), 5)
    assert crashes == []


def test_a_fatal_refusal_still_ends_every_captured_item_in_the_output(
    start_server: Callable[..., RunningServer],
) -> None:
    # A server running other code refuses the first item, a round trip after it was sent: over
    # a 300 ms link, a window of items is sent meanwhile, and the next waits for a credit. Both
    # used to go missing from --output (the waiting one was never reported; the others said
    # "failed"). (A refusal as the stream opens, such as a wrong token, now comes before the
    # first item: the device waits for the stream's headers.)
    served = load_pipeline("tests.apps.tally")
    other = Pipeline(served.name, served.tasks, fingerprint("other code", served.tasks))
    server = start_server(other)
    emulator = LinkEmulator(f"127.0.0.1:{server.port}", LinkSpec.parse("1gbit,300ms"))
    try:
        run = ClientThread("tests.apps.tally", emulator.port, 1_000_000, local_tasks=1)
        lines, report = run.join()
    finally:
        emulator.close()
    assert "FAILED_PRECONDITION" in report["error"]
    records = [json.loads(line) for line in lines]
    assert [r["item"] for r in records] == list(range(report["items"]["captured"]))
    assert len(records) == run.config.window + 1  # the window, and the one waiting for credit
    assert {r["status"] for r in records} == {"not_run"}
    assert report["items"]["not_run"] == len(records)
    assert all("FAILED_PRECONDITION" in r["error"] for r in records)


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_stopping_mid_run_finishes_every_captured_item(
    start_server: Callable[..., RunningServer], workers: int
) -> None:
    server = start_server("tests.apps.tally")
    run = ClientThread(
        "tests.apps.tally", server.port, 1_000_000, local_tasks=1, device_workers=workers
    )
    assert wait_until(lambda: run.finished >= 30, 60)
    run.client.stop()
    lines, report = run.join()
    assert_each_item_once(lines, report["items"]["captured"])
    assert {json.loads(line)["status"] for line in lines} == {"completed"}


def test_an_interrupted_run_says_which_items_it_did_not_run(
    start_server: Callable[..., RunningServer],
) -> None:
    # A second Ctrl-C while items wait on the server: they end as not_run, saying why, so that
    # the output still has one line per captured item, in order.
    hold = threading.Event()
    clients: list[Client] = []

    def emit() -> tuple[bool, int]:
        n = current_item().item
        if n == 12:  # items 0-4 answered, 5-11 held on the server: the user presses Ctrl-C
            assert wait_until(lambda: clients[0].recorder.completed >= 5, 30)
            raise KeyboardInterrupt
        return True, n

    def work(n: int) -> tuple[bool, int]:
        if current_item().on_server and n >= 5:
            hold.wait(30)
        return True, n

    def result(n: int) -> tuple[bool, dict[str, int]]:
        return True, {"n": n}

    tasks = (emit, work, result)
    pipeline = Pipeline("tests.interrupted", tasks, fingerprint("tests.interrupted", tasks))
    server = start_server(pipeline)
    config = ClientConfig(pipeline=pipeline.name, local_tasks=1, device_id="interrupted")
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{server.port}")
    out = io.StringIO()
    client = Client(pipeline, config, transport, out)
    clients.append(client)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.run()
    finally:
        hold.set()
        transport.close()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["item"] for r in records] == list(range(12))
    assert [r["status"] for r in records] == ["completed"] * 5 + ["not_run"] * 7
    assert all("interrupted" in r["error"] and r["task"] == 1 for r in records[5:])
    assert client.recorder.not_run == 7


def test_a_network_blip_is_resent_and_a_stateful_aggregate_counts_each_item_once(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("tests.apps.tally")
    proxy = Relay([server.port])  # a TCP relay whose connections the test cuts: a blip
    try:
        run = ClientThread("tests.apps.tally", proxy.port, 300, local_tasks=1)
        assert wait_until(lambda: run.finished >= 60, 60)
        proxy.cut(server.port)
        lines, report = run.join()
    finally:
        proxy.close()
    assert_each_item_once(lines, 300)
    link = report["link"]
    assert link["disconnects"] >= 1 and link["resent"] >= 1
    # The server survived, so resent items it had already run were replayed, not re-run. Items
    # captured during the blip ran here, on this process's tally too: each item counted once
    # means the counts are 1..300 without gaps or repeats, in whatever order the items ran.
    seen = [json.loads(line)["result"]["seen"] for line in lines]
    assert sorted(seen) == list(range(1, 301))


@pytest.mark.parametrize("watch", ["keepalive", "item-deadline"])
def test_a_silent_server_is_noticed_in_bounded_time(
    server_processes: Callable[..., subprocess.Popen[str]], watch: str
) -> None:
    # SIGSTOP: the server's kernel still accepts the connection's bytes, its process says
    # nothing. Small items leave room on the wire for keepalive pings, which go unanswered.
    # Large items fill the socket buffers, so pings queue behind them: the per-item deadline
    # notices instead. The two settings are made exclusive so that each is tested alone.
    frames = 300
    if watch == "keepalive":
        pipeline, local_tasks, expected = "tests.apps.tally", 1, None
        keepalive, link = Keepalive(time=1.0, timeout=1.0), LinkConfig(item_timeout=600.0)
        bound = keepalive.time + keepalive.timeout + 3.0  # + gRPC's timer granularity
    else:
        pipeline, local_tasks, expected = STATELESS, 3, reference(frames)
        keepalive, link = Keepalive(time=600.0, timeout=20.0), LinkConfig(item_timeout=1.5)
        bound = link.item_timeout + 3.0
    port = free_port()
    server = server_processes(port, pipeline)
    run = ClientThread(
        pipeline,
        port,
        frames,
        local_tasks=local_tasks,
        keepalive=keepalive,
        link=LinkConfig(item_timeout=link.item_timeout, resend_grace=0.0),
    )
    assert wait_until(lambda: run.finished >= 40, 60)
    server.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    link_stats = run.client.link.stats  # type: ignore[union-attr]
    assert wait_until(lambda: link_stats.disconnects >= 1, bound), (
        f"a silent server went unnoticed for {bound:.1f} s: {run.finished} finished, "
        f"{run.client.link.report()}"  # type: ignore[union-attr]
    )
    lines, report = run.join()
    assert_each_item_once(lines, frames)
    if expected is not None:
        assert lines == expected
    assert report["link"]["ran_locally"] > 0
    timeouts = report["link"]["item_timeouts"]
    assert timeouts == 0 if watch == "keepalive" else timeouts >= 1
    assert time.monotonic() - stopped < 60


def test_an_unanswered_item_times_out_and_ends_on_the_device(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("tests.apps.tally")
    tally.hang_on_server(3)
    try:
        run = ClientThread(
            "tests.apps.tally",
            server.port,
            12,
            local_tasks=1,
            link=LinkConfig(item_timeout=0.5, resend_grace=0.0, max_sends=2),
        )
        lines, report = run.join(60)
    finally:
        tally.reset()
    assert_each_item_once(lines, 12)
    assert {json.loads(line)["status"] for line in lines} == {"completed"}
    assert report["link"]["item_timeouts"] >= 1
    assert report["link"]["ran_locally"] >= 1


def test_a_slow_server_is_not_mistaken_for_a_stalled_one(
    start_server: Callable[..., RunningServer],
) -> None:
    # 0.25 s per item with 8 in flight: the last item sent waits ~2 s for its answer, twice the
    # item timeout, but answers keep coming, so nothing is reset.
    server = start_server("tests.apps.tally")
    tally.set_server_delay(0.25)
    try:
        run = ClientThread(
            "tests.apps.tally",
            server.port,
            16,
            local_tasks=1,
            window=8,
            link=LinkConfig(item_timeout=1.0),
        )
        lines, report = run.join(60)
    finally:
        tally.reset()
    assert_each_item_once(lines, 16)
    assert report["link"]["item_timeouts"] == 0
    assert report["link"]["ran_locally"] == 0 and report["link"]["disconnects"] == 0


class Unreachable:
    """A transport whose server never answers."""

    target = "nowhere"

    def ready(self, timeout: float) -> bool:
        threading.Event().wait(min(timeout, 0.05))
        return False

    def open_stream(self) -> Any:
        raise AssertionError("never ready, never opened")

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("policy", "dropped"),
    [("drop-oldest", list(range(1, 16))), ("reject-new", list(range(5, 20)))],
)
def test_a_full_offline_buffer_drops_by_policy_and_says_so(policy: str, dropped: list[int]) -> None:
    gate.reset()
    pipeline = load_pipeline("tests.apps.gate")
    config = ClientConfig(
        pipeline=pipeline.name,
        local_tasks=1,
        device_id="offline",
        link=LinkConfig(buffer=4, when_full=policy),
    )
    out = io.StringIO()
    client = Client(pipeline, config, Unreachable(), out)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(client.run()), daemon=True)
    thread.start()
    # Item 0 is stuck on the device; items 1-19 arrive meanwhile, the buffer holds 4.
    assert wait_until(lambda: client.recorder.dropped == 15, 30)
    gate.open_gate()
    thread.join(30)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["item"] for r in records] == list(range(20))
    assert [r["item"] for r in records if r["status"] == "dropped"] == dropped
    assert all(policy in r["error"] for r in records if r["status"] == "dropped")
    assert result["items"]["dropped"] == result["link"]["dropped"] == 15
    assert result["items"]["completed"] == 5


def test_graceful_shutdown_reports_not_serving_and_ends_streams_unavailable() -> None:
    pipeline = load_pipeline("tests.apps.tally")
    server = serve(ServerConfig(pipeline=pipeline.name, host="127.0.0.1", port=0), pipeline)
    run = ClientThread(
        "tests.apps.tally", server.port, 100_000, local_tasks=1, link=LinkConfig(resend_grace=0.5)
    )
    assert wait_until(lambda: run.finished >= 30, 60)
    began = time.monotonic()
    server.stop(grace=5.0)
    # Draining ends the stream at once instead of after the grace period.
    assert time.monotonic() - began < 4.0
    request = health_pb2.HealthCheckRequest(service="offload.v1.Offload")
    assert server.health.Check(request, None).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert wait_until(lambda: run.client.link.stats.disconnects >= 1, 5)  # type: ignore[union-attr]
    run.client.stop()
    lines, report = run.join()
    assert_each_item_once(lines, len(lines))
    # UNAVAILABLE from a stream that was running an item, CANCELLED from one that was waiting.
    events = " ".join(report["link"]["events"])
    assert "UNAVAILABLE" in events or "CANCELLED" in events
    assert report["items"]["failed"] == 0
