"""Items 1 and 2: offload against the seed's wire approach at every split, and against the
bottleneck bound computed from measured task times, cut sizes and link bandwidth."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from offload import ClientConfig, GrpcTransport, Pipeline
from offload._codec import encode_into
from offload._device.client import Client
from offload._pipeline import ItemContext, Status, run_tasks
from offload._wire import size_options
from offload.v1 import offload_pb2 as pb

from . import pipeline as bench_pipeline
from . import seed
from .pipeline import Frame
from .procs import ServerProcess, offload_server, seed_server

LIMIT = 16 * 1024 * 1024


def run_ours(
    pipeline: Pipeline,
    frames: list[Frame],
    target: str,
    k: int,
    items: int,
    window: int,
    device_id: str,
    **client_options: Any,
) -> dict[str, Any]:
    """One device stream of ``items`` items at split ``k`` against a running offload server."""
    bench_pipeline.prepare(frames, items)
    transport = GrpcTransport(target, size_options(LIMIT), 10.0)
    try:
        config = ClientConfig(
            pipeline=pipeline.name,
            local_tasks=k,
            window=window,
            device_id=device_id,
            **client_options,
        )
        report = Client(pipeline, config, transport).run()
    finally:
        transport.close()
    if report.get("error"):
        raise RuntimeError(f"offload run at K={k} failed: {report['error']}")
    return report


def run_seed(
    pipeline: Pipeline, frames: list[Frame], port: int, k: int, items: int, device_id: str
) -> dict[str, Any]:
    bench_pipeline.prepare(frames, items)
    return seed.run_device(pipeline, port, k, device_id)


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def calibrate(pipeline: Pipeline, frames: list[Frame], items: int) -> dict[str, Any]:
    """Per-item work of every task when run alone in this process, and the bytes at each cut.

    Work per item is the mean time of a task times the fraction of items that reach it (items
    filtered by task 4 never run tasks 5 and 6), so that sums over tasks are per-item costs.
    """
    n = len(pipeline.tasks)
    bench_pipeline.prepare(frames, 20)  # warm up: first calls of OpenCV functions are slow
    for item in range(20):
        run_tasks(pipeline, 0, n, None, ItemContext("warm-up", "warm-up", item, 0.0, False))
    bench_pipeline.prepare(frames, items)
    seconds: list[list[float]] = [[] for _ in range(n)]
    cut_bytes: list[list[int]] = [[] for _ in range(n)]
    for item in range(items):
        context = ItemContext("calibration", "calibration", item, time.time(), False)
        args: Any = None
        for index in range(n):
            outcome = run_tasks(pipeline, index, index + 1, args, context)
            seconds[index].extend(s for _, s in outcome.task_seconds)
            if outcome.status not in (Status.CONTINUE, Status.COMPLETED):
                break
            args = outcome.value
            if index + 1 < n:
                state = pb.TaskState(
                    pipeline=pipeline.name,
                    fingerprint=pipeline.fingerprint,
                    device_id="calibration-device",
                    run_id="0" * 32,
                    item=item,
                    next_task=index + 1,
                    capture_time=time.time(),
                )
                encode_into(state.args, args)
                cut_bytes[index + 1].append(state.ByteSize())
    # Medians resist the other tenants of a shared machine; times reach = per captured item.
    work = [statistics.median(s) * len(s) / items if s else 0.0 for s in seconds]
    return {
        "items": items,
        "task_ms_per_item": [round(1000 * w, 4) for w in work],
        "task_median_ms": [round(1000 * statistics.median(s), 4) if s else 0.0 for s in seconds],
        "reach": [round(len(s) / items, 4) for s in seconds],
        # Bytes per captured item: an item filtered before the cut sends nothing.
        "cut_bytes": [round(sum(b) / items) for b in cut_bytes],
    }


def loopback_bandwidth(seconds: float = 1.0, chunk: int = 1 << 20) -> float:
    """Bytes per second one TCP connection carries over loopback (sender and receiver threads)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def receive() -> None:
        conn, _ = listener.accept()
        buffer = bytearray(chunk)
        with conn:
            while n := conn.recv_into(buffer):
                received[0] += n

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    payload = bytes(chunk)
    with socket.create_connection(listener.getsockname()) as conn:
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            conn.sendall(payload)
    reader.join()
    elapsed = time.perf_counter() - began
    listener.close()
    return received[0] / elapsed


def bound(
    k: int,
    device_work: list[float],
    server_work: list[float],
    cut_bytes: list[int],
    bandwidth: float,
    workers: int = 1,
) -> dict[str, Any]:
    """Items/s of the slowest of device, server and link at split ``k`` (times in seconds)."""
    device = sum(device_work[:k])
    server = sum(server_work[k:])
    rates = {
        "device": 1 / device if device else float("inf"),
        "server": workers / server if server else float("inf"),
        "link": bandwidth / cut_bytes[k] if cut_bytes[k] else float("inf"),
    }
    limiter = min(rates, key=lambda name: rates[name])
    return {
        "rate": rates[limiter],
        "limiter": limiter,
        **{f"{name}_rate": round(rate, 1) for name, rate in rates.items()},
    }


