"""``make bench`` / ``python -m bench``: run every section, write ``bench/results/``.

Sections (``--only`` picks some): ``compare`` (offload vs the seed's wire approach vs the 2019
prototype's receiver at every split, and achieved / bottleneck bound), ``window`` (window sweep
through offload's link emulation at 200mbit,30ms), ``codec`` (encode + decode vs pickle vs
memcpy), ``transport`` (CPU per item of the transport alone: bare gRPC, offload, the seed),
``scaling`` (1-64 concurrent streams against each server concurrency model). Every comparison
runs both sides in the same run, interleaved, on the same pre-rendered frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from offload import load_pipeline
from offload._allocator import keep_large_buffers

from . import codec, compare, cut, machine, procs, report, scaling, transport, window
from . import pipeline as bench_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("compare", "window", "codec", "transport", "scaling", "cut")


def log(message: str) -> None:
    print(message, flush=True)


def rewrite_report(out: Path) -> int:
    """The summary and plots of every section's latest results in ``out``."""
    results = {
        name: json.loads(path.read_text())
        for name in SECTIONS
        if (path := out / f"{name}.json").exists()
    }
    if not results:
        print(f"error: no results in {out}; run `make bench` first", file=sys.stderr)
        return 1
    print(report.write(out, results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each comparison")
    parser.add_argument("--items", type=int, default=300, help="items per device run")
    parser.add_argument("--source", default="synthetic", help="synthetic, webcam or a file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few items, 1 rep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--pin-cores",
        action="store_true",
        help="device side on CPU 0, servers on CPU 1, as on two machines (default: both share "
        "every core); write to another --out",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the summary and plots from the JSON files in --out",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return rewrite_report(args.out)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.reps, args.items = 1, 60
    if args.pin_cores:
        if len(os.sched_getaffinity(0)) < 2:
            parser.error("--pin-cores needs 2 CPUs: one for the device side, one for the servers")
        # Before any thread exists: the threads this process starts later inherit it.
        os.sched_setaffinity(0, {0})
        procs.SERVER_CPUS = {1}
    # The same allocator tuning the offload client CLI and server use (see offload/_allocator.py).
    keep_large_buffers()
    args.out.mkdir(parents=True, exist_ok=True)
    about = machine.describe()
    about["pinned"] = args.pin_cores
    log(f"machine: {machine.one_line(about)}")
    pipeline = load_pipeline(bench_pipeline.NAME)
    frames = bench_pipeline.render(args.source, 120)
    log(f"frames: {len(frames)} from {args.source}, {frames[0].shape}")
    began = time.perf_counter()
    results: dict[str, Any] = {}
    splits = list(range(1, len(pipeline.tasks)))
    # The codec first: its microbenchmark is sensitive to the heap left by other sections.
    if "codec" in only:
        log("== codec")
        results["codec"] = codec.run(pipeline, frames, 50 if args.quick else 400)
    if "compare" in only:
        log("== against the seed's wire approach and the bottleneck bound (no emulation)")
        results["compare"] = compare.run(
            pipeline,
            frames,
            splits,
            args.reps,
            args.items,
            8,
            log,
        )
    if "window" in only:
        log("== window sweep through an emulated link: 200 Mbit/s, 30 ms round trip")
        results["window"] = window.run(
            pipeline,
            frames,
            [1, 6],
            [1, 2, 4, 8, 16],
            "200mbit,30ms",
            max(1, args.reps - 2),
            args.items,
            log,
        )
    if "transport" in only:
        log("== transport alone: gRPC's floor, offload, the seed")
        results["transport"] = transport.run(
            pipeline, [21_075, 562_625], 300 if args.quick else 1500, min(args.reps, 3), log
        )
    if "scaling" in only:
        log("== server scaling at K=1")
        results["scaling"] = scaling.run(
            ["threads", "processes-2", "aio"],
            [1, 4, 16, 64],
            20 if args.quick else 60,
            4,
            min(args.reps, 2),
            log,
        )
    if "cut" in only:
        log("== what crosses the cut: packed lists, compression, slow links (issue 14)")
        results["cut"] = cut.run(pipeline, frames, args.quick, log)
    about["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    about["seconds"] = round(time.perf_counter() - began, 1)
    about["source"] = args.source
    for name, data in results.items():
        (args.out / f"{name}.json").write_text(
            json.dumps({"machine": about, **data}, indent=1) + "\n"
        )
    print()
    # Sections not run this time keep their latest results in the summary.
    return rewrite_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
