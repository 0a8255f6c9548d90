"""Client and server over real gRPC on loopback: every split gives the client-only results."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

import pytest

from offload import (
    Client,
    ClientConfig,
    Pipeline,
    RunningServer,
    current_item,
    load_pipeline,
)
from offload._device.link import Link
from offload._device.report import format_summary
from offload._pipeline import fingerprint
from offload.testing import InProcessTransport, RemoteExecutor

from ..helpers import WEBCAM_CLIP, run_split

BALL = "examples.ball_tracking"
SEED_APP = "tests.apps.vibration"


def test_seed_format_app_runs_unchanged_at_every_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(SEED_APP)
    server = start_server(pipeline)
    reference, _ = run_split(pipeline, None, source="")
    assert len(reference) == 40
    statuses = {json.loads(line)["status"] for line in reference}
    assert statuses == {"completed", "filtered"}
    for k in range(1, len(pipeline) + 1):
        lines, report = run_split(pipeline, k, server.port, source="")
        assert lines == reference, f"split {k} differs from client-only"
        assert report["error"] is None


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_ball_tracking_every_split_matches_client_only(
    start_server: Callable[..., RunningServer], compression: str
) -> None:
    pipeline = load_pipeline(BALL)
    server = start_server(pipeline)
    reference, ref_report = run_split(pipeline, None, source="synthetic", frames=60)
    assert ref_report["items"]["captured"] == 60
    assert ref_report["items"]["filtered"] >= 5  # the synthetic ball hides now and then
    compressed = 0
    for k in range(1, len(pipeline) + 1):
        lines, report = run_split(
            pipeline, k, server.port, source="synthetic", frames=60, compression=compression
        )
        assert lines == reference, f"split {k} differs from client-only"
        codecs = report.get("compression", {}).get("codecs", {})  # none at K=N: no link
        compressed += sum(c["items"] for c in codecs.values())
        remote = [t for t in report["tasks"] if t["server_runs"]]
        assert [t["index"] for t in remote] == list(range(k, len(pipeline)))
        assert (report["bytes"]["sent"] > 0) == (k < len(pipeline))
    # The synthetic frames are noisy: only frame + mask (K=3) shrinks enough to be compressed.
    assert (compressed > 0) == (compression != "none")


@pytest.mark.skipif(not WEBCAM_CLIP.exists(), reason=f"webcam clip not found at {WEBCAM_CLIP}")
# Seven runs of the whole clip: ~80 s on a shared 2-core machine; the timeout only guards a hang.
@pytest.mark.timeout(600)
def test_real_webcam_clip_gives_identical_results_at_every_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(BALL)
    server = start_server(pipeline)
    reference, report = run_split(pipeline, None, source=str(WEBCAM_CLIP))
    assert report["items"] == {
        "captured": 1004,
        "completed": 879,
        "filtered": 125,
        "failed": 0,
        "dropped": 0,
        "not_run": 0,
    }
    for k in range(1, len(pipeline) + 1):
        lines, _ = run_split(pipeline, k, server.port, source=str(WEBCAM_CLIP), window=16)
        assert lines == reference, f"split {k} differs from client-only"


def test_window_bounds_items_in_flight() -> None:
    pipeline = load_pipeline(SEED_APP)
    pipeline.set_source("")
    executor = RemoteExecutor(pipeline)
    most = 0
    original = executor.execute

    def spy(state):  # type: ignore[no-untyped-def]
        nonlocal most
        link = cast("Link", client.link)  # split 1 with a transport: the client has a link
        most = max(most, sum(p.state == "sent" for p in link._pending.values()))
        return original(state)

    executor.execute = spy  # type: ignore[method-assign]
    config = ClientConfig(pipeline=pipeline.name, local_tasks=1, window=3, device_id="w")
    client = Client(pipeline, config, InProcessTransport(executor))
    report = client.run()
    assert report["items"]["captured"] == 40
    assert 1 <= most <= 3


def test_the_summary_leaves_out_what_does_not_apply_and_names_what_it_counts() -> None:
    def fussy(n):  # type: ignore[no-untyped-def]
        if n % 3 == 0:
            raise ValueError("every third item")
        return (n % 3 == 1), n

    def emit():  # type: ignore[no-untyped-def]
        n = current_item().item
        return n < 12, n

    tasks = (emit, fussy, lambda n: (True, n))
    pipeline = Pipeline("tests.fussy", tasks, fingerprint("tests.fussy", tasks))
    _, report = run_split(pipeline, None)
    items = report["items"]
    assert (items["completed"], items["filtered"], items["failed"]) == (4, 4, 4)
    # Items the pipeline took to an end: failed ones are not throughput.
    assert report["finished_per_second"] == pytest.approx(2 * report["throughput_per_second"])
    summary = format_summary(report)
    assert f"({report['finished_per_second']:.1f}/s completed or filtered)" in summary
    # A shaped link on a device at full speed: no "device 1x slower".
    report["emulation"] = {"slowdown": 1.0, "link": "200mbit,30ms"}
    report["scheduler"] = {"periods": [], "history": []}
    summary = format_summary(report)
    assert "  emulation  link 200mbit,30ms" in summary.splitlines()
    assert "periods" not in summary  # not "periods (last 0)"
    period = {"split": 2, "throughput_per_second": 9.0}
    report["scheduler"]["periods"] = [period] * 3
    assert "  periods    K=2 9.0/s, K=2 9.0/s, K=2 9.0/s" in format_summary(report).splitlines()
    report["scheduler"]["periods"] = [period] * 10
    assert "(the last 8 of 10)" in format_summary(report)
    report["scheduler"].update(final_split=5, final_codec="zstd", final_reason="K=5 meets it")
    assert "  ended on   K=5 zstd: K=5 meets it" in format_summary(report).splitlines()


def test_the_link_reports_whether_it_was_up_when_the_run_ended(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(SEED_APP)
    server = start_server(pipeline)
    _, report = run_split(pipeline, 2, server.port, source="")
    link = report["link"]
    assert link["up_at_end"] is True, link  # it said online: false after a good run
    assert 0 < link["up_seconds"]
    assert "down at the end" not in format_summary(report)
