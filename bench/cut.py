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
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

from offload import Client, ClientConfig, GrpcTransport, Limits, Pipeline
from offload._codec import CODEC_NAMES, compress_value, decode, encode, expand
from offload._device.emulation import LinkEmulator, LinkSpec
from offload._device.ledger import Ledger
from offload._pipeline import ItemContext, Status, run_tasks
from offload._wire import size_options
from offload.v1 import offload_pb2 as pb

from . import pipeline as bench_pipeline
from .compare import LIMIT, run_seed
from .pipeline import Frame
from .procs import offload_server, seed_server

LINKS = ("20mbit,30ms", "5mbit,60ms")
LIMITS = Limits(max_message_bytes=LIMIT)
COMPRESSION = ("none", "lz4", "zstd")
WINDOW = 8
# On 5 Mbit/s, 8 raw frames in flight queue 12 s of data: gRPC's keepalive pings wait behind it
# and time out (the stream resets). 4 keeps the link busy without that.
window = {"20mbit,30ms": 8, "5mbit,60ms": 4}
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
    """Notes when each item ended, for the steady rate after the first window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ends: list[float] = []

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


def _steady(ends: list[float], skip: int) -> float:
    ends = sorted(ends)[skip:]
    return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else 0.0


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
    bench_pipeline.prepare(frames, items)
    transport = GrpcTransport(target, size_options(LIMIT), 10.0)
    config = ClientConfig(
        pipeline=pipeline.name,
        local_tasks=k,
        window=window,
        device_id=f"cut-{k}",
        limits=LIMITS,
        **options,
    )
    client = _TimedClient(pipeline, config, transport)
    try:
        report = client.run()
    finally:
        transport.close()
    if report.get("error"):
        raise RuntimeError(f"offload run at K={k} failed: {report['error']}")
    ledger = client.ledger
    assert isinstance(ledger, _TimedLedger)
    report["steady_per_second"] = _steady(ledger.ends, window + 2)
    return report


def links(
    pipeline: Pipeline,
    frames: list[Frame],
    items: dict[str, int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    splits = list(range(1, len(pipeline.tasks)))
    server = offload_server()
    seed = seed_server("buffered")
    rows = []
    try:
        for k in splits:  # warm up the server (OpenCV's first calls are slow)
            run_offload(pipeline, frames, server.target, k, 12)
        # Loopback at K=1, for the trickle's cost on the server.
        for compression in COMPRESSION:
            cpu = _cpu(server.pid)
            report = run_offload(pipeline, frames, server.target, 1, 40, compression=compression)
            rows.append(
                {
                    "link": "loopback",
                    "k": 1,
                    "system": compression,
                    "per_second": round(report["steady_per_second"], 2),
                    "server_cpu_ms": round(1000 * (_cpu(server.pid) - cpu) / 40, 2),
                }
            )
            log(f"  loopback K=1 {compression}: {rows[-1]}")
        for link in LINKS:
            spec = LinkSpec.parse(link)
            proxy = LinkEmulator(server.target, spec)
            seed_proxy = LinkEmulator(f"127.0.0.1:{seed.port}", spec)
            count = items[link]
            try:
                for k in splits:
                    order = ["seed", *COMPRESSION]
                    if k % 2:
                        order.reverse()
                    for system in order:
                        cpu = _cpu(server.pid)
                        if system == "seed":
                            result = run_seed(pipeline, frames, seed_proxy.port, k, count, "seed")
                            finished = result["completed"] + result["filtered"]
                            rate = finished / result["elapsed_seconds"]
                            server_ms = None
                        else:
                            report = run_offload(
                                pipeline,
                                frames,
                                proxy.target,
                                k,
                                count,
                                window=window[link],
                                compression=system,
                            )
                            rate = report["steady_per_second"]
                            server_ms = round(1000 * (_cpu(server.pid) - cpu) / count, 2)
                        rows.append(
                            {
                                "link": link,
                                "k": k,
                                "system": system,
                                "per_second": round(rate, 2),
                                "server_cpu_ms": server_ms,
                            }
                        )
                        log(f"  {link} K={k} {system:5s} {rate:7.2f} items/s")
            finally:
                proxy.close()
                seed_proxy.close()
    finally:
        server.stop()
        seed.stop()
    return rows


def auto(
    pipeline: Pipeline,
    frames: list[Frame],
    sweep: list[dict[str, Any]],
    targets: dict[str, float],
    items: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Automatic mode's final (K, codec) on each link against the static sweep's best."""
    server = offload_server()
    rows = []
    try:
        for link, target in targets.items():
            static = [r for r in sweep if r["link"] == link and r["system"] in COMPRESSION]
            meeting = [r for r in static if r["per_second"] >= target]
            cost = {name: i for i, name in enumerate(COMPRESSION)}
            best = max(meeting, key=lambda r: (r["k"], -cost[r["system"]]), default=None)
            proxy = LinkEmulator(server.target, LinkSpec.parse(link))
            try:
                report = run_offload(
                    pipeline,
                    frames,
                    proxy.target,
                    len(pipeline.tasks) - 1,
                    items,
                    window=window[link],
                    fps=target,
                    control_period=1.0,
                )
            finally:
                proxy.close()
            scheduler = report["scheduler"]
            chose = (scheduler["final_split"], scheduler["final_codec"])
            oracle = (best["k"], best["system"]) if best else None
            rows.append(
                {
                    "link": link,
                    "target": target,
                    "chose": list(chose),
                    "oracle": list(oracle) if oracle else None,
                    "on_oracle": chose == oracle,
                    "history": [h["reason"] for h in scheduler["history"]][-4:],
                }
            )
            log(f"  {link} target {target}/s: chose {chose}, oracle {oracle}")
    finally:
        server.stop()
    return rows


def run(
    pipeline: Pipeline, frames: list[Frame], quick: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    log("  the aggregate's result, plain against packed")
    result: dict[str, Any] = {"aggregate": aggregate(2000 if quick else 20000)}
    log(f"  {result['aggregate']}")
    result["ratios"] = ratios(pipeline, frames, 10 if quick else 40)
    items = {"20mbit,30ms": 24 if quick else 40, "5mbit,60ms": 12 if quick else 20}
    result["links"] = links(pipeline, frames, items, log)
    result["auto"] = auto(
        pipeline, frames, result["links"], {"20mbit,30ms": 8.0, "5mbit,60ms": 3.0}, 90, log
    )
    return result


def render(data: dict[str, Any]) -> str:
    a = data["aggregate"]
    parts = [
        "### What crosses the cut: packed lists, compression, slow links",
        f"The aggregate's result: encode {a['plain_encode_us']} µs plain, "
        f"{a['packed_encode_us']} µs packed ({a['speedup']}x faster), {a['plain_bytes']} "
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

        parts.append(f"Items/s on {link} (offload server CPU ms per item):")
        parts.append(_table(["K", *systems], [[k, *[cell(k, s) for s in systems]] for k in ks]))
    if data.get("auto"):
        parts.append(
            _table(
                ["link", "target /s", "automatic mode ended on", "static sweep's best"],
                [[r["link"], r["target"], r["chose"], r["oracle"]] for r in data["auto"]],
            )
        )
    return "\n\n".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
