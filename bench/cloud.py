"""Cloud CPU per item at every split, several ways on the same items, in one run.

``offload``: offload's server behind its device transport, which batches (``ExecuteBatches``,
up to 8 items a message, linger 0); ``offload-linger25``: the same with ``--linger-ms 25`` (at
K = 6); ``unbatched``: the same server and transport with one item per message
(``--batch-items 1``, ``ExecuteRemaining``), the baseline; ``seed``: the seed's pickle over TCP
(``bench.seed``, fire-and-forget, its server running the same remaining tasks); ``floor``: a
bare gRPC Python server that answers each message of the same batches (the same client stream
and batching; ``floor-linger25`` beside ``offload-linger25``) with one empty answer per item,
running no task: what gRPC Python itself costs.

Each item is the bench pipeline's output of tasks [0, K) on the same frames, cut beforehand, so
the device side only sends. ``busy``: as fast as a window of 8 allows; ``paced``: one item
every 1/``--pace`` seconds, as a device would send them (caches go cold between items). Device
pinned to CPU 0, servers to CPU 1 (when there are two). Servers' CPU is read from /proc.

``--profile``: the server's Python threads sampled by py-spy at K = 6, busy, batched; their
samples grouped by where the time goes, per item (``bench/results/profile.md``).

``python -m bench.cloud [--items N] [--reps R] [--pace HZ] [--profile]``; results in
``bench/results/cloud.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import psutil

from offload import load_pipeline
from offload._codec import READS, encode_into
from offload._device.transport import Batching, GrpcTransport, Stream
from offload._pipeline import ItemContext, Pipeline, Status, run_tasks
from offload._wire import size_options
from offload.v1 import offload_pb2 as pb

from . import machine, procs, seed
from . import pipeline as bench_pipeline
from .procs import ServerProcess, offload_server, seed_server

LIMIT = 16 * 1024 * 1024
OUT = procs.ROOT / "bench" / "results"
WINDOW = 8
_FLOOR = """
import sys
from concurrent import futures
import grpc
from offload import _batch
EMPTY = b"\\x0a\\x00"  # one empty ItemResult in a ResultBatch
def handler(requests, context):
    for data in requests:
        yield EMPTY * sum(1 for _ in _batch.split(data))
server = grpc.server(futures.ThreadPoolExecutor(8),
                     options=[("grpc.max_receive_message_length", LIMIT)])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "offload.v1.Offload", {"ExecuteBatches": grpc.stream_stream_rpc_method_handler(handler)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"listening on 127.0.0.1:{port}", flush=True)
