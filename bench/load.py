"""A load generator for server scaling: N concurrent device streams at K = 1, in one process.

Each stream sends pre-encoded items (capture already done: the server runs tasks 1-6) over its
own channel, with up to ``window`` in flight, optionally paced to ``rate`` items/s per stream.
Prints one JSON line: items answered, errors, elapsed, latency percentiles, this process's CPU.
``python -m bench.load --target 127.0.0.1:PORT --streams 16 --items 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import grpc

from offload import load_pipeline
from offload._codec import encode
from offload._pipeline import ItemContext, run_tasks
from offload._wire import METHOD, size_options
from offload.v1 import offload_pb2 as pb

from . import pipeline as bench_pipeline

LIMIT = 16 * 1024 * 1024


def _args_field(frames: int) -> list[bytes]:
    """Field 7 (args) of a TaskState, serialised, for each of ``frames`` captured frames."""
    pipeline = load_pipeline(bench_pipeline.NAME)
    bench_pipeline.prepare(bench_pipeline.render("synthetic", frames), frames)
    out = []
    for n in range(frames):
        frame = run_tasks(pipeline, 0, 1, None, ItemContext("load", "load", n, 0.0, False)).value
        # A TaskState holding only args serialises to exactly field 7: concatenating it to the
        # other fields' bytes is a valid TaskState (protobuf merges concatenated messages).
        state = pb.TaskState()
        state.args.CopyFrom(encode(frame))
        out.append(state.SerializeToString())
    return out


async def _stream(
    target: str,
    device: str,
    items: int,
    window: int,
    rate: float | None,
    args: list[bytes],
    latencies: list[float],
    errors: list[str],
) -> int:
    pipeline = load_pipeline(bench_pipeline.NAME)
    answered = 0
    sent_at: dict[int, float] = {}
    credits = asyncio.Semaphore(window)
    # Each device has its own TCP connection, as real devices do (channels with equal options
    # would otherwise share one connection through gRPC's global subchannel pool).
    options = [*size_options(LIMIT), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=pb.ItemResult.FromString
        )()

        async def read() -> int:
            count = 0
            async for result in call:
                latencies.append(time.perf_counter() - sent_at.pop(result.item))
                if result.status == pb.ItemResult.FAILED:
                    errors.append(f"{device} item {result.item}: {result.error}")
                count += 1
                credits.release()
            return count

        reader = asyncio.create_task(read())
        # Paced devices start at a random phase, as independent devices would: in lockstep
        # they would all send at the same instants and measure their own bursts.
        phase = random.Random(device).uniform(0, 1 / rate) if rate else 0.0
        began = time.perf_counter() + phase
        try:
            for item in range(items):
                if rate:
                    delay = began + item / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await credits.acquire()
                header = pb.TaskState(
                    pipeline=pipeline.name,
                    fingerprint=pipeline.fingerprint,
                    device_id=device,
                    run_id=device,
                    item=item,
                    next_task=1,
                    capture_time=time.time(),
                ).SerializeToString()
                sent_at[item] = time.perf_counter()
                await call.write(header + args[item % len(args)])
            await call.done_writing()
            answered = await reader
        except grpc.RpcError as exc:
            errors.append(f"{device}: {exc.code().name}: {exc.details()}")
            reader.cancel()
    return answered


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    fields = _args_field(16)
    latencies: list[float] = []
    errors: list[str] = []
    cpu = time.process_time()
    began = time.perf_counter()
    counts = await asyncio.gather(
        *(
            _stream(
                args.target,
                f"{args.prefix}-{i}",
                args.items,
                args.window,
                args.rate,
                fields,
                latencies,
                errors,
            )
            for i in range(args.streams)
        )
    )
    elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    return {
        "streams": args.streams,
        "items_per_stream": args.items,
        "answered": sum(counts),
        "errors": len(errors) + args.streams * args.items - sum(counts),
        "error_examples": errors[:5],
        "elapsed_seconds": round(elapsed, 3),
        "items_per_second": round(sum(counts) / elapsed, 1),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "client_cpu_seconds": round(time.process_time() - cpu, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--items", type=int, default=50, help="items per stream")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--rate", type=float, default=None, help="items/s per stream")
    parser.add_argument("--prefix", default="load")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
