"""What a run did: per-item records in item order, counters, latencies, cloud cost, the summary."""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import psutil

from .._config import ClientConfig
from .._logging import quote
from .._pipeline import Pipeline
from .workers import WorkerStats

log = logging.getLogger("offload.client")


def to_json(value: Any) -> Any:
    """A task result as JSON-friendly data: arrays become nested lists, bytes base64, complex
    numbers [real, imag] (README, "Writing your own pipeline", lists each form)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind == "c":  # JSON has no complex numbers (json.dumps raised)
            return np.stack([value.real, value.imag], axis=-1).tolist()
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return repr(value)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass
class TaskStats:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    @property
    def mean_ms(self) -> float:
        return 1000 * self.seconds / self.count if self.count else 0.0


@dataclass
class Recorder:
    """Collects item outcomes from the capture loop and the answer thread (thread-safe)."""

    pipeline: Pipeline
    output: IO[str] | None = None
    captured: int = 0
    completed: int = 0
    filtered: int = 0
    failed: int = 0
    dropped: int = 0  # never processed: the offline buffer was full (LinkConfig.when_full)
    not_run: int = 0  # never finished: a fatal refusal or an abort ended the run first
    bytes_sent: int = 0
    bytes_received: int = 0
    server_cpu_seconds: float = 0.0
    answers: int = 0  # items the server answered
    latencies: list[float] = field(default_factory=list)
    device_tasks: dict[int, TaskStats] = field(default_factory=dict)
    server_tasks: dict[int, TaskStats] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Why the output stopped being written (a full disk...): the run stops, and says so.
    write_error: str | None = None
    first_capture: float | None = None
    last_finish: float | None = None
    _pending_lines: dict[int, str] = field(default_factory=dict)
    _next_line: int = 0
    # Each item ends once: every item below ``_ended_below`` has ended, and these above it.
    _ended_below: int = 0
    _ended: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def captured_item(self, at: float) -> None:
        with self._lock:
            self.captured += 1
            if self.first_capture is None:
                self.first_capture = at

    def device_times(self, timings: list[tuple[int, float]]) -> None:
        with self._lock:
            for index, seconds in timings:
                self.device_tasks.setdefault(index, TaskStats()).add(seconds)

    def server_times(self, timings: list[tuple[int, float]], cpu_seconds: float) -> None:
        with self._lock:
            for index, seconds in timings:
                self.server_tasks.setdefault(index, TaskStats()).add(seconds)
            self.server_cpu_seconds += cpu_seconds
            self.answers += 1

    def finished(
        self,
        item: int,
        status: str,
        result: Any,
        *,
        task: int = -1,
        error: str = "",
        latency: float | None,
        at: float | None,
    ) -> bool:
        """Record an item's end and write its line; False if the item had ended already.

        ``status`` is completed, filtered, failed, dropped or not_run; ``task`` (if >= 0) is
        where it stopped or would have gone on, ``error`` why; ``latency`` and ``at`` (when it
        ended) are None for an item that was never run to an end.
        """
        line = None
        if self.output is not None:  # converting a result to JSON is costly: only when written
            record: dict[str, Any] = {"item": item, "status": status}
            if status == "completed":
                record["result"] = to_json(result)
            else:
                if task >= 0:
                    record["task"] = task
                if error:
                    record["error"] = error
            line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            if item < self._ended_below or item in self._ended:
                return False  # (after an abort, an item that was running here can still end)
            self._ended.add(item)
            while self._ended_below in self._ended:
                self._ended.remove(self._ended_below)
                self._ended_below += 1
            if status == "completed":
                self.completed += 1
            elif status == "filtered":
                self.filtered += 1
            elif status == "dropped":
                self.dropped += 1
            elif status == "not_run":
                self.not_run += 1
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(f"item {item}: task {task}: {error}")
            if latency is not None:
                self.latencies.append(latency)
            if at is not None:
                self.last_finish = at
            if self.output is not None and line is not None:
                # Items can end out of order (filtered on the device while earlier ones are on
                # the server): hold lines until every earlier item has been written.
                self._pending_lines[item] = line
                while self._next_line in self._pending_lines and self.write_error is None:
                    try:
                        self.output.write(self._pending_lines.pop(self._next_line) + "\n")
                    except (OSError, ValueError) as exc:  # ValueError: a closed file
                        self.write_error = self._cannot_write(exc)
                        log.error("event=output-failed msg=%s", quote(self.write_error))
                    self._next_line += 1
        return True

    def _cannot_write(self, exc: Exception) -> str:
        name = getattr(self.output, "name", None)
        what = f"--output {name}" if isinstance(name, str) else "the output"
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return (
            f"{what}: cannot write item {self._next_line}'s line ({why}): the run stopped; "
            "free space on its disk or give another file"
        )

    def end_unfinished(self, reason: str) -> int:
        """End every captured item that has not ended as not_run, saying ``reason``."""
        with self._lock:
            unfinished = [
                i for i in range(self._ended_below, self.captured) if i not in self._ended
            ]
        for item in unfinished:
            self.finished(item, "not_run", None, error=reason, latency=None, at=None)
        return len(unfinished)

    @property
    def finished_count(self) -> int:
        return self.completed + self.filtered + self.failed + self.dropped + self.not_run

    def summary(self, **run: Any) -> dict[str, Any]:
        """The run as JSON-friendly data (the ``--report`` file)."""
        with self._lock:
            elapsed = (
                (self.last_finish - self.first_capture)
                if self.first_capture is not None and self.last_finish is not None
                else 0.0
            )
            latencies = sorted(self.latencies)
            processed = self.completed + self.filtered
            tasks = []
            for index in range(len(self.pipeline.tasks)):
                dev = self.device_tasks.get(index, TaskStats())
                srv = self.server_tasks.get(index, TaskStats())
                where = [w for w, s in (("device", dev), ("server", srv)) if s.count]
                tasks.append(
                    {
                        "index": index,
                        "name": self.pipeline.task_name(index),
                        "ran_on": "+".join(where) or "not run",
                        "device_runs": dev.count,
                        "device_mean_ms": round(dev.mean_ms, 3),
                        "server_runs": srv.count,
                        "server_mean_ms": round(srv.mean_ms, 3),
                    }
                )
            return {
                **run,
                "pipeline": self.pipeline.name,
                "items": {
                    "captured": self.captured,
                    "completed": self.completed,
                    "filtered": self.filtered,
                    "failed": self.failed,
                    "dropped": self.dropped,
                    "not_run": self.not_run,
                },
                "elapsed_seconds": round(elapsed, 3),
                "throughput_per_second": round(self.completed / elapsed, 3) if elapsed else 0.0,
                # Items the pipeline took to an end, completed or filtered (not failed, dropped
                # or not run).
                "finished_per_second": round(processed / elapsed, 3) if elapsed else 0.0,
                "latency_ms": {
                    "p50": round(1000 * percentile(latencies, 50), 3),
                    "p95": round(1000 * percentile(latencies, 95), 3),
                },
                "tasks": tasks,
                "bytes": {"sent": self.bytes_sent, "received": self.bytes_received},
                "server_cpu_seconds": round(self.server_cpu_seconds, 6),
                "errors": list(self.errors),
            }


class DeviceUsage:
    """The device's CPU over the run (this process: an embedded server is another) and how busy
    its workers were."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._process = psutil.Process()
        self._cpu = 0.0
        self._began = 0.0

    def start(self) -> None:
        times = self._process.cpu_times()
        self._cpu, self._began = times.user + times.system, time.perf_counter()

    def report(self, stats: WorkerStats | None) -> dict[str, Any]:
        """The report's ``device`` section (``stats``: the workers', None with one worker)."""
        times = self._process.cpu_times()
        cpu = times.user + times.system - self._cpu
        wall = time.perf_counter() - self._began if self._began else 0.0
        busy = None
        if stats is not None and wall > 0:
            busy = round(100 * stats.busy_seconds / (self.workers * wall), 1)
        return {
            "workers": self.workers,
            "cpu_seconds": round(cpu, 3),
            "cpu_percent": round(100 * cpu / wall, 1) if wall > 0 else 0.0,  # of one core
            "workers_busy_percent": busy,  # None: one worker, the capture loop's own thread
        }


