"""Transport cost alone: CPU per item on each side for the same item carried three ways.

The item is what K = 6 sends (a ``bytes`` snapshot, the circle, its radius, the centre) with a
21 kB or a 560 kB snapshot; the server runs only the aggregating task. ``grpc``: a bare gRPC
Python bidirectional stream of raw bytes answered with 16 bytes (no protobuf, no offload: the
floor any gRPC Python design pays); ``offload``: the real client transport and server;
``seed``: pickle over TCP (``bench.seed``). Window 8 for the two gRPC ones.
"""

from __future__ import annotations

import pickle
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psutil

from offload import Pipeline
from offload._codec import encode_into
from offload._device.transport import GrpcTransport
from offload._wire import size_options
from offload.v1 import offload_pb2 as pb

from . import seed
from .procs import ServerProcess, offload_server, seed_server

LIMIT = 16 * 1024 * 1024
_ECHO = """
import sys
from concurrent import futures
import grpc
def handler(requests, context):
    for _ in requests:
        yield b"x" * 16
server = grpc.server(futures.ThreadPoolExecutor(8),
                     options=[("grpc.max_receive_message_length", LIMIT)])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(handler)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"listening on 127.0.0.1:{port}", flush=True)
server.wait_for_termination()
""".replace("LIMIT", str(LIMIT))


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _windowed(
    send: Callable[[Any], None], results: Iterator[Any], items: list[Any], window: int
) -> None:
    credits = threading.Semaphore(window)

    def read() -> None:
        for _ in results:
            credits.release()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for item in items:
        credits.acquire()
        send(item)
    send(None)
    reader.join()


def _grpc(target: str, payloads: list[bytes], window: int) -> None:
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (data := outbox.get()) is not None:
            yield data

    with grpc.insecure_channel(target, options=size_options(LIMIT)) as channel:
        call = channel.stream_stream("/bench.Echo/Stream")(requests())
        _windowed(outbox.put, iter(call), list(payloads), window)


def _offload(target: str, pipeline: Pipeline, device: str, args: list[Any], window: int) -> None:
    transport = GrpcTransport(target, size_options(LIMIT), 10.0)
    try:
        stream = transport.open_stream()
        numbered = iter(range(len(args)))

        def send(value: Any) -> None:
            if value is None:
                stream.close()
                return
            # Encoding counts as transport, as pickling does for the seed.
            state = pb.TaskState(
                pipeline=pipeline.name,
                fingerprint=pipeline.fingerprint,
                device_id=device,
                run_id=device,
                item=next(numbered),
                next_task=6,
                capture_time=time.time(),
            )
            encode_into(state.args, value)
            stream.send(state)

        _windowed(send, stream.results(), args, window)
    finally:
        transport.close()


def _seed(port: int, args: list[Any]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for item, value in enumerate(args):
            payload = pickle.dumps((6, "transport", item, time.time(), value), protocol=5)
            conn.sendall(seed.HEADER.pack(len(payload)))
            conn.sendall(payload)
        conn.sendall(seed.HEADER.pack(seed.END))
        conn.makefile("rb").readline()


def run(
    pipeline: Pipeline, sizes: list[int], items: int, reps: int, log: Callable[[str], None]
) -> dict[str, Any]:
    echo = ServerProcess(["-c", _ECHO])
    servers = {"grpc": echo, "offload": offload_server(), "seed": seed_server("buffered")}
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(reps):
            for size in sizes:
                snapshot = bytes(size)
                args = [(snapshot, (250.0, 180.0), 25.0, (250, 180))] * items
                for system in ["grpc", "offload", "seed"][rep % 3 :] + ["grpc", "offload"][
                    : rep % 3
                ]:
                    server = servers[system]
                    device = f"transport-{system}-{rep}-{size}"
                    began, server_cpu = time.process_time(), _cpu(server.pid)
                    if system == "grpc":
                        _grpc(server.target, [snapshot] * items, 8)
                    elif system == "offload":
                        _offload(server.target, pipeline, device, args, 8)
                    else:
                        _seed(server.port, args)
                    record = {
                        "system": system,
                        "size": size,
                        "rep": rep,
                        "device_cpu_ms": 1000 * (time.process_time() - began) / items,
                        "server_cpu_ms": 1000 * (_cpu(server.pid) - server_cpu) / items,
                    }
                    runs.append(record)
                    log(
                        f"  rep {rep} {size:>7} B {system:8s} device "
                        f"{record['device_cpu_ms']:.3f} server {record['server_cpu_ms']:.3f} "
                        "ms/item"
                    )
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for size in sizes:
        for system in ("grpc", "offload", "seed"):
            mine = [r for r in runs if r["system"] == system and r["size"] == size]
            rows.append(
                {
                    "size": size,
                    "system": system,
                    **{
                        key: round(float(statistics.median(float(r[key]) for r in mine)), 3)
                        for key in ("device_cpu_ms", "server_cpu_ms")
                    },
                }
            )
    return {"items": items, "rows": rows, "runs": runs}
