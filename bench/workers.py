"""``python -m bench.workers``: device workers (``--device-workers``), 1 against 2, on this machine.

Three parts, each interleaving its variants run by run, so that the load of a shared machine
falls on all of them alike; medians and ratios are reported:

* ``pool``: threads against a process pool (forked before any gRPC channel; items cross as the
  codec's bytes over pipes, never pickled) running tasks 1-5 of the ball tracker, and a
  pure-Python task, on pre-rendered frames: ms per item and the speed-up of 2 workers;
* ``client``: offload's client, client-only and at a device-bound split (K=6, an offload server
  on loopback), 1 and 2 workers: completed or filtered items/s, the speed-up, device CPU per item,
  the capture thread's CPU per item and the bound they set; client-only also with single-threaded
  tasks (OpenCV at one thread in both), on each frame set and on the clip decoded as it plays;
* ``scheduler``: automatic mode on an emulated slow device, one target, 1 and 2 workers: the
  split the scheduler ends at and the rate it gets there.

Writes ``bench/results/workers.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from examples.ball_tracking import set_source
from offload import Client, ClientConfig, load_pipeline
from offload._codec import decode, encode
from offload._device.workers import cores, limit_library_threads
from offload._pipeline import ItemContext, Pipeline, Status, run_tasks
from offload.v1 import offload_pb2 as pb

from . import machine
from . import pipeline as bench_pipeline
from .compare import run_ours
from .pipeline import Frame
from .procs import offload_server
from .report import _table

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXT = ItemContext("bench", "bench", 0, 0.0, False)
BALL = "examples.ball_tracking"
Work = Callable[[Any], Any]


def log(message: str) -> None:
    print(message, flush=True)


# --- pool: threads against processes ---------------------------------------------------------


def ball_work(pipeline: Pipeline) -> Work:
    """Tasks 1-5 of the tracker on a captured frame: what a worker runs at K=6."""

    def work(frame: Any) -> Any:
        outcome = run_tasks(pipeline, 1, 6, frame, CONTEXT)
        return outcome.value[1:] if outcome.status is Status.CONTINUE else None  # no JPEG back

    return work


def pure_python(frame: Any) -> int:
    """A task that holds the GIL: arithmetic over a row of pixels, in Python."""
    row = frame[0].tolist() if hasattr(frame, "tolist") else list(frame)
    total = 0
    for _ in range(4):
        for pixel in row:
            total = (total * 31 + sum(pixel)) % 1_000_003
    return total


def with_threads(work: Work, items: list[Any], n: int) -> float:
    """Seconds for ``n`` threads to run ``work`` on every item (results in item order)."""
    began = time.perf_counter()
    if n == 1:
        for item in items:
            work(item)
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(work, items))
    return time.perf_counter() - began


def _send(fd: int, data: bytes) -> None:
    view = memoryview(struct.pack("<I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int) -> bytes | None:
    def exactly(size: int) -> bytes | None:
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, size - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    header = exactly(4)
    return None if header is None else exactly(struct.unpack("<I", header)[0])


def with_processes(work: Work, items: list[Any], n: int) -> float:
    """Seconds for ``n`` forked children to run ``work`` on every item: each item crosses as the
    codec's bytes both ways (the cost a process pool adds), fed by one thread per child."""
    children: list[tuple[int, int, int]] = []  # pid, the pipe it reads, the pipe it writes
    for _ in range(n):
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: decode, work, encode, until the pipe closes
            try:  # no end of another child's pipes: that child would never see its EOF
                for fd in (parent_writes, parent_reads, *(f for c in children for f in c[1:])):
                    os.close(fd)
                while (data := _receive(child_reads)) is not None:
                    result = work(decode(pb.Value.FromString(data)))
                    _send(child_writes, encode(result).SerializeToString())
            finally:
                os._exit(0)
        os.close(child_reads)
        os.close(child_writes)
        children.append((pid, parent_writes, parent_reads))

    def feed(child: tuple[int, int, int], share: list[Any]) -> None:
        _, out, back = child
        for item in share:
            _send(out, encode(item).SerializeToString())
            answer = _receive(back)
            assert answer is not None
            decode(pb.Value.FromString(answer))

    began = time.perf_counter()
    feeders = [
        threading.Thread(target=feed, args=(child, items[i::n])) for i, child in enumerate(children)
    ]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join()
    seconds = time.perf_counter() - began
    for pid, out, back in children:
        os.close(out)
        os.close(back)
        os.waitpid(pid, 0)
    return seconds


