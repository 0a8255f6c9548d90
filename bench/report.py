"""The markdown summary (``summary.md``) and the PNG plots of a benchmark run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from . import cut
from .machine import one_line


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _compare(data: dict[str, Any]) -> str:
    seed_rows = [
        [
            r["k"],
            r["offload"],
            r["seed"],
            r["prototype"],
            f"{r['vs_seed']:.2f}x",
            f"{r['vs_prototype']:.2f}x",
        ]
        for r in data["rows"]
    ]
    bound_rows = []
    for r in data["rows"]:
        b = r["bound"]
        bound_rows.append(
            [
                r["k"],
                b["device_rate"],
                b["server_rate"],
                b["link_rate"],
                f"{b['rate']} ({b['limiter']})",
                r["offload_finished"],
                f"{r['achieved_vs_bound']:.2f}",
                r["in_run_bound"],
                f"{r['achieved_vs_in_run_bound']:.2f}",
            ]
        )
    cal = data["calibration"]
    return "\n\n".join(
        [
            "### Against the seed's wire approach (completed items/s, median of runs)",
            "offload: results back at the device, validated; seed: length-prefixed pickle over "
            "TCP, buffered reader, fire-and-forget, counted at its server; prototype: the same "
            "with the 2019 receiver (`data += recv(4096)`) and, like the 2019 process, glibc's "
            "default allocator (seed and offload get the large-buffer tuning of "
            "`offload/_allocator.py`). Window 8, no emulation. Ratios are "
            "medians of per-repetition ratios (the two runs of a pair are back to back).",
            _table(
                ["K", "offload", "seed", "prototype", "offload / seed", "offload / prototype"],
                seed_rows,
            ),
            "CPU per item (ms, medians): what each side pays, steadier than items/s on a "
            "shared machine. Device = the benchmark process running the device side (ours "
            "includes its answer reader and gRPC threads); server = the server process.",
            _table(
                ["K", "offload device", "seed device", "offload server", "seed server"],
                [
                    [
                        r["k"],
                        r["offload_device_cpu_ms"],
                        r["seed_device_cpu_ms"],
                        r["offload_server_cpu_ms"],
                        r["seed_server_cpu_ms"],
                    ]
                    for r in data["rows"]
                ],
            ),
            "### Against the bottleneck bound (items/s)",
            "Bound = min(device = 1 / local work, server = 1 / remote work x 1 worker (a "
            "stream's items run in order), link = loopback bandwidth / bytes at the cut), work "
            "per captured item measured with every task run alone; achieved = items finished "
            "end to end per second (completed + filtered). The in-run bound uses the task "
            "times measured during the offload runs themselves (device and server side by "
            "side, sharing the cores unless pinned). Task ms per item: "
            f"{cal['task_ms_per_item']}; bytes at each cut: "
            f"{cal['cut_bytes'][1:]}; loopback {data['loopback_bytes_per_second'] / 1e6:.0f} "
            "MB/s.",
            _table(
                [
                    "K",
                    "device",
                    "server",
                    "link",
                    "bound",
                    "achieved",
                    "achieved / bound",
                    "in-run bound",
                    "achieved / in-run bound",
                ],
                bound_rows,
            ),
        ]
    )


def _window(data: dict[str, Any]) -> str:
    rows = [
        [
            r["k"],
            r["window"],
            r["finished_per_second"],
            r["window_limit"],
            r["no_rtt"],
            f"{r['achieved_vs_no_rtt']:.2f}",
            f"{r['bound']} ({r['limiter']})",
            f"{r['achieved_vs_bound']:.2f}",
        ]
        for r in data["rows"]
    ]
    return "\n\n".join(
        [
            f"### Window sweep, emulated link {data['link']} (items/s)",
            "Through offload's link emulation (`--emulate-link`: a shaping proxy in the device "
            "process), which carries "
            f"{data['link_bytes_per_second']['measured'] / 1e6:.1f} MB/s of its nominal "
            f"{data['link_bytes_per_second']['nominal'] / 1e6:.1f} MB/s: the bound's link rate "
            "is the measured one. Window limit = W / (round trip + transfer + server work): "
            "what W items in flight allow (W = 1 is ping-pong). No RTT = the same split "
            "straight to the server in the same run; bound = the bottleneck bound as above, "
            "with the emulated link.",
            _table(
                [
                    "K",
                    "window",
                    "achieved",
                    "window limit",
                    "no RTT",
                    "achieved / no RTT",
                    "bound",
                    "achieved / bound",
                ],
                rows,
            ),
        ]
    )


def _codec(data: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{r['offload_bytes']:,} / {r['pickle_bytes']:,}",
            f"{r['offload_encode_us']} + {r['offload_decode_us']}",
            f"{r['pickle_encode_us']} + {r['pickle_decode_us']}",
            r["memcpy_us"],
            f"{r['offload_vs_pickle']:.2f}x",
        ]
        for name, r in data.items()
    ]
    return "\n\n".join(
        [
            "### Codec (median µs per call)",
            "offload = `encode` + `SerializeToString`, then `FromString` + `decode` (a "
            "writable array); pickle = protocol 5 `dumps` + `loads`; memcpy = one copy of the "
            "payload.",
            _table(
                [
                    "value",
                    "bytes offload / pickle",
                    "offload enc + dec",
                    "pickle enc + dec",
                    "memcpy",
                    "offload / pickle",
                ],
                rows,
            ),
        ]
    )


def _transport(data: dict[str, Any]) -> str:
    rows = [
        [f"{r['size']:,}", r["system"], r["device_cpu_ms"], r["server_cpu_ms"]]
        for r in data["rows"]
    ]
    return "\n\n".join(
        [
            "### Transport alone (CPU ms per item, medians)",
            "The item K = 6 sends (a snapshot of the given size, circle, radius, centre); the "
            "server runs only the aggregating task. grpc = a bare gRPC Python stream of raw "
            "bytes answered with 16 bytes: the floor of any design on gRPC Python; offload = "
            "its client transport (encoding included) and server; seed = pickle over TCP "
            "(pickling included), no answers.",
            _table(["item bytes", "system", "device CPU ms", "server CPU ms"], rows),
        ]
    )


def _scaling(data: dict[str, Any], cores: int) -> str:
    rows = []
    for r in data["rows"]:
        load = "half" if r["load"] == "half" else "full"
        rows.append(
            [
                r["config"],
                r["streams"],
                load,
                r["items_per_second"],
                r["p50_ms"],
                r["p99_ms"],
                r["errors"],
                r["server_cpu_ms_per_item"],
            ]
        )
    notes = []
    for config in dict.fromkeys(r["config"] for r in data["rows"]):
        mine = [r for r in data["rows"] if r["config"] == config and r["load"] == "full"]
        one = min(mine, key=lambda r: r["streams"])
        most = max(mine, key=lambda r: r["streams"])
        per_item = (one["server_cpu_seconds"] + one["client_cpu_seconds"]) / max(1, one["answered"])
        cpu_bound = cores / per_item
        notes.append(
            f"{config}: {most['streams']} streams {most['items_per_second']} items/s = "
            f"{most['items_per_second'] / cpu_bound:.2f} of the CPU bound {cpu_bound:.0f}/s "
            f"({cores} cores / {1000 * per_item:.2f} ms server + load-generator CPU per item "
            "at 1 stream)"
        )
    return "\n\n".join(
        [
            f"### Server scaling at K=1 ({data['items_per_stream']} items per stream, window "
            f"{data['window']})",
            "threads: one process, gRPC's thread per stream (the default); processes-2: "
            "`--processes 2`; aio: a grpc.aio server around the same executor (benchmark "
            "only). Half load: the most streams, paced to half of their full-load rate.",
            _table(
                [
                    "server",
                    "streams",
                    "load",
                    "items/s",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "server CPU ms/item",
                ],
                rows,
            ),
            "\n".join(f"- {n}" for n in notes),
        ]
    )


def _plots(out: Path, results: dict[str, Any]) -> list[str]:
    plt.switch_backend("Agg")  # files only, no display
    written = []
    if "compare" in results:
        rows = results["compare"]["rows"]
        ks = [r["k"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.27
        for i, (key, label) in enumerate(
            [("offload", "offload"), ("seed", "seed approach"), ("prototype", "2019 prototype")]
        ):
            ax.bar([k + (i - 1) * width for k in ks], [r[key] for r in rows], width, label=label)
        ax.plot(ks, [r["bound"]["rate"] for r in rows], "k_", markersize=30, label="bound")
        ax.set_xlabel("split K (tasks on the device)")
        ax.set_ylabel("completed items/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=100)
        written.append("compare.png")
    if "window" in results:
        data = results["window"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in dict.fromkeys(r["k"] for r in data["rows"]):
            mine = [r for r in data["rows"] if r["k"] == k]
            line = ax.plot(
                [r["window"] for r in mine],
                [r["finished_per_second"] for r in mine],
                "o-",
                label=f"K={k} ({mine[0]['limiter']}-bound)",
            )[0]
            ax.axhline(mine[0]["bound"], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("window (items in flight)")
        ax.set_ylabel("items/s")
        ax.set_title(f"emulated link {data['link']}; dashed: bottleneck bound")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "window.png", dpi=100)
        written.append("window.png")
    if "scaling" in results:
        data = results["scaling"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for config in dict.fromkeys(r["config"] for r in data["rows"]):
            mine = [r for r in data["rows"] if r["config"] == config and r["load"] == "full"]
            streams = [r["streams"] for r in mine]
            left.plot(streams, [r["items_per_second"] for r in mine], "o-", label=config)
            right.plot(streams, [r["p99_ms"] for r in mine], "o-", label=config)
        for ax, label in ((left, "aggregate items/s"), (right, "p99 latency ms (full load)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent device streams")
            ax.set_ylabel(label)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=100)
        written.append("scaling.png")
    if "codec" in results:
        data = results["codec"]
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(data)
        width = 0.27
        series = [
            (
                "offload",
                [data[n]["offload_encode_us"] + data[n]["offload_decode_us"] for n in names],
            ),
            ("pickle", [data[n]["pickle_encode_us"] + data[n]["pickle_decode_us"] for n in names]),
            ("memcpy", [data[n]["memcpy_us"] for n in names]),
        ]
        for i, (label, values) in enumerate(series):
            ax.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("µs (encode + decode)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "codec.png", dpi=100)
        written.append("codec.png")
    if "cut" in results:
        written += cut.plot(out, results["cut"])
    plt.close("all")
    return written


def _measured(machine: dict[str, Any]) -> str:
    end_load = " ".join(map(str, machine["load_average_end"]))
    return (
        f"Measured: {one_line(machine)}; load average {end_load} at the end of the run, which "
        f"took {machine['seconds']} s; frames: {machine['source']}."
    )


def write(out: Path, results: dict[str, dict[str, Any]]) -> str:
    """The summary of every section in ``results`` (each with the ``machine`` it ran on)."""
    data = {name: {k: v for k, v in r.items() if k != "machine"} for name, r in results.items()}
    parts = [
        "## Benchmark results",
        "Medians over interleaved repetitions on a shared machine: expect noise. Each section "
        "says the commit and the machine's load it was measured with.",
    ]

    def scaling(d: dict[str, Any]) -> str:
        return _scaling(d, results["scaling"]["machine"]["cores"] or 1)

    renderers: dict[str, Callable[[dict[str, Any]], str]] = {
        "compare": _compare,
        "window": _window,
        "codec": _codec,
        "transport": _transport,
        "scaling": scaling,
        "cut": cut.render,
    }
    for name, render in renderers.items():
        if name in data:
            heading, _, rest = render(data[name]).partition("\n\n")
            parts.append("\n\n".join([heading, _measured(results[name]["machine"]), rest]))
    plots = _plots(out, data)
    parts.append("Plots: " + ", ".join(f"`{p}`" for p in plots))
    summary = "\n\n".join(parts) + "\n"
    (out / "summary.md").write_text(summary)
    return summary
