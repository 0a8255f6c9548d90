"""Benchmark of automatic mode against the oracle: ``make bench-scheduler``.

For one emulation (a slow device and a shaped link) and a few throughput targets:

1. sweep every static split K to measure its throughput and server CPU per item, and find the
   **oracle** for each target: the largest K whose measured throughput meets it;
2. run automatic mode from several starting splits, and report per run the seconds to first
   meet the target, the final K against the oracle, the fraction of control periods at target
   after that, the number of split changes and the server CPU per item against the oracle's.

Everything runs against one real server process on loopback, through the link emulator.
Results: ``bench/results/scheduler.json`` and ``bench/results/scheduler.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

import offload
from offload._device.client import Client
from offload._device.embedded import EmbeddedServer
from offload._device.emulation import LinkEmulator, LinkSpec
from offload._wire import size_options

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = "examples.ball_tracking"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "offload": offload.__version__,
    }


def run_once(
    pipeline: offload.Pipeline,
    target: str,
    link: LinkSpec,
    slowdown: float,
    split: int,
    frames: int,
    fps: float | None = None,
    control_period: float = 2.0,
) -> dict[str, Any]:
    emulator = LinkEmulator(target, link)
    transport = offload.GrpcTransport(emulator.target, size_options(16 << 20), 10.0)
    pipeline.set_source("synthetic")
    config = offload.ClientConfig(
        pipeline=pipeline.name,
        local_tasks=split,
        frames=frames,
        fps=fps,
        control_period=control_period,
        slowdown=slowdown,
        device_id="bench",
    )
    try:
        return Client(pipeline, config, transport).run()
    finally:
        transport.close()
        emulator.close()


def static_sweep(
    pipeline: offload.Pipeline,
    target: str,
    link: LinkSpec,
    slowdown: float,
    seconds: float,
    repeats: int,
) -> dict[int, dict[str, Any]]:
    """Every static split, ``repeats`` rounds interleaved (K=1..N-1, then again): medians."""
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in range(1, len(pipeline))}
    frames: dict[int, int] = {}
    for _ in range(repeats):
        for k, reports in runs.items():
            if k not in frames:  # a short run first to size runs of about `seconds`
                probe = run_once(pipeline, target, link, slowdown, k, frames=20)
                frames[k] = int(max(probe["finished_per_second"], 1.0) * seconds) + 10
            reports.append(run_once(pipeline, target, link, slowdown, k, frames[k]))
    sweep = {}
    for k, reports in runs.items():
        rates = [r["throughput_per_second"] for r in reports]
        sweep[k] = {
            "throughput_per_second": statistics.median(rates),
            "throughput_runs": rates,
            "server_cpu_ms_per_item": statistics.median(
                1000 * r["cloud"]["server_cpu_seconds_per_item"] for r in reports
            ),
            "latency_p50_ms": statistics.median(r["latency_ms"]["p50"] for r in reports),
        }
        print(f"  static K={k}: {sweep[k]['throughput_per_second']:.1f}/s {rates}", flush=True)
    return sweep


def resolve_targets(spec: str, sweep: dict[int, dict[str, Any]]) -> list[float]:
    """Targets from ``spec``: items/s (``17``), or a fraction of the sweep's rate at a split
    (``0.85@6``: 85 % of K=6's median), so that targets stay clear of the static rates on a
    machine whose speed drifts between runs."""
    targets = []
    for part in spec.split(","):
        fraction, at, split = part.strip().partition("@")
        try:
            value = float(fraction)
            if at:
                value = round(value * sweep[int(split)]["throughput_per_second"], 1)
        except (ValueError, KeyError):
            raise SystemExit(
                f"--targets: {part!r} is neither items/s (17) nor a fraction of a static split's "
                f"rate (0.85@6, K in {min(sweep)}..{max(sweep)})"
            ) from None
        targets.append(value)
    return targets


def oracle(sweep: dict[int, dict[str, float]], target: float) -> tuple[int, bool]:
    """The largest K whose measured throughput meets the target; when none does, the K with
    the best throughput (what automatic mode should then run at). Returns (K, feasible)."""
    meets = [k for k, r in sweep.items() if r["throughput_per_second"] >= target]
    if meets:
        return max(meets), True
    return max(sweep, key=lambda k: sweep[k]["throughput_per_second"]), False


def within_spread(sweep: dict[int, dict[str, Any]], target: float) -> list[int]:
    """Splits a policy may defensibly end at, given the sweep's own run-to-run spread.

    Feasible target: the oracle, the largest K that met the target in *every* sweep run, and any
    K whose runs straddle the target (met it in some runs, missed in others). Infeasible: every
    K whose best run reaches the best split's worst run. On a shared machine the sweep moves
    10-20 % between rounds, so a target inside a split's spread has no single right answer.
    """
    best, feasible = oracle(sweep, target)
    runs = {k: r["throughput_runs"] for k, r in sweep.items()}
    if not feasible:
        return sorted(k for k, v in runs.items() if max(v) >= min(runs[best]))
    always = [k for k, v in runs.items() if min(v) >= target]
    straddle = [k for k, v in runs.items() if min(v) < target <= max(v)]
    return sorted({best, *straddle, *([max(always)] if always else [])})


def auto_run(
    pipeline: offload.Pipeline,
    server: str,
    link: LinkSpec,
    slowdown: float,
    target: float,
    start: int,
    seconds: float,
    period: float,
    sweep: dict[int, dict[str, float]],
) -> dict[str, Any]:
    frames = int(target * seconds * 1.2)
    report = run_once(pipeline, server, link, slowdown, start, frames, target, period)
    periods = [p for p in report["scheduler"]["periods"] if p["settled"]]
    met_at = next((p["seconds"] for p in periods if p["throughput_per_second"] >= target), None)
    after = [p for p in periods if met_at is not None and p["seconds"] >= met_at]
    at_target = sum(1 for p in after if p["throughput_per_second"] >= target)
    best, feasible = oracle(sweep, target)
    spread = within_spread(sweep, target)
    final = report["scheduler"]["final_split"]
    history = report["scheduler"]["history"]
    oracle_cpu = sweep[best]["server_cpu_ms_per_item"]
    final_cpu = sweep[final]["server_cpu_ms_per_item"]
    return {
        "target": target,
        "start": start,
        "oracle": best,
        "feasible": feasible,
        "final": final,
        "final_is_oracle": final == best,
        "within_spread": spread,
        "final_within_spread": final in spread,
        "seconds_to_target": met_at,
        "periods_to_target": (met_at / period) if met_at is not None else None,
        "fraction_at_target_after": (at_target / len(after)) if after else 0.0,
        "split_changes": len(history),
        "probe_changes": sum(1 for h in history if h["reason"].startswith("probe")),
        "throughput_per_second": report["throughput_per_second"],
        "server_cpu_ms_per_item_final": final_cpu,
        "server_cpu_ms_per_item_oracle": oracle_cpu,
        "cpu_vs_oracle": (final_cpu / oracle_cpu) if oracle_cpu else None,
        "history": history,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Automatic split against the oracle",
        "",
        f"Machine: {m['cpus']} cores ({m['cpu_model']}), load average at start "
        f"{m['load_average_at_start'][0]:.2f}, Python {m['python']}, grpcio {m['grpcio']}. "
        f"Emulation: device {result['slowdown']:g}x slower, link {result['link']}. "
        f"Control period {result['control_period']:g} s.",
        "",
        f"Static sweep (measured; median of {result['sweep_repeats']} interleaved rounds):",
        "",
        "| K | completed/s (median) | runs | server CPU ms/item | p50 latency ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, r in result["sweep"].items():
        runs = ", ".join(f"{v:.1f}" for v in r["throughput_runs"])
        lines.append(
            f"| {k} | {r['throughput_per_second']:.1f} | {runs} | "
            f"{r['server_cpu_ms_per_item']:.2f} | {r['latency_p50_ms']:.0f} |"
        )
    lines += [
        "",
        "Automatic runs, targets "
        + (
            f"`{result['targets']['spec']}` (fractions of the static rates at the splits after "
            f"@): {', '.join(f'{t:g}' for t in result['targets']['items_per_second'])}/s:"
            if "targets" in result
            else "as listed:"
        ),
        "",
        "| round | target/s | start K | oracle K | within spread | final K | "
        "s to target (periods) | at target after | changes (probes) | completed/s | "
        "server CPU vs oracle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        to_target = (
            f"{r['seconds_to_target']:.1f} ({r['periods_to_target']:.1f})"
            if r["seconds_to_target"] is not None
            else "never"
        )
        cpu = f"{r['cpu_vs_oracle']:.2f}x" if r["cpu_vs_oracle"] else "-"
        best = r["oracle"] if r["feasible"] else f"{r['oracle']} (best; none meets)"
        lines.append(
            f"| {r.get('round', 1)} | {r['target']:g} | {r['start']} | {best} | "
            f"{', '.join(map(str, r['within_spread']))} | {r['final']} | {to_target} | "
            f"{100 * r['fraction_at_target_after']:.0f}% | {r['split_changes']} "
            f"({r['probe_changes']}) | {r['throughput_per_second']:.1f} | {cpu} |"
        )
    s = result["summary"]
    lines += [
        "",
        "Throughput per period is what the policy measures: items finished per second times "
        "the run's share of completed items (the synthetic ball hides 5 frames in 60, so raw "
        "completed counts per 2 s period swing with the data, not the split).",
        "",
        "Oracle: the largest K whose static throughput meets the target; when none does, the K "
        "with the best throughput, where automatic mode should settle. Within spread: the splits "
        "the sweep's own run-to-run spread cannot tell apart from it (the largest K that met "
        "the target in every sweep run, and any K that met it in some runs and missed in "
        "others; for an unreachable target, every K whose best run reaches the best split's "
        "worst).",
        "",
        f"Final K = oracle in {s['final_is_oracle']}/{s['runs']} runs, within the sweep's spread "
        f"in {s['final_within_spread']}/{s['runs']}; median periods to target "
        f"{s['median_periods_to_target']}; median server CPU vs oracle "
        f"{s['median_cpu_vs_oracle']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slowdown", type=float, default=15.0)
    parser.add_argument("--link", default="200mbit,30ms")
    # One target the most local split meets, one only K = 1 meets, one no split meets: placed
    # against the sweep, as the machine's speed drifts 10-20 % between runs. On a typical run
    # they come out near the issue's examples (9-10, 17, 28/s); a fixed 10/s sat inside K = 6's
    # noise (2 s periods of 8.5-11.8/s), where the oracle is a coin toss.
    parser.add_argument(
        "--targets",
        default="0.85@6,0.85@1,1.5@1",
        help="items/s, or a fraction of a static split's rate (0.85@6); comma-separated",
    )
    parser.add_argument("--starts", default="1,3,6")
    parser.add_argument("--rounds", type=int, default=2, help="times every automatic run is made")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of an automatic run")
    parser.add_argument("--sweep-seconds", type=float, default=8.0)
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument(
        "--name", default="scheduler", help="results go to bench/results/NAME.{json,md}"
    )
    args = parser.parse_args()
    link = LinkSpec.parse(args.link)
    starts = [int(s) for s in args.starts.split(",")]
    pipeline = offload.load_pipeline(PIPELINE)
    result: dict[str, Any] = {
        "machine": machine(),
        "slowdown": args.slowdown,
        "link": str(link),
        "control_period": args.period,
        "sweep_repeats": args.sweep_repeats,
    }
    server = EmbeddedServer(PIPELINE)
    try:
        print(f"static sweep: slowdown {args.slowdown:g}, link {link}", flush=True)
        sweep = static_sweep(
            pipeline, server.target, link, args.slowdown, args.sweep_seconds, args.sweep_repeats
        )
        result["sweep"] = sweep
        targets = resolve_targets(args.targets, sweep)
        result["targets"] = {"spec": args.targets, "items_per_second": targets}
        print(f"targets {args.targets}: {targets}", flush=True)
        runs = []
        for round_ in range(args.rounds):
            for target in targets:
                for start in starts:
                    run = auto_run(
                        pipeline, server.target, link, args.slowdown, target, start,
                        args.seconds, args.period, sweep,
                    )  # fmt: skip
                    print(
                        f"  round {round_ + 1}: target {target:g} from K={start}: final "
                        f"{run['final']} (oracle {run['oracle']}), {run['split_changes']} changes",
                        flush=True,
                    )
                    runs.append({"round": round_ + 1, **run})
        result["runs"] = runs
    finally:
        server.stop()
    to_target = [r["periods_to_target"] for r in runs if r["periods_to_target"] is not None]
    cpu = [r["cpu_vs_oracle"] for r in runs if r["cpu_vs_oracle"]]
    result["summary"] = {
        "runs": len(runs),
        "final_is_oracle": sum(r["final_is_oracle"] for r in runs),
        "final_within_spread": sum(r["final_within_spread"] for r in runs),
        "median_periods_to_target": round(statistics.median(to_target), 2) if to_target else None,
        "median_cpu_vs_oracle": round(statistics.median(cpu), 3) if cpu else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)
    print(f"took {time.process_time():.0f} s of CPU in this process")


if __name__ == "__main__":
    main()