def pool_part(pipeline: Pipeline, frames: list[Frame], reps: int) -> dict[str, Any]:
    captured = []
    bench_pipeline.prepare(frames, len(frames))
    while (taken := bench_pipeline.capture())[0]:
        captured.append(taken[1])
    works = {"ball tracker tasks 1-5": ball_work(pipeline), "pure Python": pure_python}
    for work in works.values():  # warm up (OpenCV's first calls)
        with_threads(work, captured[:10], 1)
    runners = {"threads": with_threads, "processes": with_processes}
    ms: dict[str, list[float]] = {}
    # One OpenCV thread per task, as the client's workers run them: the pools are compared.
    before = limit_library_threads()
    for _ in range(reps):
        for name, work in works.items():
            for kind, runner in runners.items():
                for n in (1, 2):
                    seconds = runner(work, captured, n)
                    ms.setdefault(f"{name}|{kind}|{n}", []).append(1000 * seconds / len(captured))
    limit_library_threads(before)
    rows = []
    for name in works:
        for kind in runners:
            one, two = (statistics.median(ms[f"{name}|{kind}|{n}"]) for n in (1, 2))
            rows.append(
                {
                    "work": name,
                    "pool": kind,
                    "ms_per_item_1": round(one, 3),
                    "ms_per_item_2": round(two, 3),
                    "speedup": round(one / two, 2),
                }
            )
    return {"items": len(captured), "reps": reps, "rows": rows, "samples_ms": ms}


# --- client: offload's client with 1 and 2 workers ------------------------------------------


# mode, split (None: client-only), emulated slowdown, OpenCV threads (None: OpenCV's default,
# one per CPU), and whether it runs for every source or the first only.
CLIENT_MODES: tuple[tuple[str, int | None, float, int | None, bool], ...] = (
    ("client-only", None, 1.0, None, True),
    # A device whose tasks are single-threaded (a Pi build of OpenCV without its thread pool,
    # or any pure-Python task): OpenCV at one thread with 1 worker and with 2.
    ("client-only, single-threaded tasks", None, 1.0, 1, True),
    ("K=6", 6, 1.0, None, False),
    # Tasks that sleep off an emulated device's time: the workers' overlap alone, whatever the
    # load of the machine (it measures the mechanism, not this machine's cores).
    ("client-only, device 8x slower (emulated)", None, 8.0, None, False),
)


def bound(one: dict[str, Any], two: dict[str, Any]) -> float:
    """The speed-up 2 workers could reach on this machine's cores at the CPU they were measured
    to cost: the rate is at most cores / (CPU per item) and 1 / (capture's CPU per item, the one
    serial stage), over the rate 1 worker got (Amdahl's bound for a pipeline)."""
    best = min(cores() / two["cpu_ms_per_item"], 1 / two["capture_cpu_ms_per_item"])
    return float(1000 * best / one["per_second"])


