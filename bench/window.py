"""Item 3 (and the emulated-RTT part of item 2): throughput against the window of items in
flight, through offload's own link emulation (``--emulate-link``'s ``LinkEmulator``: a
shaping proxy in the device's process) with a 30 ms round trip and a 10 Gbit/s rate, so that
the round trip, not the rate, is what the window has to hide.

Window 1 is ping-pong: one item per round trip plus its processing. Larger windows hide the
round trip until the slowest stage (device, server, link) is the limit again.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from offload import Pipeline
from offload._emulation import LinkEmulator, LinkSpec

from .compare import bound, calibrate, run_ours
from .pipeline import Frame
from .procs import offload_server


def run(
    pipeline: Pipeline,
    frames: list[Frame],
    splits: list[int],
    windows: list[int],
    link: str,
    reps: int,
    items: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    calibration = calibrate(pipeline, frames, 2 * len(frames))
    spec = LinkSpec.parse(link)
    work = [ms / 1000 for ms in calibration["task_ms_per_item"]]
    runs = []
    server = offload_server()
    proxy = LinkEmulator(server.target, spec)
    try:
        for k in splits:  # warm up the server and the proxy
            run_ours(pipeline, frames, proxy.target, k, 20, max(windows), "warm-up")
        for rep in range(reps):
            for k in splits:
                # None: straight to the server, no round trip: the reference the sweep climbs to.
                for w in [*windows, None] if rep % 2 == 0 else [None, *windows[::-1]]:
                    # Window 1 is slow by design (one item per round trip): fewer items.
                    count = max(30, items // 4) if w == 1 else items
                    target = server.target if w is None else proxy.target
                    report = run_ours(
                        pipeline, frames, target, k, count, w or max(windows), f"w-{rep}-{k}-{w}"
                    )
                    runs.append(
                        {
                            "k": k,
                            "window": w,
                            "rep": rep,
                            "throughput": report["throughput_per_second"],
                            "finished_per_second": report["finished_per_second"],
                            "latency_ms": report["latency_ms"],
                        }
                    )
                    label = f"window {w:2d}" if w else f"no round trip, window {max(windows)}"
                    log(f"  rep {rep} K={k} {label}: {report['finished_per_second']:7.1f} items/s")
    finally:
        proxy.close()
        server.stop()
    rows = []
    for k in splits:
        limit = bound(k, work, work, calibration["cut_bytes"], spec.bytes_per_second)
        # An item holds its credit from send to answer: a round trip plus the server's work.
        in_flight = spec.rtt_seconds + sum(work[k:])

        def achieved(k: int, w: int | None) -> float:
            return float(
                statistics.median(
                    r["finished_per_second"] for r in runs if r["k"] == k and r["window"] == w
                )
            )

        direct = achieved(k, None)
        for w in windows:
            rate = achieved(k, w)
            rows.append(
                {
                    "k": k,
                    "window": w,
                    "finished_per_second": round(rate, 1),
                    "bound": round(limit["rate"], 1),
                    "limiter": limit["limiter"],
                    "window_limit": round(w / in_flight, 1),
                    "no_rtt": round(direct, 1),
                    "achieved_vs_bound": round(rate / limit["rate"], 3),
                    "achieved_vs_no_rtt": round(rate / direct, 3),
                }
            )
    return {
        "link": str(spec),
        "rtt_ms": spec.rtt_seconds * 1000,
        "calibration": calibration,
        "rows": rows,
        "runs": runs,
    }