def in_run_work(report: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per-item device and server work of each task as measured during an offload run."""
    captured = report["items"]["captured"]
    device = [t["device_mean_ms"] * t["device_runs"] / 1000 / captured for t in report["tasks"]]
    server = [t["server_mean_ms"] * t["server_runs"] / 1000 / captured for t in report["tasks"]]
    return device, server


def run(
    pipeline: Pipeline,
    frames: list[Frame],
    splits: list[int],
    reps: int,
    items: int,
    window: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    log("calibrating task times and cut sizes ...")
    calibration = calibrate(pipeline, frames, 2 * len(frames))
    bandwidth = statistics.median(loopback_bandwidth(0.5) for _ in range(3))
    log(f"  task ms/item {calibration['task_ms_per_item']}, loopback {bandwidth / 1e6:.0f} MB/s")
    servers: dict[str, ServerProcess] = {}
    runs: list[dict[str, Any]] = []
    try:
        servers["offload"] = offload_server()
        servers["seed"] = seed_server("buffered")
        servers["prototype"] = seed_server("grow4k")
        systems = ["offload", "seed", "prototype"]
        log("  warming up every server (first calls of OpenCV functions are slow)")
        for k in splits:
            run_ours(pipeline, frames, servers["offload"].target, k, 20, window, "warm-up")
            for system in ("seed", "prototype"):
                run_seed(pipeline, frames, servers[system].port, k, 20, "warm-up")
        for rep in range(reps):
            for k in splits:
                order = systems[rep % 3 :] + systems[: rep % 3]  # rotate who goes first
                for system in order:
                    device_id = f"bench-{system}-{rep}-{k}"
                    # CPU seconds per item on each side: far steadier than items/s on a
                    # shared machine, and what a pair of dedicated cores would have to pay.
                    device_cpu = time.process_time()
                    server_cpu = _cpu(servers[system].pid)
                    if system == "offload":
                        report = run_ours(
                            pipeline, frames, servers[system].target, k, items, window, device_id
                        )
                        record = {
                            "throughput": report["throughput_per_second"],
                            "finished_per_second": report["finished_per_second"],
                            "latency_ms": report["latency_ms"],
                            "completed": report["items"]["completed"],
                            "in_run_work": in_run_work(report),
                        }
                    else:
                        result = run_seed(
                            pipeline, frames, servers[system].port, k, items, device_id
                        )
                        record = {
                            "throughput": result["throughput_per_second"],
                            "completed": result["completed"],
                        }
                    record["device_cpu_ms"] = 1000 * (time.process_time() - device_cpu) / items
                    record["server_cpu_ms"] = (
                        1000 * (_cpu(servers[system].pid) - server_cpu) / items
                    )
                    runs.append({"system": system, "k": k, "rep": rep, **record})
                    log(f"  rep {rep} K={k} {system:9s} {record['throughput']:7.1f} completed/s")
    finally:
        for server in servers.values():
            server.stop()
    return summarise(runs, calibration, bandwidth, splits, window)


def summarise(
    runs: list[dict[str, Any]],
    calibration: dict[str, Any],
    bandwidth: float,
    splits: list[int],
    window: int,
) -> dict[str, Any]:
    def median(system: str, k: int, key: str = "throughput") -> float:
        return float(
            statistics.median(r[key] for r in runs if r["system"] == system and r["k"] == k)
        )

    work = [ms / 1000 for ms in calibration["task_ms_per_item"]]

    def paired(k: int, other: str) -> float:
        """Median over repetitions of offload / other, each pair measured back to back."""
        by_rep = {(r["system"], r["rep"]): r["throughput"] for r in runs if r["k"] == k}
        reps = sorted({r["rep"] for r in runs})
        return float(statistics.median(by_rep["offload", rep] / by_rep[other, rep] for rep in reps))

    rows = []
    for k in splits:
        ours = median("offload", k)
        ours_finished = median("offload", k, "finished_per_second")
        seed_rate, prototype_rate = median("seed", k), median("prototype", k)
        isolated = bound(k, work, work, calibration["cut_bytes"], bandwidth)
        # The same bound from the task times measured inside each offload run (contended CPU).
        in_run = []
        for r in runs:
            if r["system"] == "offload" and r["k"] == k:
                device, server = r["in_run_work"]
                in_run.append(bound(k, device, server, calibration["cut_bytes"], bandwidth))
        in_run_rate = statistics.median(b["rate"] for b in in_run)
        cpu = {
            f"{system}_{side}_cpu_ms": round(median(system, k, f"{side}_cpu_ms"), 3)
            for system in ("offload", "seed")
            for side in ("device", "server")
        }
        rows.append(
            {
                "k": k,
                **cpu,
                "offload": round(ours, 1),
                "offload_finished": round(ours_finished, 1),
                "seed": round(seed_rate, 1),
                "prototype": round(prototype_rate, 1),
                "vs_seed": round(paired(k, "seed"), 3),
                "vs_prototype": round(paired(k, "prototype"), 3),
                "bound": {
                    k2: (round(v, 1) if isinstance(v, float) else v) for k2, v in isolated.items()
                },
                "achieved_vs_bound": round(ours_finished / isolated["rate"], 3),
                "in_run_bound": round(in_run_rate, 1),
                "achieved_vs_in_run_bound": round(ours_finished / in_run_rate, 3),
            }
        )
    return {
        "window": window,
        "calibration": calibration,
        "loopback_bytes_per_second": round(bandwidth),
        "rows": rows,
        "runs": runs,
    }
