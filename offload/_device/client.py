"""The device side: capture, run the local tasks [0, K), frame the item, hand it to the link.

The capture loop runs in the caller's thread. Items cut at the split go to the link
(``link.py``), which owns the stream: a credit window bounds the items in flight, so a slow
server or link slows capture down instead of filling memory; the link also reconnects, resends
and runs items here while the server is away. How items end is the ledger's (``ledger.py``);
which split to run at, in automatic mode, ``autosplit.py``'s.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from .._codec import (
    CODEC_NAMES,
    READS,
    Codec,
    Compressed,
    check_message_size,
    check_size,
    compress_value,
    compressions,
    encode_into,
)
from .._config import ClientConfig
from .._logging import quote
from .._pipeline import ItemContext, Outcome, Pipeline, Status, run_tasks
from ..exceptions import ConfigError, OffloadError, ServerError
from ..v1 import offload_pb2 as pb
from .autosplit import AutoSplit, check_auto, starting_split
from .buffer import DurableBuffer
from .compression import AutoCompression
from .emulation import SlowDevice
from .ledger import Ledger, Recovered
from .link import Link, Pending
from .report import DeviceUsage, Recorder, run_report
from .scheduler import ModelPolicy, SplitPolicy
from .telemetry import Telemetry
from .transport import Transport
from .workers import DeviceWorkers, Job

log = logging.getLogger("offload.client")
RECOVERED_FILE = "recovered.jsonl"  # in --buffer-dir: the ends of earlier runs' held items


def check_split(pipeline: Pipeline, local_tasks: int | None) -> None:
    """Refuse a split outside [1, N], naming the valid range and the tasks."""
    n = len(pipeline.tasks)
    if local_tasks is not None and not 1 <= local_tasks <= n:
        raise ConfigError(
            f"--local-tasks {local_tasks} is out of range: use 1..{n - 1} to run tasks [0, K) on "
            f"the device and the rest on the server, {n} to run all on the device, or omit it for "
            f"client-only mode. Tasks of {pipeline.name}: {pipeline.describe()}"
        )


class Client:
    """Runs one device's stream of items. ``transport`` is None in client-only mode."""

    ledger_class = Ledger  # a subclass may note how items end (the fault tests do)

    def __init__(
        self,
        pipeline: Pipeline,
        config: ClientConfig,
        transport: Transport | None = None,
        output: IO[str] | None = None,
        stop: threading.Event | None = None,
        policy: SplitPolicy | None = None,
    ) -> None:
        check_split(pipeline, config.local_tasks)
        check_auto(pipeline, config)
        if policy is not None and config.fps is None:
            raise ConfigError(
                "a split policy is asked only in automatic mode: set the target "
                "(ClientConfig.fps, --fps), or leave the policy out"
            )
        n = len(pipeline.tasks)
        self._split = starting_split(pipeline, config)
        needs_server = self._split < n
        if needs_server and transport is None:
            raise ConfigError(f"split {self._split} needs a server: give a transport")
        self.pipeline = pipeline
        self.config = config
        self.transport = transport if needs_server else None
        self.run_id = uuid.uuid4().hex
        # Items on the device's workers, and the one captured ahead, count against the link's
        # window and buffer.
        extra = config.device_items - 1
        window = config.window - extra
        # In automatic mode the scheduler chooses the codec too: it samples each one allowed.
        # With --compression auto at a fixed split, AutoCompression chooses from those it used.
        choosing = config.fps is not None or config.compression == "auto"
        allowed = compressions(config.compression) if choosing else ()
        self.telemetry = Telemetry(
            n, window, config.workers, pipeline.serial_tasks, tuple(CODEC_NAMES[c] for c in allowed)
        )
        self.recorder = Recorder(pipeline, output)
        self._stop = stop or threading.Event()
        self.device = SlowDevice(config.slowdown)  # its sleep debt lasts the run
        self.ledger = self.ledger_class(
            pipeline, config, self.run_id, self.telemetry, self.recorder, self.device
        )
        # The linger the scheduler chooses goes to a transport that batches (GrpcTransport).
        set_linger = getattr(self.transport, "set_linger", None)
        self.auto = (
            AutoSplit(
                policy or ModelPolicy(config.fps), self.telemetry, config, self._split, set_linger
            )
            if config.fps is not None
            else None
        )
        self._codec = compressions(config.compression)  # wanted for the next item, fixed split
        self.auto_compression = (
            AutoCompression(self.telemetry, self._split, config.control_period)
            if self.auto is None
            and config.compression == "auto"
            and self._split < n
            and self._codec
            else None
        )
        # Per codec: items compressed, their serialised and their compressed bytes.
        self._compressed: dict[str, list[int]] = {}
        self._sent_as_is = 0  # items whose args could have been compressed but did not shrink
        self._count_lock = threading.Lock()
        # The link owns the stream: credits, resends, reconnects, the offline buffer.
        self._hold_at = n - 1 if config.link.outage == "hold-last" else None
        self.store = (
            DurableBuffer(config.link.buffer_dir)
            if config.link.buffer_dir is not None and self.transport is not None
            else None
        )
        self.link = (
            None
            if self.transport is None
            else Link(
                self.transport,
                replace(config.link, buffer=config.link.buffer - extra),
                window,
                self.ledger,
                self._hold_at,
                self.store,
                self.run_id,
            )
        )
        self.recovering: list[Link] = []  # for earlier runs' items found in the durable buffer
        self._recovered: Recovered | None = None
        self.workers = (
            DeviceWorkers(
                config.workers,
                pipeline,
                self.device,
                self._encode,
                self._hand_over,
                ahead=config.device_items - config.workers,
            )
            if config.workers > 1
            else None
        )
        self.telemetry.watch(self.workers.busy if self.workers is not None else None)
        self.usage = DeviceUsage(config.workers)

    @property
    def split(self) -> int:
        """Tasks run on the device for the next item."""
        return self.auto.split if self.auto is not None else self._split

    def stop(self) -> None:
        """Stop capturing; items already captured still finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Capture and process until the source ends, ``frames`` is reached or ``stop()``."""
        self.usage.start()
        if self.link is not None:
            self.link.start()  # it says so if the server does not answer yet
        if self.workers is not None:
            self.workers.start()
        try:
            self._recover()
            self._capture_loop()
            if self.workers is not None:
                self.workers.drain()
            self.device.pay(everything=True)  # the sleep the last items still owe
            if self.link is not None:
                self.link.finish()
            for link in self.recovering:
                link.finish()
        except BaseException as exc:  # a second Ctrl-C, or a bug: still account for every item
            why = (
                "the run was interrupted before this item finished"
                if isinstance(exc, KeyboardInterrupt)
                else f"the run stopped before this item finished: {type(exc).__name__}: {exc}"
            )
            if self.workers is not None:
                self.workers.close()
            for each in [self.link, *self.recovering]:
                if each is not None:
                    each.abort(why)
            self.recorder.end_unfinished(why)
            raise
        finally:
            self._close_buffer()
        if self.workers is not None:
            self.workers.close()
        # Nothing is left unless a LinkOwner call failed; an item never goes missing.
        self.recorder.end_unfinished("the run ended before this item finished")
        return self.report()

    @property
    def error(self) -> ServerError | None:
        """Why the server refused the stream, if it did (the report also says)."""
        return self.link.error if self.link is not None else None

    def report(self) -> dict[str, Any]:
        link = self.link.report() if self.link is not None else None
        if link is not None and self._recovered is not None:
            link["recovered"] = self._recovered.ended  # earlier runs' items, ended this run
        return run_report(
            self.recorder,
            self.config,
            run_id=self.run_id,
            split=self.split,
            server=getattr(self.transport, "target", None),
            error=str(self.error) if self.error else self.recorder.write_error,
            link=link,
            scheduler=self.auto.report() if self.auto is not None else None,
            device=self.usage.report(self.workers.busy() if self.workers is not None else None),
            compression=self.compression_report() if self.link is not None else None,
        )

    def _recover(self) -> None:
        """Resend what earlier runs left in the durable buffer, each run on a link of its own
        (answers name only the item): their ends go to RECOVERED_FILE in the buffer's folder."""
        if self.store is None or self.transport is None:
            return
        earlier = self.store.earlier(self.run_id)
        if not earlier:
            return
        path = self.store.path.parent / RECOVERED_FILE
        self._recovered = Recovered(
            self.pipeline, self.config, open(path, "a", encoding="utf-8"), self.device
        )
        for run_id, rows in earlier.items():
            link = Link(
                self.transport,
                self.config.link,
                self.config.window,
                self._recovered,
                self._hold_at,
                self.store,
                run_id,
            )
            now = time.perf_counter()
            link.adopt([Pending(h.item, h.next_task, h.data, now, stored=True) for h in rows])
            link.start()
            self.recovering.append(link)
        log.warning(
            "event=recovered runs=%d items=%d msg=%s",
            len(earlier),
            sum(len(rows) for rows in earlier.values()),
            quote(f"resending items earlier runs held; their answers go to {path}"),
        )

    def _close_buffer(self) -> None:
        if self._recovered is not None:
            self._recovered.output.close()
        if self.store is not None:
            self.store.close()

    def _capture_loop(self) -> None:
        item = 0
        workers = self.workers
        while not self._stop.is_set() and self.error is None and not self.recorder.write_error:
            if self.config.frames is not None and item >= self.config.frames:
                break
            if workers is not None and not workers.acquire(self._stop):
                break  # stopped (or a worker failed) while every worker was busy
            split = (
                self.split if self.auto is None else self.auto.split_for(item, time.perf_counter())
            )
            capture_time = time.time()
            began = time.perf_counter()
            context = ItemContext(self.config.device_id, self.run_id, item, capture_time, False)
            sizes = self.auto.size_sampler(item, self.config.limits) if self.auto else None
            if self.auto_compression is not None:
                self._codec = self.auto_compression.codec_for(item, began)
            # With workers, task 0 here and the rest on a worker; else all of [0, split) here.
            stop = split if workers is None else 1
            outcome = run_tasks(
                self.pipeline, 0, stop, None, context, pace=self.device, on_output=sizes
            )
            if outcome.task == 0 and outcome.status is not Status.CONTINUE:
                if workers is not None:
                    workers.release()
                if outcome.status is Status.FILTERED:
                    log.info("event=end-of-stream items=%d", item)
                    break
                if outcome.status is Status.FAILED:
                    raise OffloadError(f"capture (task 0) failed: {outcome.error}")
            self.ledger.captured(item, began, outcome.task_seconds)
            if workers is not None:
                workers.submit(Job(item, split, outcome.value, context, began, sizes))
            elif outcome.status is Status.CONTINUE:
                self._send(item, split, outcome.value, context, began, sizes)
            else:
                self.ledger.ended_here(item, outcome, began)
            item += 1
        if workers is not None and workers.error is not None:
            raise workers.error

    def _encode(self, job: Job, args: Any) -> bytes | str:
        """The item's TaskState at the cut, or why it cannot be sent."""
        assert self.link is not None
        state = pb.TaskState(
            pipeline=self.pipeline.name,
            fingerprint=self.pipeline.fingerprint,
            device_id=self.config.device_id,
            run_id=self.run_id,
            item=job.item,
            next_task=job.split,
            capture_time=job.context.capture_time,
            accepts=READS,
        )
        # Packed and compressed only if the server said it reads them.
        reads = self.link.server_reads
        wanted = self._codec if self.auto is None else (self.auto.codec,)
        codec = next((c for c in wanted if c in reads), None)
        what = f"item {job.item}"
        try:
            encode_into(state.args, args, self.config.limits, packed=pb.CODEC_PACKED in reads)
            if job.on_output is not None and self.auto is not None:  # the other codecs, here
                self.auto.sample_codecs(job.split, state.args.SerializeToString(), but=codec)
            if codec is not None:
                check_message_size(state.ByteSize(), self.config.limits, what)
                self._count(job.split, compress_value(state.args, codec), codec)
            data = state.SerializeToString()
            check_size(data, self.config.limits, what)
        except OffloadError as exc:
            return f"cannot send: {exc}"
        return data

    def _hand_over(self, job: Job, outcome: Outcome, data: bytes | str | None) -> None:
        """A worker is done with ``job``: send it, or end it here (called in item order)."""
        self.ledger.worker_times(job.item, outcome.task_seconds)
        if isinstance(data, bytes):
            assert self.link is not None
            self.link.submit(Pending(job.item, job.split, data, job.began))
        elif data is not None:
            self.ledger.failed(job.item, job.split - 1, data, job.began)
        else:
            self.ledger.ended_here(job.item, outcome, job.began)

    def _send(
        self,
        item: int,
        split: int,
        args: Any,
        context: ItemContext,
        began: float,
        sizes: Callable[[int, Any], None] | None,
    ) -> None:
        assert self.link is not None
        data = self._encode(Job(item, split, args, context, began, sizes), args)
        if isinstance(data, str):
            self.ledger.failed(item, split - 1, data, began)
            return
        self.link.submit(Pending(item, split, data, began))

    def _count(self, split: int, done: Compressed | None, codec: Codec) -> None:
        name = CODEC_NAMES[codec]
        if done is None:  # it would not shrink: to the scheduler, a ratio of 1 (CPU: the sample)
            self.telemetry.compression(split, name, 1, 1, 0.0)
            with self._count_lock:  # device workers encode at once
                self._sent_as_is += 1
            return
        self.telemetry.compression(split, name, done.raw_bytes, done.wire_bytes, done.seconds)
        self.telemetry.compressed(split, done.raw_bytes - done.wire_bytes)
        with self._count_lock:
            counts = self._compressed.setdefault(name, [0, 0, 0])
            counts[0] += 1
            counts[1] += done.raw_bytes
            counts[2] += done.wire_bytes

    def compression_report(self) -> dict[str, Any]:
        """The report's ``compression`` section: what crossed the cut compressed, how much."""
        return {
            "setting": self.config.compression,
            # --compression auto at a fixed split: each change of codec, and why.
            "changes": self.auto_compression.changes if self.auto_compression else [],
            "sent_as_is": self._sent_as_is,
            "codecs": {
                name: {"items": n, "ratio": round(raw / max(wire, 1), 2)}
                for name, (n, raw, wire) in self._compressed.items()
            },
        }


def run_client(
    pipeline: Pipeline,
    config: ClientConfig,
    transport: Transport | None = None,
    output: IO[str] | None = None,
) -> dict[str, Any]:
    """Run a client to the end and return its report."""
    return Client(pipeline, config, transport, output).run()
