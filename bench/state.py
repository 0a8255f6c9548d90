"""The state store's cost: items/s and cloud CPU per item with 1, 2 and 3 replicas on one Redis,
against one replica with the in-memory store (the baseline, same run, interleaved), and Redis'
own cost per item (CPU, commands, bytes in).

64 devices (``bench.load`` streams, K = 1: the replicas run tasks 1-6 of the ball tracker, whose
aggregate keeps its state in the store) are spread evenly over the replicas.
``python -m bench.state`` (``make bench``) writes ``bench/results/state.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from . import machine
from .procs import ServerProcess, offload_server
from .scaling import load

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("memory-1", "redis-1", "redis-2", "redis-3")


class Redis:
    """A redis-server on a free loopback port, without persistence (its CPU is measured)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("error: bench.state needs redis-server (apt-get install redis-server)")
        with socket.socket() as probe:  # a port free a moment ago
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def counters(self) -> dict[str, float]:
        times = psutil.Process(self.process.pid).cpu_times()
        stats = self.client.info("stats")
        return {
            "cpu": times.user + times.system,
            "commands": float(stats["total_commands_processed"]),
            "bytes_in": float(stats["total_net_input_bytes"]),
        }

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)


def _cpu(servers: list[ServerProcess]) -> float:
    total = 0.0
    for server in servers:
        times = psutil.Process(server.pid).cpu_times()
        total += times.user + times.system
    return total


def measure(config: str, store: Redis, devices: int, items: int, rep: int) -> dict[str, Any]:
    kind, count = config.split("-")
    options = ("--state", store.url) if kind == "redis" else ()
    servers = [offload_server(extra=options) for _ in range(int(count))]
    try:
        for server in servers:
            load(server.target, 2, 5, 4, None, f"warm-{config}-{rep}-{server.port}")
        cpu_before, redis_before = _cpu(servers), store.counters()
        results: list[dict[str, Any]] = []
        began = time.perf_counter()

        def drive(index: int, server: ServerProcess) -> None:
            streams = devices // len(servers) + (index < devices % len(servers))
            prefix = f"{config}-{rep}-{index}"
            results.append(load(server.target, streams, items, 4, None, prefix))

        threads = [threading.Thread(target=drive, args=p) for p in enumerate(servers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        cpu = _cpu(servers) - cpu_before
        after = store.counters()
    finally:
        for server in servers:
            server.stop()
    answered = sum(r["answered"] for r in results)
    per_item = {k: (after[k] - redis_before[k]) / max(1, answered) for k in after}
    return {
        "config": config,
        "rep": rep,
        "answered": answered,
        "errors": sum(r["errors"] for r in results),
        "items_per_second": round(answered / elapsed, 1),
        "cloud_cpu_ms_per_item": round(1000 * cpu / max(1, answered), 3),
        "redis_cpu_ms_per_item": round(1000 * per_item["cpu"], 4) if kind == "redis" else 0.0,
        "redis_commands_per_item": round(per_item["commands"], 2) if kind == "redis" else 0.0,
        "redis_bytes_in_per_item": round(per_item["bytes_in"]) if kind == "redis" else 0,
    }


def table(runs: list[dict[str, Any]]) -> str:
    keys = [
        ("items_per_second", "items/s"),
        ("cloud_cpu_ms_per_item", "replicas' CPU ms/item"),
        ("redis_cpu_ms_per_item", "Redis CPU ms/item"),
        ("redis_commands_per_item", "Redis commands/item (in scripts too)"),
        ("redis_bytes_in_per_item", "bytes to Redis/item"),
    ]
    lines = [
        "| config | " + " | ".join(label for _, label in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        if mine:
            cells = [f"{statistics.median(r[k] for r in mine):g}" for k, _ in keys]
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    rates = [
        statistics.median(r["items_per_second"] for r in runs if r["config"] == c) for c in configs
    ]
    cpus = [
        statistics.median(r["cloud_cpu_ms_per_item"] for r in runs if r["config"] == c)
        for c in configs
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(configs, rates)
    left.set_ylabel("items/s (64 devices)")
    right.bar(configs, cpus, color="tab:orange")
    right.set_ylabel("replicas' CPU ms per item")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--items", type=int, default=20, help="items per device")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        store = Redis(Path(directory))
        try:
            for rep in range(args.reps):
                for config in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:  # interleaved
                    result = measure(config, store, args.devices, args.items, rep)
                    runs.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            store.stop()
    about = machine.describe()
    (args.out / "state.json").write_text(json.dumps({"machine": about, "runs": runs}, indent=1))
    summary = (
        f"# The state store's cost\n\n{args.devices} devices, {args.items} items each, K = 1, "
        f"median of {args.reps} interleaved repetitions; {machine.one_line(about)}\n\n"
        f"{table(runs)}\n"
    )
    (args.out / "state.md").write_text(summary)
    plot(runs, args.out / "state.png")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