def run_report(
    recorder: Recorder,
    config: ClientConfig,
    *,
    run_id: str,
    split: int,
    server: str | None,
    error: str | None,
    link: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    device: dict[str, Any] | None = None,
    compression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's report (the ``--report`` file): the recorder's summary, the cloud cost, the
    device's CPU and workers, and the scheduler's section in automatic mode."""
    if scheduler is not None:
        mode = f"automatic, target {config.fps:g}/s, final split {split}"
    elif config.local_tasks is None:
        mode = "client-only"
    else:
        mode = f"split {split}"
    report = recorder.summary(
        device_id=config.device_id,
        run_id=run_id,
        mode=mode,
        local_tasks=split,
        server=server,
        window=config.window,
        error=error,
        link=link,
    )
    report["cloud"] = cloud_cost(report, recorder.answers, split)
    if device is not None:
        captured = report["items"]["captured"]
        device["cpu_ms_per_item"] = (
            round(1000 * device["cpu_seconds"] / captured, 3) if captured else 0.0
        )
        report["device"] = device
    if scheduler is not None:
        report["scheduler"] = scheduler
    if compression is not None:
        report["compression"] = compression
    return report


def cloud_cost(report: dict[str, Any], answers: int, split: int) -> dict[str, Any]:
    """Server CPU seconds per item, and what ``split`` saves against K = 1.

    The server reports CPU time per item; the cost of K = 1 is estimated by scaling it
    with the server's per-task wall times (all measured, after the scheduler's probe).
    """
    if not answers:
        return {"server_cpu_seconds_per_item": 0.0, "saving_vs_all_remote_percent": None}
    per_item = report["server_cpu_seconds"] / answers
    server_ms = [t["server_mean_ms"] if t["server_runs"] else math.nan for t in report["tasks"]]
    at_final = sum(server_ms[split:])
    everything = sum(server_ms[1:])
    saving = None
    if not math.isnan(everything) and everything > 0 and not math.isnan(at_final):
        saving = round(100 * (1 - at_final / everything), 1)
    return {
        "server_cpu_seconds_per_item": round(per_item, 6),
        "saving_vs_all_remote_percent": saving,
    }


def format_summary(report: dict[str, Any]) -> str:
    """The human view of a report."""
    items = report["items"]
    lines = [
        f"offload summary: {report['pipeline']} on device {report['device_id']} ({report['mode']})",
        f"  items      captured {items['captured']}, completed {items['completed']}, "
        f"filtered {items['filtered']}, failed {items['failed']}, dropped {items['dropped']}"
        + (f", not run {items['not_run']}" if items.get("not_run") else ""),
        f"  throughput {report['throughput_per_second']:.1f} completed items/s "
        f"({report['finished_per_second']:.1f}/s completed or filtered) "
        f"over {report['elapsed_seconds']:.1f} s",
        f"  latency    p50 {report['latency_ms']['p50']:.1f} ms, "
        f"p95 {report['latency_ms']['p95']:.1f} ms (capture to result)",
        f"  bytes      sent {_size(report['bytes']['sent'])}, "
        f"received {_size(report['bytes']['received'])}",
    ]
    compression = report.get("compression") or {}
    if compression.get("codecs"):
        shown = ", ".join(
            f"{name} {c['items']} items ({c['ratio']:g}x smaller)"
            for name, c in compression["codecs"].items()
        )
        as_is = compression["sent_as_is"]
        lines.append(
            f"  compressed {shown}" + (f"; {as_is} did not shrink: sent as is" * bool(as_is))
        )
    if compression.get("changes"):  # --compression auto at a fixed split
        last = compression["changes"][-1]
        lines.append(f"  codec      ended on {last['codec']}: {last['reason']}")
    cloud = report.get("cloud") or {}
    if cloud.get("server_cpu_seconds_per_item"):
        line = f"  cloud      server CPU {1000 * cloud['server_cpu_seconds_per_item']:.2f} ms/item"
        saving = cloud.get("saving_vs_all_remote_percent")
        if saving is not None:
            line += (
                f"; split {report['local_tasks']} saves {saving:.0f}% of the server work of "
                "sending everything (K=1)"
            )
        lines.append(line)
    device = report.get("device")
    if device:
        workers = device["workers"]
        line = f"  device     {workers} worker{'s' if workers != 1 else ''}"
        if device.get("workers_busy_percent") is not None:
            line += f", {device['workers_busy_percent']:.0f}% busy"
        line += (
            f"; CPU {device['cpu_percent']:.0f}% of a core, {device['cpu_ms_per_item']:.2f} ms/item"
        )
        lines.append(line)
    emulation = report.get("emulation") or {}
    emulated = [
        f"device {emulation['slowdown']:g}x slower" if emulation.get("slowdown", 1) != 1 else "",
        f"link {emulation['link']}" if emulation.get("link") else "",
    ]
    if any(emulated):
        lines.append(f"  emulation  {', '.join(e for e in emulated if e)}")
    scheduler = report.get("scheduler") or {}
    periods = scheduler.get("periods") or []
    if periods:
        shown = ", ".join(
            f"K={p['split']}{_with_codec(p.get('codec'))} {p['throughput_per_second']:.1f}/s"
            for p in periods[-8:]
        )
        if len(periods) > 8:
            shown += f" (the last 8 of {len(periods)})"
        lines.append(f"  periods    {shown}")
    for change in scheduler.get("history", [])[-10:]:
        lines.append(f"  at {change['seconds']:6.1f} s {change['reason']}")
    if scheduler.get("final_reason"):
        chose = f"K={scheduler['final_split']}{_with_codec(scheduler['final_codec'])}"
        lines.append(f"  ended on   {chose}: {scheduler['final_reason']}")
    lines.append("  tasks      where              device ms   server ms")
    for t in report["tasks"]:
        dev = f"{t['device_mean_ms']:9.2f}" if t["device_runs"] else "        -"
        srv = f"{t['server_mean_ms']:9.2f}" if t["server_runs"] else "        -"
        lines.append(f"    {t['index']} {t['name']:<16} {t['ran_on']:<13} {dev}   {srv}")
    link = report.get("link")
    if link:
        lines.append(
            f"  link       {link['connects']} connects, {link['disconnects']} disconnects, "
            f"{link['resent']} resent, {link['ran_locally']} run here while the server was away, "
            f"{link['dropped']} dropped ({link['when_full']}, buffer {link['buffer']})"
            + (f", {link['refused']} refused (server full)" if link.get("refused") else "")
            + f"; up {link['up_seconds']:.1f} s"
            + ("" if link["up_at_end"] else ", down at the end")
        )
    for error in report["errors"][:5]:
        lines.append(f"  error      {error}")
    return "\n".join(lines)


def _with_codec(codec: str | None) -> str:
    return f" {codec}" if codec not in (None, "none") else ""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
