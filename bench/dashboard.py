"""The dashboard's cost on the gRPC path: server CPU per item with no dashboard, with the
dashboard on and its page closed, and with the page open (a watcher that does what the page
does: reads every server-sent event and fetches a device's view at most once a second).

``python -m bench.dashboard`` (and ``make bench``) writes ``bench/results/dashboard.{json,md,png}``.
The three configurations run in the same process against two server processes (one without,
one with ``--dashboard-port``), interleaved rep by rep, on the same pre-rendered frames, with
one device at split 3 (the server runs tasks 3-6, the last publishing its annotated JPEG).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from offload import load_pipeline
from offload._allocator import keep_large_buffers
from offload._cloud.dashboard import FleetBoard
from offload.v1 import offload_pb2 as pb

from . import machine
from . import pipeline as bench_pipeline
from .compare import _cpu, run_ours
from .procs import ServerProcess, offload_server

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("off", "closed", "open")
SPLIT = 3


class PageWatcher:
    """What an open page costs the server: every event read, each new view fetched <= 1/s."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events = 0
        self.views = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        stream = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        views = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        shown: dict[str, tuple[int, float]] = {}
        stream.request("GET", "/api/events")
        response = stream.getresponse()
        while not self._stop.is_set():
            line = response.readline()
            if not line.startswith(b"data: "):
                continue
            self.events += 1
            now = time.monotonic()
            for device in json.loads(line[6:])["devices"]:
                version, at = shown.get(device["id"], (0, 0.0))
                if device["view"] and device["view"] != version and now - at >= 1.0:
                    views.request("GET", f"/api/view/{device['id']}")
                    views.getresponse().read()
                    shown[device["id"]] = (device["view"], now)
                    self.views += 1
        stream.close()
        views.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def measure(
    server: ServerProcess, frames: list[Any], items: int, label: str, page: int | None
) -> dict[str, Any]:
    pipeline = load_pipeline(bench_pipeline.NAME)
    watcher = PageWatcher(page) if page is not None else None
    began, cpu = time.perf_counter(), _cpu(server.pid)
    try:
        report = run_ours(pipeline, frames, server.target, SPLIT, items, 8, label)
        cpu, seconds = _cpu(server.pid) - cpu, time.perf_counter() - began
    finally:
        if watcher is not None:
            watcher.stop()
    done = report["items"]["completed"] + report["items"]["filtered"]
    return {
        "cpu_ms_per_item": 1000 * cpu / max(1, done),
        "items_per_second": done / seconds,
        "events_per_second": watcher.events / seconds if watcher else 0.0,
        "views_fetched": watcher.views if watcher else 0,
    }


def idle_cost(server: ServerProcess, page: int, seconds: float, reps: int) -> dict[str, float]:
    """Server CPU ms per second with no item flowing: what an open page costs by itself."""
    spent: dict[str, list[float]] = {"closed": [], "open": []}
    for rep in range(reps):
        for config in ("closed", "open") if rep % 2 == 0 else ("open", "closed"):
            watcher = PageWatcher(page) if config == "open" else None
            cpu, began = _cpu(server.pid), time.perf_counter()
            time.sleep(seconds)  # the measurement's span, not a wait for anything
            spent[config].append(1000 * (_cpu(server.pid) - cpu) / (time.perf_counter() - began))
            if watcher is not None:
                watcher.stop()
    return {f"{c}_cpu_ms_per_second": round(statistics.median(v), 2) for c, v in spent.items()}


def snapshot_cost(devices: int, reps: int = 50) -> float:
    """Milliseconds of one tick (snapshot + JSON) for ``devices`` devices, in this process."""
    board = FleetBoard(load_pipeline(bench_pipeline.NAME))
    result = pb.ItemResult(status=pb.ItemResult.COMPLETED, server_cpu_seconds=0.002)
    result.task_times.extend(pb.TaskTime(task=t, seconds=0.001) for t in range(3, 7))
    for n in range(devices):
        state = pb.TaskState(device_id=f"device-{n:03}", run_id="r", next_task=3)
        for item in range(300):
            state.item, state.capture_time = item, time.time() - 0.05
            board.observe(state, result)
    began = time.perf_counter()
    for _ in range(reps):
        json.dumps(board.snapshot(), separators=(",", ":"))
    return 1000 * (time.perf_counter() - began) / reps