def client_part(
    pipeline: Pipeline, sources: dict[str, list[Frame]], items: int, reps: int
) -> dict[str, Any]:
    server = offload_server()
    runs: dict[str, list[dict[str, Any]]] = {}
    first = next(iter(sources))
    variants = [
        (f"{mode}|{source}", pipeline, k, slowdown, threads, frames)
        for source, frames in sources.items()
        for mode, k, slowdown, threads, every in CLIENT_MODES
        if every or source == first
    ]
    if bench_pipeline.WEBCAM_CLIP.exists():  # as `--source FILE` runs: decoded in capture
        ball = load_pipeline(BALL)
        variants += [
            (f"{mode}|webcam, decoded", ball, None, 1.0, threads, [])
            for mode, threads in (("client-only", None), ("client-only, single-threaded tasks", 1))
        ]
    try:
        for rep in range(reps):
            for name, runs_pipeline, k, slowdown, threads, frames in variants:
                for workers in (1, 2):
                    if runs_pipeline is not pipeline:
                        set_source(str(bench_pipeline.WEBCAM_CLIP))  # from frame 0
                    before = limit_library_threads(threads)
                    began = time.thread_time()  # the capture loop runs on this thread
                    try:
                        report = (
                            run_ours(
                                pipeline,
                                frames,
                                server.target,
                                k,  # type: ignore[arg-type]  # None: client-only
                                items if slowdown == 1 else items // 2,
                                8,
                                f"bench-workers-{rep}",
                                device_workers=workers,
                                slowdown=slowdown,
                            )
                            if runs_pipeline is pipeline
                            else Client(
                                runs_pipeline,
                                ClientConfig(pipeline=BALL, frames=items, device_workers=workers),
                            ).run()
                        )
                    finally:
                        limit_library_threads(before)
                    device = report["device"]
                    runs.setdefault(f"{name}|{workers}", []).append(
                        {
                            "per_second": report["finished_per_second"],
                            "cpu_ms_per_item": device["cpu_ms_per_item"],
                            "capture_cpu_ms_per_item": 1000
                            * (time.thread_time() - began)
                            / report["items"]["captured"],
                            "cores_busy": device["cpu_percent"] / 100,
                            "busy_percent": device["workers_busy_percent"],
                        }
                    )
    finally:
        server.stop()
    rows = []
    for name, _, k, slowdown, _, _ in variants:
        one, two = runs[f"{name}|1"], runs[f"{name}|2"]
        ratios = [b["per_second"] / a["per_second"] for a, b in zip(one, two, strict=True)]

        def median(key: str, of: list[dict[str, Any]]) -> float:
            return round(statistics.median(r[key] or 0.0 for r in of), 2)

        mode, _, source = name.partition("|")
        rows.append(
            {
                "mode": mode,
                "source": source,
                "per_second_1": median("per_second", one),
                "per_second_2": median("per_second", two),
                "speedup_median": round(statistics.median(ratios), 2),
                "speedups": [round(r, 2) for r in ratios],
                "cpu_ms_per_item_1": median("cpu_ms_per_item", one),
                "cpu_ms_per_item_2": median("cpu_ms_per_item", two),
                "capture_cpu_ms_per_item_2": median("capture_cpu_ms_per_item", two),
                "cores_busy_1": median("cores_busy", one),
                "cores_busy_2": median("cores_busy", two),
                "busy_percent_2": median("busy_percent", two),
                # Meaningful where the CPU is real work (not the emulation's sleeps), client-only.
                "bound_median": (
                    round(statistics.median(map(bound, one, two)), 2)
                    if k is None and slowdown == 1
                    else None
                ),
            }
        )
    return {"items": items, "reps": reps, "rows": rows, "runs": runs}


# --- scheduler: the split automatic mode ends at ---------------------------------------------


def scheduler_part(
    pipeline: Pipeline, frames: list[Frame], slowdown: float, seconds: float
) -> dict[str, Any]:
    """One target, 1 and 2 workers: 1.3 times what one worker was measured to do at K=6 (the
    most local split) on a device ``slowdown`` times slower than this machine, so that one
    worker must send items rawer to meet it and two may not have to."""
    server = offload_server()
    rows = []
    try:

        def run(workers: int, items: int, **options: Any) -> dict[str, Any]:
            return run_ours(
                pipeline,
                frames,
                server.target,
                options.pop("k", None),
                items,
                8,
                f"bench-scheduler-{workers}",
                device_workers=workers,
                slowdown=slowdown,
                **options,
            )

        one_worker = run(1, 60, k=6)["finished_per_second"]
        target = round(1.3 * one_worker, 1)
        for workers in (1, 2):
            report = run(workers, int(seconds * target), fps=target, control_period=1.0)
            scheduler = report["scheduler"]
            last = [p["throughput_per_second"] for p in scheduler["periods"][-3:]]
            rows.append(
                {
                    "workers": workers,
                    "final_split": scheduler["final_split"],
                    "last_periods_per_second": last,
                    "history": [h["reason"] for h in scheduler["history"]],
                }
            )
    finally:
        server.stop()
    return {
        "slowdown": slowdown,
        "target_per_second": target,
        "one_worker_k6_measured": one_worker,
        "rows": rows,
    }