server.wait_for_termination()
""".replace("LIMIT", str(LIMIT))


def cut(pipeline: Pipeline, frames: list[bench_pipeline.Frame], k: int, items: int) -> list[Any]:
    """The values tasks [0, k) give for ``items`` frames (items they filter send nothing)."""
    bench_pipeline.prepare(frames, items)
    values = []
    for item in range(items):
        context = ItemContext("cut", "cut", item, 0.0, on_server=False)
        outcome = run_tasks(pipeline, 0, k, None, context)
        if outcome.status is Status.CONTINUE:
            values.append(outcome.value)
    return values


_LIBC = ctypes.CDLL(None, use_errno=True)


def _cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` so far, every thread's (those ended too), to the
    nanosecond: /proc's user and system times count in 10 ms ticks, coarser than a run."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return time.clock_gettime(clock.value)


def _paced(send: Callable[[bytes], None], payloads: list[bytes], pace: float | None) -> None:
    began = time.perf_counter()
    for n, data in enumerate(payloads):
        if pace:
            delay = began + n / pace - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        send(data)


def _through(stream: Stream, payloads: list[bytes], pace: float | None) -> None:
    """Send over ``stream`` within a window of 8, reading every answer."""
    credits = threading.Semaphore(WINDOW)

    def read() -> None:
        for _ in stream.results():
            credits.release()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def send(data: bytes) -> None:
        credits.acquire()
        stream.send_bytes(data)

    _paced(send, payloads, pace)
    stream.close()
    reader.join()


def _states(pipeline: Pipeline, k: int, values: list[Any], run: str) -> list[bytes]:
    out = []
    for item, value in enumerate(values):
        state = pb.TaskState(
            pipeline=pipeline.name,
            fingerprint=pipeline.fingerprint,
            device_id="bench-cloud",
            run_id=run,
            item=item,
            next_task=k,
            capture_time=time.time(),
            accepts=READS,  # as the device says: packed and compressed answers welcome
        )
        encode_into(state.args, value, packed=True)  # the device packs for a server that reads it
        out.append(state.SerializeToString())
    return out


def _grpc(
    target: str, payloads: list[bytes], pace: float | None, linger: float, batch: int = WINDOW
) -> None:
    transport = GrpcTransport(
        target, size_options(LIMIT), 10.0, batching=Batching(batch, 1 << 20, linger)
    )
    try:
        _through(transport.open_stream(), payloads, pace)
    finally:
        transport.close()


def _seed(port: int, payloads: list[bytes], pace: float | None) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send(payload: bytes) -> None:
            conn.sendall(seed.HEADER.pack(len(payload)))
            conn.sendall(payload)

        _paced(send, payloads, pace)
        conn.sendall(seed.HEADER.pack(seed.END))
        conn.makefile("rb").readline()  # the server has run every item


def _systems(k: int, baseline: bool = False) -> list[str]:
    lingering = ["offload-linger25", "floor-linger25"] if k == 6 else []
    if baseline:
        lingering += ["baseline-linger25"] if k == 6 else []
        lingering.append("baseline")
    return ["offload", "unbatched", "seed", "floor", *lingering]


def run(
    pipeline: Pipeline,
    frames: list[bench_pipeline.Frame],
    splits: list[int],
    items: int,
    reps: int,
    pace: float,
    log: Callable[[str], None],
    baseline: Path | None = None,
) -> dict[str, Any]:
    cuts = {k: cut(pipeline, frames, k, items) for k in splits}
    servers = {
        "offload": offload_server(),
        "seed": seed_server("buffered"),
        "floor": ServerProcess(["-c", _FLOOR]),
    }
    servers["offload-linger25"] = servers["unbatched"] = servers["offload"]
    servers["floor-linger25"] = servers["floor"]
    if baseline is not None:
        servers["baseline"] = servers["baseline-linger25"] = offload_server(root=baseline)
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(-1, reps):  # rep -1 warms every server up (OpenCV's first calls)
            for k in splits:
                values = cuts[k] if rep >= 0 else cuts[k][:20]
                for mode, rate in (("busy", None), ("paced", pace)):
                    systems = _systems(k, baseline is not None)
                    shift = max(rep, 0) % len(systems)
                    for system in systems[shift:] + systems[:shift]:  # who goes first rotates
                        server = servers[system]
                        run_id = f"{system}-{rep}-{k}-{mode}"
                        if system == "seed":
                            payloads = [
                                pickle.dumps((k, "bench-cloud", i, time.time(), v), protocol=5)
                                for i, v in enumerate(values)
                            ]
                        else:
                            payloads = _states(pipeline, k, values, run_id)
                        before = _cpu(server.pid)
                        began = time.perf_counter()
                        if system == "seed":
                            _seed(server.port, payloads, rate)
                        else:
                            linger = 0.025 if system.endswith("-linger25") else 0.0
                            batch = 1 if system == "unbatched" else WINDOW
                            _grpc(server.target, payloads, rate, linger, batch)
                        elapsed = time.perf_counter() - began
                        if rep < 0:
                            continue
                        record = {
                            "system": system,
                            "k": k,
                            "mode": mode,
                            "rep": rep,
                            "items": len(payloads),
                            "server_cpu_ms": 1000 * (_cpu(server.pid) - before) / len(payloads),
                            "items_per_second": len(payloads) / elapsed,
                        }
                        runs.append(record)
                        log(
                            f"  rep {rep} K={k} {mode:5s} {system:16s} server "
                            f"{record['server_cpu_ms']:.3f} ms/item"
                        )
    finally:
        for server in {id(s): s for s in servers.values()}.values():
            server.stop()
    rows = _rows(runs, baseline is not None)
    return {"items": items, "pace": pace, "window": WINDOW, "rows": rows, "runs": runs}


def _rows(runs: list[dict[str, Any]], baseline: bool = False) -> list[dict[str, Any]]:
    """Per (K, mode): each system's median, and offload's ratios to the seed and the floor as
    the median of per-repetition ratios (each pair run back to back)."""
    rows = []
    for k in sorted({r["k"] for r in runs}):
        for mode in ("busy", "paced"):
            mine = {
                (r["system"], r["rep"]): r["server_cpu_ms"]
                for r in runs
                if r["k"] == k and r["mode"] == mode
            }
            reps = sorted({rep for _, rep in mine})
            row: dict[str, Any] = {"k": k, "mode": mode}
            for system in _systems(k, baseline):
                row[system] = round(statistics.median(mine[system, rep] for rep in reps), 4)
            bases = ("seed", "floor", "unbatched", "floor-linger25", "baseline")
            for system in ("offload", "offload-linger25", "baseline-linger25"):
                if system in row:
                    for base in (*bases, "baseline-linger25"):
                        if base not in row or base == system:
                            continue
                        ratios = [mine[system, rep] / mine[base, rep] for rep in reps]
                        row[f"{system}/{base}"] = round(statistics.median(ratios), 2)
            rows.append(row)
    return rows


def table(data: dict[str, Any]) -> str:
    header = ["K", "mode", "offload", "unbatched", "seed", "floor", "offload / unbatched"]
    header += ["offload / seed", "offload / floor", "linger 25", "linger 25 / seed"]
    header += ["floor, linger 25", "linger 25 / floor, linger 25"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in data["rows"]:
        cells = [row["k"], row["mode"], row["offload"], row["unbatched"], row["seed"]]
        cells += [row["floor"], row["offload/unbatched"], row["offload/seed"], row["offload/floor"]]
        cells += [row.get("offload-linger25", ""), row.get("offload-linger25/seed", "")]
        cells += [row.get("floor-linger25", ""), row.get("offload-linger25/floor-linger25", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def baseline_table(data: dict[str, Any]) -> str:
    """offload against another checkout's server (``--baseline``), same items, same run."""
    header = ["K", "mode", "offload", "baseline", "offload / baseline", "offload / seed"]
    header += ["baseline / seed", "linger 25 / baseline linger 25", "linger 25 / seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in data["rows"]:
        cells = [row["k"], row["mode"], row["offload"], row["baseline"], row["offload/baseline"]]
        cells += [row["offload/seed"], round(row["baseline"] / row["seed"], 2)]
        cells += [row.get("offload-linger25/baseline-linger25", "")]
        cells += [row.get("offload-linger25/seed", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plot(data: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, mode in zip(axes, ("busy", "paced"), strict=True):
        rows = [r for r in data["rows"] if r["mode"] == mode]
        for system in ("offload", "unbatched", "seed", "floor"):
            axis.plot([r["k"] for r in rows], [r[system] for r in rows], marker="o", label=system)
        linger = [r for r in rows if "offload-linger25" in r]
        axis.plot(
            [r["k"] for r in linger],
            [r["offload-linger25"] for r in linger],
            "s",
            label="offload, linger 25 ms",
        )
        pace = f"{data['pace']:g} items/s"
        axis.set_title(f"{mode} ({'window 8' if mode == 'busy' else pace})")
        axis.set_xlabel("K (tasks on the device)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("server CPU ms per item")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the profile ------------------------------------------------------------------------------

# Where a sample's time goes: the first of these categories with a function on the sample's
# stack (so the more specific come first: the state API's encoding before the codec it calls,
# the tasks after the state API they call); time in C (protobuf's) counts for its caller.
_CATEGORIES = {
    "the device state: decoded, encoded, committed (the task's state API)": (
        "decode_state",
        "encode_state",
        "changes",
        "apply",
        "_commit",
        "mark",
        "count",
        "publish",
    ),
    "the answer's Value, built from Python objects": ("encode_result",),
    "the answer encoded (once), its size checked": ("_encoded",),
    "the item's arguments checked and decoded": ("expand", "decode", "arity_error"),
    "items checked on the wire, parsed (protobuf)": ("_parse",),
    "metrics": ("observe",),
    "tasks": ("run_tasks",),
    "batch framing and the stamps": ("split", "join", "stamped", "with_cpu"),
    "validation, de-duplication": ("validate", "_answers_for", "_account"),
    "the result message assembled (task times, CPU)": ("_result", "_run_and_commit", "_run"),
    "the executor's and servicer's own lines": ("_answer", "execute_encoded", "_serve"),
    "read-ahead thread (a hand-over per message)": ("_read_ahead",),
}
_OURS = ("offload/", "bench/", "examples/")


def _category(stack: str) -> str:
    functions = set()
    grpc_frames = False
    for frame in stack.split(";"):
        function, _, where = frame.partition(" (")
        if where.startswith(_OURS):
            functions.update(function.split("."))  # a method, a function and its closures
        grpc_frames = grpc_frames or "grpc/" in where
    for name, members in _CATEGORIES.items():
        if not functions.isdisjoint(members):
            return name
    return "gRPC Python (its server loop, sending, receiving)" if grpc_frames else "other Python"


def profile(
    pipeline: Pipeline,
    frames: list[bench_pipeline.Frame],
    items: int,
    log: Callable[[str], None],
    k: int = 6,
) -> dict[str, Any]:
    """py-spy on the offload server while it serves ``items`` items at K = ``k``, busy."""
    values = cut(pipeline, frames, k, items)
    server = offload_server()
    rate = 1000
    try:
        _grpc(server.target, _states(pipeline, k, values[:50], "warm-up"), None, 0.0)
        payloads = _states(pipeline, k, values, "profiled")
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "raw.txt"
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--gil",  # the thread holding the GIL: Python's CPU, not its waits
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # py-spy attaches
            before = _cpu(server.pid)
            _grpc(server.target, payloads, None, 0.0)
            cpu = _cpu(server.pid) - before
            spy.send_signal(signal.SIGINT)
            _, errors = spy.communicate(timeout=60)
            if not raw.exists():
                raise RuntimeError(f"py-spy wrote no profile: {errors.decode().strip()}")
            samples: Counter[str] = Counter()
            stacks: dict[str, Counter[str]] = {}  # each category's innermost frames
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue  # a line py-spy cut short as it stopped
                category = _category(stack)
                samples[category] += int(count)
                inner = ";".join(stack.split(";")[-3:])
                stacks.setdefault(category, Counter())[inner] += int(count)
    finally:
        server.stop()
    n = len(payloads)
    total = 1e6 * cpu / n
    sampled = sum(samples.values())
    # Samples of the thread holding the GIL, as shares of the CPU the server process measured;
    # gRPC's C-core threads (no GIL) are part of that CPU too, so the shares are an upper bound.
    per_item = {name: round(total * c / sampled, 1) for name, c in samples.most_common()}
    log(f"  profile: {total:.0f} us/item server CPU, {sampled} samples")
    return {
        "items": n,
        "rate_hz": rate,
        "samples": sampled,
        "server_cpu_us_per_item": round(total, 1),
        "us_per_item": per_item,
        "stacks": {name: stacks[name].most_common(8) for name, _ in samples.most_common()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cloud", description=__doc__)
    parser.add_argument("--items", type=int, default=200, help="items per run (default 200)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--pace", type=float, default=300.0, help="paced items/s (default 300)")
    parser.add_argument("--splits", default="1,2,3,4,5,6", help="K values (default 1..6)")
    parser.add_argument("--source", default="webcam", help="synthetic, webcam or a video file")
    parser.add_argument("--profile", action="store_true", help="only the py-spy profile")
    parser.add_argument("--profile-split", type=int, default=6, help="K profiled (default 6)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--baseline", type=Path, help="also run the offload server of this checkout (a commit)"
    )
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    described = machine.describe()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})  # the device side; servers on CPU 1
        procs.SERVER_CPUS = {1}
        described["pinned"] = True
    pipeline = load_pipeline(bench_pipeline.NAME)
    frames = bench_pipeline.render(args.source, 120)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        k = args.profile_split
        result = profile(pipeline, frames, args.items if k < 6 else max(args.items, 5000), log, k)
        result["machine"] = described
        name = "profile" if k == 6 else f"profile-k{k}"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = ["| where | µs per item |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in result["us_per_item"].items()]
        lines.append(f"| **server CPU per item (measured)** | {result['server_cpu_us_per_item']} |")
        text = f"# Server profile at K = {k}, busy, batched\n\n{machine.one_line(described)}\n\n"
        (args.out / f"{name}.md").write_text(text + "\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    splits = [int(k) for k in args.splits.split(",")]
    data = run(pipeline, frames, splits, args.items, args.reps, args.pace, log, args.baseline)
    data["machine"] = described
    (args.out / "cloud.json").write_text(json.dumps(data, indent=1) + "\n")
    text = (
        "# Cloud CPU per item (server ms per item; medians, ratios of back-to-back pairs)\n\n"
        f"{machine.one_line(described)}; {args.items} items per run, {args.reps} repetitions, "
        f"paced at {args.pace:g} items/s, window {WINDOW}, batches of up to {WINDOW}\n\n"
    )
    (args.out / "cloud.md").write_text(text + table(data) + "\n")
    _plot(data, args.out / "cloud.png")
    print(table(data))
    if args.baseline is not None:
        (args.out / "cloud-baseline.md").write_text(text + baseline_table(data) + "\n")
        print(baseline_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
