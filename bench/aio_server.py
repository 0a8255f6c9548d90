"""A grpc.aio server around offload's ``RemoteExecutor``, to compare concurrency models.

Not shipped: the tasks are CPU work under one GIL, so the event loop hands each item to a
thread pool, as the sync server does. ``python -m bench.aio_server [--pipeline P]`` prints
``listening on 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from offload import ServerConfig, load_pipeline
from offload._allocator import keep_large_buffers
from offload._cloud.executor import RemoteExecutor, RequestRejected
from offload._wire import size_options
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc


class AioServicer(pb_grpc.OffloadServicer):
    def __init__(self, executor: RemoteExecutor, pool: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.pool = pool

    async def ExecuteRemaining(
        self, request_iterator: AsyncIterator[pb.TaskState], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ItemResult]:
        loop = asyncio.get_running_loop()
        async for state in request_iterator:
            try:
                yield await loop.run_in_executor(self.pool, self.executor.execute, state)
            except RequestRejected as exc:
                await context.abort(exc.code, str(exc))

    async def ExecuteBatches(
        self, request_iterator: AsyncIterator[pb.TaskBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultBatch]:
        """Not served here: devices fall back to ``ExecuteRemaining``, as with an older server."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ExecuteBatches is not served here")
        yield pb.ResultBatch()  # pragma: no cover - abort raises; this makes a generator


async def _serve(pipeline_path: str, threads: int) -> None:
    config = ServerConfig(pipeline=pipeline_path, host="127.0.0.1", port=0)
    executor = RemoteExecutor(load_pipeline(pipeline_path), config)
    server = grpc.aio.server(options=size_options(config.limits.max_message_bytes))
    pb_grpc.add_OffloadServicer_to_server(
        AioServicer(executor, ThreadPoolExecutor(threads)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio_server", description=__doc__)
    parser.add_argument("--pipeline", default="bench.pipeline")
    parser.add_argument("--threads", type=int, default=4, help="task threads (default 4)")
    args = parser.parse_args(argv)
    keep_large_buffers()
    asyncio.run(_serve(args.pipeline, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
