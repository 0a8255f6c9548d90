"""Issue 14, what crosses the cut: packed lists and compression, and slow links.

* ``aggregate``: encoding the demo aggregate's result (a 32-point trail) Value by Value against
  packed, and its bytes; interleaved, median of many calls.
* ``ratios``: every cut of the frames with zstd-1 and LZ4: ratio, compress and decompress ms.
* ``links``: finished items/s (completed or filtered) at every split through the device's link
  emulation (``LinkEmulator``, as ``--emulate-link``) for offload with each ``--compression``
  against the seed's pickle socket through the same emulated link, and the offload server's
  CPU per item (the trickle's cost: K=1 on the link against K=1 on loopback). Offload's rate is
  the steady one, after the first window (sent before the server said what it reads); the
  seed's is its whole run (it has no such start).
* ``auto``: automatic mode on each link, the (K, codec) it ends on against the static sweep's
  best (the largest K, then the cheapest codec, whose measured rate meets the target).
* ``slow_device``: the harder case for ``auto``: the device emulated ``SLOWDOWN`` times slower
  on the 20 Mbit/s link, a static sweep of (K, codec) there, and a target derived from it that
  K=6 misses and a lower K meets only compressed (``hard_target``).

``python -m bench.cut`` reruns the slow-device scenario alone into the cut results in ``--out``
(the other parts, and the machine line they were measured on, kept).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import psutil

from offload import Client, ClientConfig, GrpcTransport, Limits, Pipeline, load_pipeline
from offload._codec import CODEC_NAMES, compress_value, decode, encode, expand
from offload._device.emulation import LinkEmulator, LinkSpec
from offload._device.ledger import Ledger
from offload._pipeline import ItemContext, Status, run_tasks
from offload.v1 import offload_pb2 as pb

from . import machine
from . import pipeline as bench_pipeline
from .compare import LIMIT, run_seed
from .pipeline import Frame
from .procs import offload_server, seed_server

LINKS = ("20mbit,30ms", "5mbit,60ms")
LIMITS = Limits(max_message_bytes=LIMIT)
COMPRESSION = ("none", "lz4", "zstd")
WINDOW = 8  # on both links: the server's fixed receive window keeps pings in time on 5 Mbit/s
# The slow-device scenario: tasks 0-5 take ~6.5 ms of CPU per item here (capture 2.8), so
# slowed 30x K=2..6 run at 5-7/s and sending frames at K=1 beats them by ~1.8x, but over
# 20 Mbit/s only compressed (raw frames cross at 4.4/s).
SLOWDOWN = 30.0
SEPARATION = 1.2  # the oracle's rate over the target, and the target over any config preferred
TRAIL = {
    "device": "camera-1",
    "seen": 1234,
    "devices_active": 3,
    "trail": [[100 + 3 * i, 240 - 2 * i] for i in range(32)],
}


def _median_us(fn: Callable[[], Any], calls: int) -> float:
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return round(statistics.median(samples) * 1e6, 2)


def aggregate(calls: int) -> dict[str, Any]:
    """The aggregate's result: encode + serialise, plain against packed (interleaved)."""
    plain: list[float] = []
    packed: list[float] = []
    for _ in range(10):
        plain.append(_median_us(lambda: encode(TRAIL).SerializeToString(), calls // 10))
        packed.append(
            _median_us(lambda: encode(TRAIL, packed=True).SerializeToString(), calls // 10)
        )
    wire = encode(TRAIL, packed=True).SerializeToString()
    return {
        "plain_encode_us": statistics.median(plain),
        "packed_encode_us": statistics.median(packed),
        "speedup": round(statistics.median(p / q for p, q in zip(plain, packed, strict=True)), 2),
        "plain_bytes": encode(TRAIL).ByteSize(),
        "packed_bytes": len(wire),
        "packed_decode_us": _median_us(lambda: decode(pb.Value.FromString(wire)), calls),
    }


def ratios(pipeline: Pipeline, frames: list[Frame], items: int) -> list[dict[str, Any]]:
    """Each cut's serialised bytes, and what each codec makes of them (device CPU)."""
    n = len(pipeline.tasks)
    bench_pipeline.prepare(frames, items)
    raw: list[list[pb.Value]] = [[] for _ in range(n)]
    for item in range(items):
        context = ItemContext("ratios", "ratios", item, 0.0, False)
        args: Any = None
        for index in range(n - 1):
            outcome = run_tasks(pipeline, index, index + 1, args, context)
            if outcome.status is not Status.CONTINUE:
                break
            args = outcome.value
            raw[index + 1].append(encode(args, packed=True))
    rows = []
    for k in range(1, n):
        if not raw[k]:
            continue
        row: dict[str, Any] = {
            "k": k,
            "bytes": round(statistics.mean(v.ByteSize() for v in raw[k])),
        }
        for codec in (pb.CODEC_ZSTD, pb.CODEC_LZ4):
            sizes, compress_ms, decompress_ms = [], [], []
            for value in raw[k]:
                copy = pb.Value()
                copy.CopyFrom(value)
                done = compress_value(copy, codec)
                sizes.append(copy.ByteSize())
                compress_ms.append(1000 * done.seconds if done else 0.0)
                began = time.thread_time()
                expand(copy, LIMITS)
                decompress_ms.append(1000 * (time.thread_time() - began))
            name = CODEC_NAMES[codec]
            row[f"{name}_ratio"] = round(row["bytes"] / statistics.mean(sizes), 2)
            row[f"{name}_compress_ms"] = round(statistics.median(compress_ms), 3)
            row[f"{name}_decompress_ms"] = round(statistics.median(decompress_ms), 3)
        rows.append(row)
    return rows


class _TimedLedger(Ledger):
    """Notes when the first item was captured and when each item ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ends: list[float] = []
        self.first: float | None = None

    def captured(self, item: int, began: float, timings: list[tuple[int, float]]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        super().captured(item, began, timings)

    def _end(
        self,
        item: int,
        status: str,
        result: Any,
        task: int,
        error: str,
        began: float | None,
        now: float | None = None,
    ) -> bool:
        ended = super()._end(item, status, result, task, error, began, now)
        self.ends.append(time.perf_counter())
        return ended


class _TimedClient(Client):
    ledger_class = _TimedLedger


def _rate(first: float | None, ends: list[float]) -> float:
    """Items finished per second from the first capture to the last end: the seed's measure."""
    return len(ends) / (max(ends) - first) if ends and first is not None else 0.0


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_offload(
    pipeline: Pipeline,
    frames: list[Frame],
    target: str,
    k: int,
    items: int,
    window: int = WINDOW,
    **options: Any,
) -> dict[str, Any]:
    """One run through production's channel (its keepalive included) to ``target``."""
    bench_pipeline.prepare(frames, items)
    config = ClientConfig(
        pipeline=pipeline.name,
        local_tasks=k,
        window=window,
        device_id=f"cut-{k}",
        limits=LIMITS,
        **options,
    )
    transport = GrpcTransport.from_config(config, target)
    client = _TimedClient(pipeline, config, transport)
    try:
        report = client.run()
    finally:
        transport.close()
    if report.get("error"):
        raise RuntimeError(f"offload run at K={k} failed: {report['error']}")
    ledger = client.ledger
    assert isinstance(ledger, _TimedLedger)
    report["per_second"] = _rate(ledger.first, ledger.ends)
    return report


def in_view(pipeline: Pipeline, frames: list[Frame]) -> list[Frame]:
    """The frames whose item reaches the last task (the ball is seen): every item crosses the
    cut at every K. (The clip's first 27 frames have no ball: at K=5 and 6 they end on the
    device, and a run of them measures the device alone.)"""
    kept = []
    for n, frame in enumerate(frames):
        bench_pipeline.prepare([frame], 1)
        context = ItemContext("in-view", "in-view", n, 0.0, False)
        outcome = run_tasks(pipeline, 0, len(pipeline.tasks) - 1, None, context)
        if outcome.status is Status.CONTINUE:
            kept.append(frame)
    return kept


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def links(
    pipeline: Pipeline,
    frames: list[Frame],
    items: dict[str, int],
    reps: dict[str, int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every (link, K, system), ``reps`` interleaved repetitions each: medians of the finished
    items/s and of the offload server's CPU per item."""
    splits = list(range(1, len(pipeline.tasks)))
    server = offload_server()
    seed = seed_server("buffered")
    samples: dict[tuple[str, int, str], dict[str, list[float]]] = {}

    def note(link: str, k: int, system: str, rate: float, cpu: float | None, **more: float) -> None:
        row = samples.setdefault((link, k, system), {})
        for key, value in {"per_second": rate, "server_cpu_ms": cpu, **more}.items():
            if value is not None:
                row.setdefault(key, []).append(value)

    try:
        for k in splits:  # warm up the server (OpenCV's first calls are slow)
            run_offload(pipeline, frames, server.target, k, 12)
        count = items["loopback"]
        for _ in range(reps["loopback"]):  # K=1 on loopback: what an item costs the server
            for compression in COMPRESSION:
                cpu = _cpu(server.pid)
                report = run_offload(
                    pipeline, frames, server.target, 1, count, compression=compression
                )
                note("loopback", 1, compression, report["per_second"], _ms(server.pid, cpu, count))
        for link in LINKS:
            spec = LinkSpec.parse(link)
            proxy = LinkEmulator(server.target, spec)
            seed_proxy = LinkEmulator(f"127.0.0.1:{seed.port}", spec)
            try:
                for rep in range(reps[link]):
                    for k in splits:
                        # K=6 sends 8.5 kB JPEGs at 100+/s: more items, or start-up dominates.
                        count = items[link] * (5 if k == splits[-1] else 1)
                        order = ["seed", *COMPRESSION]
                        if (k + rep) % 2:
                            order.reverse()
                        for system in order:
                            cpu = _cpu(server.pid)
                            if system == "seed":
                                result = run_seed(pipeline, frames, seed_proxy.port, k, count, "s")
                                finished = result["completed"] + result["filtered"]
                                note(link, k, system, finished / result["elapsed_seconds"], None)
                            else:
                                report = run_offload(
                                    pipeline, frames, proxy.target, k, count, compression=system
                                )
                                note(
                                    link,
                                    k,
                                    system,
                                    report["per_second"],
                                    _ms(server.pid, cpu, count),
                                    disconnects=report["link"]["disconnects"],
                                )
                            rate = samples[(link, k, system)]["per_second"][-1]
                            log(f"  {link} K={k} {system:5s} {rate:7.2f} items/s")
            finally:
                proxy.close()
                seed_proxy.close()
    finally:
        server.stop()
        seed.stop()
    rows = []
    for (link, k, system), values in samples.items():
        row: dict[str, Any] = {"link": link, "k": k, "system": system}
        row.update({key: _median(v) for key, v in values.items() if key != "disconnects"})
        row.setdefault("server_cpu_ms", None)
        if "disconnects" in values:
            row["disconnects"] = int(sum(values["disconnects"]))
        row["runs"] = len(values["per_second"])
        row["samples"] = [round(v, 2) for v in values["per_second"]]  # one per repetition
        rows.append(row)
    return rows


def _ms(pid: int, before: float, items: int) -> float:
    return 1000 * (_cpu(pid) - before) / items


def oracle(sweep: list[dict[str, Any]], link: str, target: float) -> tuple[int, str] | None:
    """The static sweep's best: the largest K, then the cheapest codec, whose median rate
    meets the target (None: none does)."""
    static = [r for r in sweep if r["link"] == link and r["system"] in COMPRESSION]
    meeting = [r for r in static if r["per_second"] >= target]
    cost = {name: i for i, name in enumerate(COMPRESSION)}
    best = max(meeting, key=lambda r: (r["k"], -cost[r["system"]]), default=None)
    return (best["k"], best["system"]) if best else None


def auto(
    pipeline: Pipeline,
    frames: list[Frame],
    sweep: list[dict[str, Any]],
    targets: dict[str, float],
    runs: int,
    seconds: float,
    log: Callable[[str], None],
    slowdown: float = 1.0,
) -> list[dict[str, Any]]:
    """Automatic mode's final (K, codec) on each link, ``runs`` times, against the oracle.

    Each run starts at K=N-1 with ``--compression auto``, the linger left to the scheduler, the
    device ``slowdown`` times slower, and lasts about ``seconds`` (its items sized from the
    sweep's rate at the oracle): several control periods of 0.5 s."""
    server = offload_server()
    rows = []
    try:
        for link, target in targets.items():
            best = oracle(sweep, link, target)
            rate = next(
                (
                    r["per_second"]
                    for r in sweep
                    if best and (r["link"], r["k"], r["system"]) == (link, *best)
                ),
                target,
            )
            items = max(int(rate * seconds), 40)
            proxy = LinkEmulator(server.target, LinkSpec.parse(link))
            chosen: list[list[Any]] = []
            reasons: list[str] = []
            lingers: list[float] = []
            missed: list[dict[str, Any]] = []  # the runs off the oracle: how they went
            try:
                for _ in range(runs):
                    report = run_offload(
                        pipeline,
                        frames,
                        proxy.target,
                        len(pipeline.tasks) - 1,
                        items,
                        fps=target,
                        control_period=0.5,
                        slowdown=slowdown,
                    )
                    scheduler = report["scheduler"]
                    chosen.append([scheduler["final_split"], scheduler["final_codec"]])
                    reasons.append(scheduler["final_reason"] or "(no decision)")
                    lingers.append(scheduler["final_linger_ms"])
                    if tuple(chosen[-1]) != best:
                        missed.append(
                            {"history": scheduler["history"], "periods": scheduler["periods"]}
                        )
                    log(
                        f"  {link} {slowdown:g}x target {target}/s: chose {chosen[-1]} "
                        f"linger {lingers[-1]:g} ms, oracle {best}: {reasons[-1]}"
                    )
            finally:
                proxy.close()
            on = sum(tuple(c) == best for c in chosen)
            rows.append(
                {
                    "link": link,
                    "slowdown": slowdown,
                    "target": target,
                    "oracle": list(best) if best else None,
                    "runs": runs,
                    "items": items,
                    "on_oracle": on,
                    "fraction": round(on / runs, 2),
                    "chose": chosen,
                    "linger_ms": lingers,
                    "last_reason": reasons[-1],
                    "missed": missed,
                }
            )
    finally:
        server.stop()
    return rows


def slow_sweep(
    pipeline: Pipeline,
    frames: list[Frame],
    link: str,
    slowdown: float,
    items: int,
    reps: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Offload at every (K, codec) on ``link`` with the device ``slowdown`` times slower, ``reps``
    interleaved repetitions of ``items`` items: medians of the finished items/s."""
    splits = list(range(1, len(pipeline.tasks)))
    server = offload_server()
    proxy = LinkEmulator(server.target, LinkSpec.parse(link))
    samples: dict[tuple[int, str], list[float]] = {}
    try:
        for k in splits:  # warm up the server (OpenCV's first calls are slow)
            run_offload(pipeline, frames, server.target, k, 12)
        for rep in range(reps):
            for k in splits:
                order = list(COMPRESSION)
                if (k + rep) % 2:
                    order.reverse()
                for codec in order:
                    report = run_offload(
                        pipeline,
                        frames,
                        proxy.target,
                        k,
                        items,
                        compression=codec,
                        slowdown=slowdown,
                    )
                    samples.setdefault((k, codec), []).append(report["per_second"])
                    log(f"  {link} {slowdown:g}x K={k} {codec:5s} {report['per_second']:7.2f}/s")
    finally:
        proxy.close()
        server.stop()
    return [
        {
            "link": link,
            "k": k,
            "system": codec,
            "per_second": _median(values),
            "runs": len(values),
            "samples": [round(v, 2) for v in values],
        }
        for (k, codec), values in sorted(samples.items())
    ]


def hard_target(sweep: list[dict[str, Any]], link: str) -> float | None:
    """A target whose oracle is a lower K with a codec, clear of its neighbours (None: none).

    For each (K < N-1, codec) of the static sweep, the best rate of every configuration the
    oracle prefers to it (a larger K, or the same K with a cheaper codec): the one that beats
    those by most, by ``SEPARATION`` squared at least, gives the target between the two
    (their geometric mean), so the oracle meets it, and each preferred one misses it, by
    ``SEPARATION`` or more.
    """
    static = [r for r in sweep if r["link"] == link and r["system"] in COMPRESSION]
    cost = {name: i for i, name in enumerate(COMPRESSION)}

    def rank(r: dict[str, Any]) -> tuple[int, int]:
        return r["k"], -cost[r["system"]]

    top = max(r["k"] for r in static)
    best: tuple[float, float] | None = None  # (separation, target)
    for r in static:
        if r["k"] == top or r["system"] == "none":
            continue
        above = max((o["per_second"] for o in static if rank(o) > rank(r)), default=0.0)
        gap = r["per_second"] / above if above > 0 else math.inf
        if gap >= SEPARATION**2 and (best is None or gap > best[0]):
            best = (gap, math.sqrt(r["per_second"] * above))
    return round(best[1], 2) if best else None


def slow_device(
    pipeline: Pipeline, frames: list[Frame], quick: bool, runs: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The slow device on the 20 Mbit/s link: the sweep, the target it gives, and ``auto``."""
    link = LINKS[0]
    sweep = slow_sweep(
        pipeline, frames, link, SLOWDOWN, 16 if quick else 30, 1 if quick else 3, log
    )
    target = hard_target(sweep, link)
    log(f"  slow device: target {target}/s, oracle {target and oracle(sweep, link, target)}")
    result: dict[str, Any] = {"slowdown": SLOWDOWN, "link": link, "sweep": sweep, "target": target}
    if target is not None:
        result["auto"] = auto(
            pipeline, frames, sweep, {link: target}, runs, 10.0, log, slowdown=SLOWDOWN
        )
    return result


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's slow-link goals, each with its ratio in this run and its floor."""
    rows = {(r["link"], r["k"], r["system"]): r for r in data["links"]}
    out = []
    link = LINKS[0]
    for k in sorted({r["k"] for r in data["links"] if r["link"] == link}):
        seed, ours = rows.get((link, k, "seed")), rows.get((link, k, "zstd"))
        if seed and ours and min(seed["samples"]) > 0:
            floor = 1.0 if k == max(r["k"] for r in data["links"]) else 3.0
            # The median of each repetition's ratio: the two ran next to each other.
            pairs = zip(ours["samples"], seed["samples"], strict=True)
            ratio = statistics.median(a / b for a, b in pairs)
            out.append(_goal(f"items/s on {link} at K={k}, zstd / socket", ratio, floor, ">="))
    for codec in ("zstd", "none"):
        slow, fast = rows.get((link, 1, codec)), rows.get(("loopback", 1, codec))
        if slow and fast and fast["server_cpu_ms"]:
            ratio = slow["server_cpu_ms"] / fast["server_cpu_ms"]
            name = f"server CPU per item at K=1 on {link} / loopback, {codec}"
            out.append(_goal(name, ratio, 1.5, "<="))
    slow = data.get("slow_device", {}).get("auto", [])
    for row in [*data.get("auto", []), *slow]:
        device = f", device {row['slowdown']:g}x slower" if row.get("slowdown", 1) != 1 else ""
        name = f"automatic mode on the oracle {row['oracle']}, {row['link']}{device}"
        out.append(_goal(name, row["fraction"], 0.95, ">="))
    for link in LINKS:
        drops = sum(r.get("disconnects", 0) for r in data["links"] if r["link"] == link)
        out.append(_goal(f"streams reset on {link} (window {WINDOW})", drops, 0, "<="))
    return out


def _goal(name: str, value: float, floor: float, sense: str) -> dict[str, Any]:
    met = value >= floor if sense == ">=" else value <= floor
    return {"goal": name, "value": round(value, 2), "floor": f"{sense} {floor:g}", "met": met}


def run(
    pipeline: Pipeline, frames: list[Frame], quick: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    log("  the aggregate's result, plain against packed")
    result: dict[str, Any] = {"aggregate": aggregate(2000 if quick else 20000)}
    log(f"  {result['aggregate']}")
    frames = in_view(pipeline, frames)
    log(f"  {len(frames)} frames with the ball in view")
    result["ratios"] = ratios(pipeline, frames, 10 if quick else 40)
    items = {"loopback": 40, "20mbit,30ms": 24 if quick else 40, "5mbit,60ms": 12 if quick else 20}
    reps = {"loopback": 1 if quick else 3, "20mbit,30ms": 1 if quick else 5, "5mbit,60ms": 1}
    result["links"] = links(pipeline, frames, items, reps, log)
    result["auto"] = auto(
        pipeline,
        frames,
        result["links"],
        {"20mbit,30ms": 8.0, "5mbit,60ms": 3.0},
        2 if quick else 10,
        4.0,
        log,
    )
    result["slow_device"] = slow_device(pipeline, frames, quick, 2 if quick else 10, log)
    result["goals"] = goals(result)
    for goal in result["goals"]:
        log(f"  goal {goal}")
    return result


def render(data: dict[str, Any]) -> str:
    a = data["aggregate"]
    parts = [
        "### What crosses the cut: packed lists, compression, slow links",
        f"The aggregate's result: encode {a['plain_encode_us']:.1f} µs plain, "
        f"{a['packed_encode_us']:.1f} µs packed ({a['speedup']}x faster), {a['plain_bytes']} "
        f"against {a['packed_bytes']} bytes.",
        _table(
            ["K", "bytes", "zstd ratio", "zstd ms", "zstd dec ms", "lz4 ratio", "lz4 ms"],
            [
                [
                    r["k"],
                    f"{r['bytes']:,}",
                    r["zstd_ratio"],
                    r["zstd_compress_ms"],
                    r["zstd_decompress_ms"],
                    r["lz4_ratio"],
                    r["lz4_compress_ms"],
                ]
                for r in data["ratios"]
            ],
        ),
    ]
    for link in ("loopback", *LINKS):
        rows = [r for r in data["links"] if r["link"] == link]
        ks = sorted({r["k"] for r in rows})
        systems = [s for s in ("seed", *COMPRESSION) if any(r["system"] == s for r in rows)]

        def cell(k: int, system: str, rows: list[dict[str, Any]] = rows) -> str:
            r = next((r for r in rows if r["k"] == k and r["system"] == system), None)
            if r is None:
                return "-"
            cpu = f" ({r['server_cpu_ms']} ms)" if r["server_cpu_ms"] is not None else ""
            return f"{r['per_second']}{cpu}"

        runs = max((r["runs"] for r in rows), default=0)
        parts.append(
            f"Finished items/s on {link}, median of {runs} (offload server CPU ms per item):"
        )
        parts.append(_table(["K", *systems], [[k, *[cell(k, s) for s in systems]] for k in ks]))
    slow = data.get("slow_device")
    if slow:
        parts.append(_slow_table(slow))
    autos = [*data.get("auto", []), *(slow or {}).get("auto", [])]
    if autos:
        parts.append(
            _table(
                [
                    *["link", "device", "target /s", "static sweep's best", "runs on it"],
                    *["linger ms", "last reason"],
                ],
                [
                    [
                        r["link"],
                        f"{r['slowdown']:g}x slower" if r.get("slowdown", 1) != 1 else "as it is",
                        r["target"],
                        r["oracle"],
                        f"{r['on_oracle']}/{r['runs']}",
                        ", ".join(f"{v:g}" for v in sorted(set(r.get("linger_ms", [])))) or "-",
                        r["last_reason"],
                    ]
                    for r in autos
                ],
            )
        )
    if data.get("goals"):
        parts.append(
            _table(
                ["goal", "this run", "floor", "met"],
                [
                    [g["goal"], g["value"], g["floor"], "yes" if g["met"] else "NO"]
                    for g in data["goals"]
                ],
            )
        )
    return "\n\n".join(parts)


def _slow_table(slow: dict[str, Any]) -> str:
    rows = slow["sweep"]
    ks = sorted({r["k"] for r in rows})
    rate = {(r["k"], r["system"]): r["per_second"] for r in rows}
    runs = max((r["runs"] for r in rows), default=0)
    measured = (
        f" (measured apart: {machine.one_line(slow['machine'])})" if "machine" in slow else ""
    )
    head = (
        f"The slow device: {slow['slowdown']:g}x slower on {slow['link']}, offload's finished "
        f"items/s, median of {runs}{measured}; the target derived from it: {slow['target']}/s "
        "(the oracle meets it, every configuration preferred to the oracle misses it, each by "
        f"{SEPARATION}x or more):"
    )
    table = [[k, *[rate.get((k, c), "-") for c in COMPRESSION]] for k in ks]
    return head + "\n\n" + _table(["K", *COMPRESSION], table)


def plot(out: Path, data: dict[str, Any]) -> list[str]:
    """Items/s per K on each link, every system, and each goal's ratio against its floor."""
    slow = data.get("slow_device")
    panels: list[tuple[str, list[dict[str, Any]]]] = [
        (link, [r for r in data["links"] if r["link"] == link]) for link in LINKS
    ]
    if slow:
        panels.append((f"{slow['link']}, device {slow['slowdown']:g}x slower", slow["sweep"]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * len(panels) + 5, 4))
    for ax, (title, rows) in zip(axes, panels, strict=False):
        ks = sorted({r["k"] for r in rows})
        width = 0.2
        for i, system in enumerate(("seed", *COMPRESSION)):
            if not any(r["system"] == system for r in rows):
                continue
            values = [
                next((r["per_second"] for r in rows if r["k"] == k and r["system"] == system), 0)
                for k in ks
            ]
            label = "pickle socket" if system == "seed" else f"offload {system}"
            ax.bar([k + (i - 1.5) * width for k in ks], values, width, label=label, color=f"C{i}")
        ax.set_yscale("log")
        ax.set_xlabel("split K")
        ax.set_ylabel("finished items/s")
        if slow and rows is slow["sweep"] and slow.get("target"):
            ax.axhline(slow["target"], color="k", linestyle="--", label="automatic mode's target")
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax = axes[-1]
    ratios = [g for g in data.get("goals", []) if g["floor"].split()[-1] not in ("0",)]
    names = [str(i + 1) for i in range(len(ratios))]
    ax.bar(names, [g["value"] for g in ratios], color=["g" if g["met"] else "r" for g in ratios])
    ax.scatter(names, [float(g["floor"].split()[-1]) for g in ratios], marker="_", s=400, c="k")
    ax.set_title("goals (numbered as in the table; black: floor)")
    fig.tight_layout()
    fig.savefig(out / "cut.png", dpi=100)
    return ["cut.png"]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Rerun the slow-device scenario alone into ``--out``'s cut.json, then its summary."""
    from .run import RESULTS, rewrite_report  # noqa: PLC0415 - bench.run imports this module

    parser = argparse.ArgumentParser(prog="python -m bench.cut", description=main.__doc__)
    parser.add_argument("--source", default="webcam", help="synthetic, webcam or a file")
    parser.add_argument("--out", type=Path, default=RESULTS / "issue14")
    parser.add_argument("--runs", type=int, default=10, help="automatic-mode runs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few items, 1 rep")
    args = parser.parse_args(argv)
    path = args.out / "cut.json"
    if not path.exists():
        print(
            f"error: no {path}; run `python -m bench --only cut --out {args.out}`", file=sys.stderr
        )
        return 1
    data = json.loads(path.read_text())
    pipeline = load_pipeline(bench_pipeline.NAME)
    frames = in_view(pipeline, bench_pipeline.render(args.source, 120))
    about = machine.describe()
    began = time.perf_counter()
    slow = slow_device(pipeline, frames, args.quick, args.runs, print)
    about["seconds"] = round(time.perf_counter() - began, 1)
    data["slow_device"] = {"machine": about, **slow}
    data["goals"] = goals(data)
    for goal in data["goals"]:
        print(f"  goal {goal}")
    path.write_text(json.dumps(data, indent=1) + "\n")
    return rewrite_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
