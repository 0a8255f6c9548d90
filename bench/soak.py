"""Soak: devices stream to one server process for minutes; memory and threads are sampled.

``make soak`` (10 minutes) or ``python -m bench.soak --minutes 2``. Each device runs one client
run after another (every run has a new run id, so per-run server state comes and goes), at a
fixed split, against a real ``python -m offload.server`` on loopback. Every few seconds the
server's and this process's resident memory, thread count and open file descriptors are
sampled. The report compares the samples after warm-up (the second tenth of the run) with
the last tenth: the drift. Exit status 1 if any item failed or any run ended with an error.

Results: ``bench/results/soak.json`` and ``bench/results/soak.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from offload import ClientConfig, GrpcTransport, load_pipeline
from offload._device.client import Client

from . import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def start_server(pipeline: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "offload.server", "--host", "127.0.0.1", "--port", "0"),
            *("--pipeline", pipeline, "--announce", "--log-level", "WARNING"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


class Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs = 0
        self.items = 0
        self.failed = 0
        self.dropped = 0
        self.disconnects = 0
        self.errors: list[str] = []

    def add(self, report: dict[str, Any]) -> None:
        with self.lock:
            self.runs += 1
            self.items += report["items"]["captured"]
            self.failed += report["items"]["failed"]
            self.dropped += report["items"]["dropped"]
            self.disconnects += report["link"]["disconnects"] if report.get("link") else 0
            if report["error"] and len(self.errors) < 10:
                self.errors.append(str(report["error"]))


def device(
    name: str, pipeline: str, port: int, split: int, frames: int, deadline: float, totals: Totals
) -> None:
    loaded = load_pipeline(pipeline)
    while time.monotonic() < deadline:
        config = ClientConfig(pipeline=pipeline, local_tasks=split, frames=frames, device_id=name)
        transport = GrpcTransport.from_config(config, f"127.0.0.1:{port}")
        try:
            totals.add(Client(loaded, config, transport).run())
        finally:
            transport.close()


def sample(process: psutil.Process) -> dict[str, float]:
    with process.oneshot():
        return {
            "rss_mib": process.memory_info().rss / 2**20,
            "threads": process.num_threads(),
            "fds": process.num_fds(),
        }


def drift(samples: list[dict[str, Any]], side: str, key: str) -> dict[str, float]:
    tenth = max(1, len(samples) // 10)
    early = [s[side][key] for s in samples[tenth : 2 * tenth]]
    late = [s[side][key] for s in samples[-tenth:]]
    before, after = statistics.median(early), statistics.median(late)
    return {
        "after_warmup": round(before, 2),
        "end": round(after, 2),
        "drift": round(after - before, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--pipeline", default="examples.ball_tracking")
    parser.add_argument("--split", type=int, default=5, help="tasks on the device (default 5)")
    parser.add_argument("--frames", type=int, default=300, help="items per client run")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    about = machine.describe()
    print(f"machine: {machine.one_line(about)}", flush=True)
    server, port = start_server(args.pipeline)
    server_ps = psutil.Process(server.pid)
    me = psutil.Process()
    totals = Totals()
    began = time.monotonic()
    deadline = began + args.minutes * 60
    samples: list[dict[str, Any]] = []
    threads = [
        threading.Thread(
            target=device,
            args=(f"soak-{i}", args.pipeline, port, args.split, args.frames, deadline, totals),
            daemon=True,
        )
        for i in range(args.devices)
    ]
    for t in threads:
        t.start()
    try:
        while time.monotonic() < deadline:
            time.sleep(args.sample_seconds)  # a benchmark's sampling period, not a race
            with totals.lock:
                items = totals.items
            samples.append(
                {
                    "seconds": round(time.monotonic() - began, 1),
                    "server": sample(server_ps),
                    "client": sample(me),
                    "items": items,
                }
            )
            print(
                f"{samples[-1]['seconds']:7.0f} s  items {items:8d}  server "
                f"{samples[-1]['server']['rss_mib']:7.1f} MiB {samples[-1]['server']['threads']:3d}"
                f" threads  client {samples[-1]['client']['rss_mib']:7.1f} MiB "
                f"{samples[-1]['client']['threads']:3d} threads",
                flush=True,
            )
        for t in threads:
            t.join(120)
    finally:
        server.terminate()
        server.wait(30)
    elapsed = time.monotonic() - began
    result: dict[str, Any] = {
        "machine": about,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "elapsed_seconds": round(elapsed, 1),
        "runs": totals.runs,
        "items": totals.items,
        "items_per_second": round(totals.items / elapsed, 1),
        "failed": totals.failed,
        "dropped": totals.dropped,
        "disconnects": totals.disconnects,
        "errors": totals.errors,
        "drift": {
            side: {key: drift(samples, side, key) for key in ("rss_mib", "threads", "fds")}
            for side in ("server", "client")
        }
        if len(samples) >= 2
        else {},
        "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Soak: {args.devices} devices, {args.pipeline} at split {args.split}, "
        f"{elapsed / 60:.1f} min",
        "",
        f"Machine: {machine.one_line(about)}.",
        "",
        f"{totals.runs} client runs, {totals.items} items ({result['items_per_second']}/s), "
        f"{totals.failed} failed, {totals.dropped} dropped, {totals.disconnects} disconnects, "
        f"{len(totals.errors)} errors.",
        "",
        "| process | measure | after warm-up (median of 2nd tenth) | end (median of last tenth) "
        "| drift |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, measures in result["drift"].items():
        for key, d in measures.items():
            lines.append(f"| {side} | {key} | {d['after_warmup']} | {d['end']} | {d['drift']:+} |")
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if totals.failed or totals.errors else 0


if __name__ == "__main__":
    sys.exit(main())
