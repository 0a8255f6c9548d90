"""Item 5: server scaling with 1, 4, 16 and 64 concurrent device streams at K = 1.

The load comes from one ``bench.load`` process (asyncio, one TCP connection per device,
pre-encoded items). For each server configuration: full load (each stream sends its items as
fast as its window allows), then half load (64 streams paced to half of their full-load rate) for
latency. Server CPU is the server processes' user + system time over the run.
"""

from __future__ import annotations

import json
import statistics
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


def _measure(
    processes: list[psutil.Process],
    target: str,
    streams: int,
    items: int,
    window: int,
    rate: float | None,
    prefix: str,
) -> dict[str, Any]:
    before = _cpu(processes)
    result = load(target, streams, items, window, rate, prefix)
    result["server_cpu_seconds"] = round(_cpu(processes) - before, 3)
    result["server_cpu_ms_per_item"] = round(
        1000 * result["server_cpu_seconds"] / max(1, result["answered"]), 3
    )
    return result


def run(
    configs: list[str],
    stream_counts: list[int],
    items: int,
    window: int,
    reps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    runs = []
    for rep in range(reps):
        for config in configs if rep % 2 == 0 else configs[::-1]:
            servers = start(config)
            parent = psutil.Process(servers[0].pid)
            processes = [parent, *parent.children()]
            target = servers[0].target
            try:
                load(target, 4, 10, window, None, f"{config}-warm-up-{rep}")
                capacity = 0.0  # full-load rate at the most streams: half of it is half load
                for streams in stream_counts:
                    prefix = f"{config}-{rep}-{streams}"
                    result = _measure(processes, target, streams, items, window, None, prefix)
                    result.update(config=config, load="full", rep=rep)
                    capacity = result["items_per_second"]
                    runs.append(result)
                    log(
                        f"  rep {rep} {config:12s} {streams:3d} streams "
                        f"{result['items_per_second']:7.1f} items/s p50 {result['p50_ms']} ms "
                        f"p99 {result['p99_ms']} ms errors {result['errors']} server CPU "
                        f"{result['server_cpu_ms_per_item']} ms/item"
                    )
                streams = max(stream_counts)
                rate = capacity / 2 / streams
                prefix = f"{config}-{rep}-half"
                result = _measure(processes, target, streams, items, window, rate, prefix)
                result.update(
                    config=config, load="half", rep=rep, offered_per_second=round(capacity / 2, 1)
                )
                runs.append(result)
                log(
                    f"  rep {rep} {config:12s} {streams:3d} streams at half load "
                    f"({capacity / 2:.0f}/s offered): {result['items_per_second']:.1f} items/s "
                    f"p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms errors "
                    f"{result['errors']}"
                )
            finally:
                for server in servers:
                    server.stop()
    return {
        "items_per_stream": items,
        "window": window,
        "reps": reps,
        "rows": _medians(runs, configs, stream_counts),
        "runs": runs,
    }


def _medians(
    runs: list[dict[str, Any]], configs: list[str], stream_counts: list[int]
) -> list[dict[str, Any]]:
    """One row per (configuration, streams, load): medians over repetitions; errors summed."""
    rows = []
    keys = [(c, s, "full") for c in configs for s in stream_counts]
    keys += [(c, max(stream_counts), "half") for c in configs]
    for config, streams, kind in sorted(keys, key=lambda k: (configs.index(k[0]), k[2], k[1])):
        mine = [
            r for r in runs if (r["config"], r["streams"], r["load"]) == (config, streams, kind)
        ]
        row: dict[str, Any] = {"config": config, "streams": streams, "load": kind}
        for key in (
            "items_per_second",
            "p50_ms",
            "p99_ms",
            "server_cpu_ms_per_item",
            "server_cpu_seconds",
            "client_cpu_seconds",
            "answered",
        ):
            row[key] = round(statistics.median(r[key] for r in mine), 3)
        row["errors"] = sum(r["errors"] for r in mine)
        rows.append(row)
    return rows