# --- the report ------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Device workers: 1 against 2", "", machine.one_line(results["machine"]), ""]
    pool, client, scheduler = results["pool"], results["client"], results["scheduler"]
    lines += [
        f"## Threads or processes ({pool['items']} {results['sources'][0]} frames, median of "
        f"{pool['reps']} interleaved runs)",
        "",
        _table(
            ["work", "pool", "ms/item, 1", "ms/item, 2", "speed-up"],
            [
                [
                    r["work"],
                    r["pool"],
                    f"{r['ms_per_item_1']:.2f}",
                    f"{r['ms_per_item_2']:.2f}",
                    f"{r['speedup']:.2f}x",
                ]
                for r in pool["rows"]
            ],
        ),
        "",
        f"## The client ({client['items']} items, median of {client['reps']} interleaved runs)",
        "",
        "The bound is what 2 workers could reach at the CPU they cost, over 1 worker's rate: at",
        "most cores / (device CPU per item) and 1 / (capture's CPU per item, the serial stage).",
        "",
        _table(
            [
                *("mode", "frames", "items/s, 1", "items/s, 2", "speed-up (each run)"),
                *("bound", "device CPU ms/item, 1", "2", "capture CPU ms/item, 2"),
                *("cores busy, 1", "2", "workers busy, 2"),
            ],
            [
                [
                    r["mode"],
                    r["source"],
                    f"{r['per_second_1']:.1f}",
                    f"{r['per_second_2']:.1f}",
                    f"{r['speedup_median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['speedups'])})",
                    "" if r["bound_median"] is None else f"{r['bound_median']:.2f}x",
                    f"{r['cpu_ms_per_item_1']:.2f}",
                    f"{r['cpu_ms_per_item_2']:.2f}",
                    f"{r['capture_cpu_ms_per_item_2']:.2f}",
                    f"{r['cores_busy_1']:.2f}",
                    f"{r['cores_busy_2']:.2f}",
                    f"{r['busy_percent_2']:.0f}%",
                ]
                for r in client["rows"]
            ],
        ),
        "",
        f"## Automatic mode: target {scheduler['target_per_second']:g}/s on a device "
        f"{scheduler['slowdown']:g}x slower (one worker measured "
        f"{scheduler['one_worker_k6_measured']:g}/s at K=6 first)",
        "",
        _table(
            ["workers", "final split", "last periods, items/s"],
            [
                [
                    r["workers"],
                    r["final_split"],
                    ", ".join(f"{x:.1f}" for x in r["last_periods_per_second"]),
                ]
                for r in scheduler["rows"]
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def plot(out: Path, results: dict[str, Any]) -> None:
    def mode(text: str) -> str:
        return (
            text.replace("client-only, ", "")
            .replace("single-threaded tasks", "1 thread")
            .replace("device 8x slower (emulated)", "emulated 8x")
        )

    rows: list[tuple[str, float, float | None]] = [
        (f"{r['work'].replace('ball tracker tasks', 'tasks')}\n{r['pool']}", r["speedup"], None)
        for r in results["pool"]["rows"]
    ]
    rows += [
        (
            f"{r['source'].replace(', ', ' ')}\n{mode(r['mode'])}",
            r["speedup_median"],
            r["bound_median"],
        )
        for r in results["client"]["rows"]
    ]
    figure, axes = plt.subplots(figsize=(12, 4.5))
    names = [name for name, _, _ in rows]
    axes.bar(names, [s for _, s, _ in rows], color="tab:blue", label="measured (median)")
    bounds = [(name, float(b)) for name, _, b in rows if b is not None]
    axes.scatter(
        [name for name, _ in bounds],
        [b for _, b in bounds],
        marker="_",
        s=400,
        color="black",
        label="bound: cores and the capture thread's CPU",
    )
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.axhline(1.8, color="tab:red", linewidth=0.8, linestyle="--", label="goal 1.8x")
    axes.set_ylabel("speed-up of 2 workers over 1")
    axes.set_title("Device workers on this machine (2 cores, shared): pool, then the client")
    axes.tick_params(axis="x", labelsize=7)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(out / "workers.png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="interleaved runs of each variant")
    parser.add_argument("--items", type=int, default=400, help="items per client run")
    parser.add_argument(
        "--sources",
        default="webcam,synthetic",
        help="frames, comma-separated: synthetic, webcam or a file (K=6 and the emulated "
        "device run on the first only)",
    )
    parser.add_argument("--slowdown", type=float, default=8.0, help="the scheduler's device")
    parser.add_argument("--seconds", type=float, default=25.0, help="each automatic run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few items, 1 rep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.items, args.seconds = 1, 80, 6.0
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(bench_pipeline.NAME)
    sources = {name: bench_pipeline.render(name, 100) for name in args.sources.split(",")}
    frames = next(iter(sources.values()))
    results: dict[str, Any] = {"machine": machine.describe(), "sources": list(sources)}
    log("workers: threads against processes (forked first: no gRPC channel exists yet)")
    results["pool"] = pool_part(pipeline, frames, args.reps)
    log("workers: the client, client-only and at K=6, 1 and 2 workers")
    results["client"] = client_part(pipeline, sources, args.items, args.reps)
    log("workers: automatic mode, 1 and 2 workers")
    results["scheduler"] = scheduler_part(pipeline, frames, args.slowdown, args.seconds)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "workers.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "workers.md").write_text(text + "\n")
    plot(args.out, results)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
