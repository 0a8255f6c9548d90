"""The seed's wire approach, reimplemented for comparison only (never part of ``offload``).

The 2019 prototype pickled the task arguments and wrote them, length-prefixed, to a plain TCP
socket, one item at a time, fire-and-forget (no result back); its server unpickled each item and
ran the remaining tasks. Two receivers:

* ``buffered``: done competently: the header and payload are read with ``recv_into`` straight
  into a buffer of the announced size;
* ``grow4k``: the prototype's own loop, ``data += conn.recv(4096)`` until the payload is there
  (quadratic: every 4 KiB re-copies what came before), with glibc's default allocator as the
  prototype had (so each growth past 128 kB maps fresh pages).

Because nothing comes back per item, the client learns the server's counts at the end: it sends
an empty header and the server answers with a JSON line once every item before it has run.
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import struct
import sys
import threading
import time
from typing import Any

from offload import load_pipeline
from offload._allocator import keep_large_buffers
from offload._pipeline import ItemContext, Pipeline, Status, run_tasks

HEADER = struct.Struct("!Q")
END = 0


def _recv_exact(conn: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:], size - got)
        if n == 0:
            return None
        got += n
    return buffer


class _Grow4k:
    """The prototype's receive loop: a bytes buffer grown 4 KiB at a time."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.data = b""

    def read(self, size: int) -> bytes | None:
        while len(self.data) < size:
            packet = self.conn.recv(4096)
            if not packet:
                return None
            self.data += packet
        out, self.data = self.data[:size], self.data[size:]
        return out


def _serve_connection(conn: socket.socket, pipeline: Pipeline, receive: str) -> None:
    counts = {"completed": 0, "filtered": 0, "failed": 0}
    grow = _Grow4k(conn)
    with conn:
        while True:
            header = (
                _recv_exact(conn, HEADER.size) if receive == "buffered" else grow.read(HEADER.size)
            )
            if header is None:
                return
            (size,) = HEADER.unpack(header)
            if size == END:
                conn.sendall(json.dumps(counts).encode() + b"\n")
                return
            payload: bytes | bytearray | None = (
                _recv_exact(conn, size) if receive == "buffered" else grow.read(size)
            )
            if payload is None:
                return
            # The seed's flaw, reproduced on purpose in the benchmark only: unpickling network
            # data runs whatever code the sender chose.
            next_task, device_id, item, capture_time, args = pickle.loads(payload)  # noqa: S301
            context = ItemContext(device_id, "seed", item, capture_time, on_server=True)
            outcome = run_tasks(pipeline, next_task, len(pipeline.tasks), args, context)
            status = outcome.status
            key = "completed" if status is Status.COMPLETED else status.value
            counts[key] = counts.get(key, 0) + 1


def serve(pipeline_path: str, receive: str) -> None:
    """Accept devices on a loopback port (printed on stdout), one thread per connection."""
    pipeline = load_pipeline(pipeline_path)
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(
            target=_serve_connection, args=(conn, pipeline, receive), daemon=True
        ).start()


def run_device(
    pipeline: Pipeline, port: int, local_tasks: int, device_id: str = "seed-device"
) -> dict[str, Any]:
    """Run tasks [0, K) here, send each item and forget it; the server's counts at the end."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        began: float | None = None
        item = 0
        local_filtered = 0
        while True:
            capture_time = time.time()
            context = ItemContext(device_id, "seed", item, capture_time, on_server=False)
            now = time.perf_counter()
            outcome = run_tasks(pipeline, 0, local_tasks, None, context)
            if outcome.task == 0 and outcome.status is Status.FILTERED:
                break
            if began is None:
                began = now
            if outcome.status is Status.CONTINUE:
                payload = pickle.dumps(
                    (local_tasks, device_id, item, capture_time, outcome.value),
                    protocol=pickle.HIGHEST_PROTOCOL,
                )
                conn.sendall(HEADER.pack(len(payload)))
                conn.sendall(payload)
            else:
                local_filtered += 1
            item += 1
        conn.sendall(HEADER.pack(END))
        reply = conn.makefile("rb").readline()
        elapsed = time.perf_counter() - (began or 0.0)
    counts = json.loads(reply)
    return {
        "items": item,
        "completed": counts["completed"],
        "filtered": counts["filtered"] + local_filtered,
        "failed": counts["failed"],
        "elapsed_seconds": elapsed,
        "throughput_per_second": counts["completed"] / elapsed if elapsed else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__)
    parser.add_argument("--pipeline", default="bench.pipeline")
    parser.add_argument("--receive", choices=("buffered", "grow4k"), default="buffered")
    args = parser.parse_args(argv)
    if args.receive == "buffered":
        # The competent version gets offload's allocator tuning: a fair comparison. The 2019
        # prototype ran with glibc's defaults, under which every ``+=`` past 128 kB maps and
        # faults in fresh pages: that is the prototype as it was.
        keep_large_buffers()
    serve(args.pipeline, args.receive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
