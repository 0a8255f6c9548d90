"""Item 5: server scaling with 1, 4, 16 and 64 concurrent device streams at K = 1.

The load comes from one ``bench.load`` process (asyncio, one TCP connection per device,
pre-encoded items). For each server configuration: full load (each stream sends its items as
fast as its window allows), then half load (64 streams paced to half of their full-load rate) for
latency. Server CPU is the server processes' user + system time over the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psutil

from .procs import ROOT, ServerProcess, offload_server


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def start(config: str) -> list[ServerProcess]:
    """``threads``: one offload server process (gRPC's sync server, a thread per stream);
    ``processes-N``: ``--processes N`` (N processes forked before serving, one port shared with
    SO_REUSEPORT); ``aio``: a grpc.aio server running the same executor (``bench.aio_server``)."""
    if config == "threads":
        return [offload_server()]
    if config == "aio":
        return [ServerProcess(["-m", "bench.aio_server"])]
    return [offload_server(extra=("--processes", config.split("-")[1]))]


def load(
    target: str, streams: int, items: int, window: int, rate: float | None, prefix: str
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.load",
        "--target",
        target,
        "--streams",
        str(streams),
        "--items",
        str(items),
        "--window",
        str(window),
        "--prefix",
        prefix,
    ]
    if rate:
        command += ["--rate", str(rate)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run(
    configs: list[str],
    stream_counts: list[int],
    items: int,
    window: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    rows = []
    for config in configs:
        servers = start(config)
        parent = psutil.Process(servers[0].pid)
        processes = [parent, *parent.children()]
        try:
            load(servers[0].target, 4, 10, window, None, f"{config}-warm-up")
            capacity = 0.0  # full-load rate at the most streams: half of it is half load
            for streams in stream_counts:
                before = _cpu(processes)
                result = load(
                    servers[0].target, streams, items, window, None, f"{config}-{streams}"
                )
                result["server_cpu_seconds"] = round(_cpu(processes) - before, 3)
                result["server_cpu_ms_per_item"] = round(
                    1000 * result["server_cpu_seconds"] / max(1, result["answered"]), 3
                )
                result.update(config=config, load="full")
                capacity = result["items_per_second"]
                rows.append(result)
                log(
                    f"  {config:12s} {streams:3d} streams {result['items_per_second']:7.1f} "
                    f"items/s p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms "
                    f"errors {result['errors']} server CPU {result['server_cpu_ms_per_item']} "
                    "ms/item"
                )
            streams = max(stream_counts)
            rate = capacity / 2 / streams
            before = _cpu(processes)
            result = load(servers[0].target, streams, items, window, rate, f"{config}-half")
            result["server_cpu_seconds"] = round(_cpu(processes) - before, 3)
            result["server_cpu_ms_per_item"] = round(
                1000 * result["server_cpu_seconds"] / max(1, result["answered"]), 3
            )
            result.update(config=config, load="half", offered_per_second=round(capacity / 2, 1))
            rows.append(result)
            log(
                f"  {config:12s} {streams:3d} streams at half load ({capacity / 2:.0f}/s offered): "
                f"{result['items_per_second']:.1f} items/s p50 {result['p50_ms']} ms p99 "
                f"{result['p99_ms']} ms errors {result['errors']}"
            )
        finally:
            for server in servers:
                server.stop()
    return {"items_per_stream": items, "window": window, "rows": rows}