def run(reps: int, items: int, source: str) -> dict[str, Any]:
    frames = bench_pipeline.render(source, 120)
    plain = offload_server()
    board = offload_server(extra=("--dashboard-port", "0"))
    try:
        assert board.process.stdout is not None
        page = int(board.process.stdout.readline().strip().rsplit(":", 1)[1])
        for server, label in ((plain, "warm-off"), (board, "warm-on")):
            measure(server, frames, 30, label, None)
        runs = []
        for rep in range(reps):
            order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
            for config in order:
                server = plain if config == "off" else board
                result = measure(
                    server, frames, items, f"{config}-{rep}", page if config == "open" else None
                )
                runs.append({"config": config, "rep": rep, **result})
                print(
                    f"  rep {rep} {config:6s}: {result['cpu_ms_per_item']:6.2f} ms CPU/item, "
                    f"{result['items_per_second']:6.1f} items/s",
                    flush=True,
                )
        idle = idle_cost(board, page, 10.0, max(2, reps // 2))
        print(f"  idle server: {idle}", flush=True)
    finally:
        plain.stop()
        board.stop()
    rows = []
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        cpu = [r["cpu_ms_per_item"] for r in mine]
        rows.append(
            {
                "config": config,
                "cpu_ms_per_item": round(statistics.median(cpu), 3),
                "cpu_ms_min": round(min(cpu), 3),
                "cpu_ms_max": round(max(cpu), 3),
                "items_per_second": round(
                    statistics.median(r["items_per_second"] for r in mine), 1
                ),
                "events_per_second": round(
                    statistics.median(r["events_per_second"] for r in mine), 1
                ),
            }
        )
    ticks = {str(n): round(snapshot_cost(n), 2) for n in (1, 100)}
    return {
        "split": SPLIT,
        "items": items,
        "reps": reps,
        "rows": rows,
        "runs": runs,
        "idle": idle,
        "tick_ms": ticks,
    }


def write(out: Path, data: dict[str, Any]) -> str:
    (out / "dashboard.json").write_text(json.dumps(data, indent=1) + "\n")
    base = next(r for r in data["rows"] if r["config"] == "off")["cpu_ms_per_item"]
    lines = [
        f"Server CPU per item, one device at split {data['split']}, {data['items']} items x "
        f"{data['reps']} reps, interleaved; {machine.one_line(data['machine'])}",
        "",
        "| dashboard | CPU ms/item (median) | min-max | vs off | items/s | events/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['config']} | {r['cpu_ms_per_item']:.3f} | {r['cpu_ms_min']:.3f}-"
            f"{r['cpu_ms_max']:.3f} | {r['cpu_ms_per_item'] / base - 1:+.1%} | "
            f"{r['items_per_second']:.1f} | {r['events_per_second']:.1f} |"
        )
    idle, ticks = data["idle"], data["tick_ms"]
    lines += [
        "",
        f"With no item flowing the server spends {idle['closed_cpu_ms_per_second']} ms CPU a "
        f"second with no page open and {idle['open_cpu_ms_per_second']} ms with one page open "
        f"(4 events a second). One tick (snapshot + JSON) takes {ticks['1']} ms for 1 device "
        f"and {ticks['100']} ms for 100, in the dashboard's thread.",
    ]
    table = "\n".join(lines) + "\n"
    (out / "dashboard.md").write_text(table)
    import matplotlib.pyplot as plt  # noqa: PLC0415  (the bench extra)

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, config in enumerate(CONFIGS):
        values = [r["cpu_ms_per_item"] for r in data["runs"] if r["config"] == config]
        ax.plot([i] * len(values), values, "o", alpha=0.6)
        ax.plot([i], [statistics.median(values)], "k_", markersize=30)
    ax.set_xticks(range(len(CONFIGS)), ["no dashboard", "page closed", "page open"])
    ax.set_ylabel("server CPU ms per item")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "dashboard.png", dpi=100)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--source", default="synthetic")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    keep_large_buffers()
    args.out.mkdir(parents=True, exist_ok=True)
    about = machine.describe()
    data = run(args.reps, args.items, args.source)
    about["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(write(args.out, {"machine": about, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
