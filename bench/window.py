"""Item 3 (and the emulated-RTT part of item 2): throughput against the window of items in
flight, through offload's own link emulation (``--emulate-link``'s ``LinkEmulator``: a
shaping proxy in the device's process) with a 30 ms round trip and 200 Mbit/s: the link is the
bottleneck for cuts that carry a frame (K = 1), the device for K = 6.

Window 1 is ping-pong: one item per round trip plus its processing. Larger windows hide the
round trip until the slowest stage (device, server, link) is the limit again.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from offload import Pipeline
from offload._device.emulation import LinkEmulator, LinkSpec

from .compare import bound, calibrate, run_ours
from .pipeline import Frame
from .procs import offload_server


def emulated_bandwidth(spec: LinkSpec, total: int = 8 << 20) -> float:
    """Bytes per second the emulated link really carries (its receiver's view, first byte to
    last): the link rate of the bound, which the nominal rate overstates."""
    listener = socket.create_server(("127.0.0.1", 0))
    span: list[float] = []

    def receive() -> None:
        conn, _ = listener.accept()
        buffer = bytearray(1 << 20)
        got = 0
        with conn:
            while got < total:
                n = conn.recv_into(buffer)
                if not n:
                    break
                if not got:
                    span.append(time.perf_counter())
                got += n
            span.append(time.perf_counter())

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    emulator = LinkEmulator(f"127.0.0.1:{listener.getsockname()[1]}", spec)
    try:
        with socket.create_connection(("127.0.0.1", emulator.port)) as conn:
            conn.sendall(bytes(total))
            reader.join(60)
    finally:
        emulator.close()
        listener.close()
    return total / (span[-1] - span[0])


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
    effective = emulated_bandwidth(spec)
    log(f"  the emulated link carries {effective / 1e6:.1f} MB/s of its nominal {spec}")
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
        limit = bound(k, work, work, calibration["cut_bytes"], effective)
        # An item holds its credit from send to answer: a round trip, its transfer and the
        # server's work.
        in_flight = spec.rtt_seconds + calibration["cut_bytes"][k] / effective + sum(work[k:])

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
        "link_bytes_per_second": {"nominal": spec.bytes_per_second, "measured": round(effective)},
        "calibration": calibration,
        "rows": rows,
        "runs": runs,
    }
