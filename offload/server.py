"""The cloud side: ``python -m offload.server`` serves ``ExecuteRemaining`` for many devices."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._config import ServerConfig
from ._pipeline import DEFAULT_PIPELINE, Pipeline, load_pipeline
from ._service import OffloadServicer, RemoteExecutor
from .exceptions import OffloadError
from .v1 import offload_pb2_grpc as pb_grpc

log = logging.getLogger("offload.server")

SERVICE_NAME = "offload.v1.Offload"


def channel_options(config_limit: int) -> list[tuple[str, int]]:
    """Message size limits shared by the server and the client channel."""
    return [
        ("grpc.max_receive_message_length", config_limit),
        ("grpc.max_send_message_length", config_limit),
    ]


@dataclass
class RunningServer:
    """A started server: its bound port, and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: OffloadServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within ``grace``."""
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(config: ServerConfig = ServerConfig(), pipeline: Pipeline | None = None) -> RunningServer:
    """Start a server (port 0 picks a free port; read it from ``.port``)."""
    pipeline = pipeline or load_pipeline(config.pipeline)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="offload"),
        options=channel_options(config.limits.max_message_bytes),
        # Beyond this many streams a new one is refused with RESOURCE_EXHAUSTED, not queued.
        maximum_concurrent_rpcs=config.workers,
    )
    servicer = OffloadServicer(RemoteExecutor(pipeline, config))
    pb_grpc.add_OffloadServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OffloadError(f"cannot bind {config.host}:{config.port}: is the port in use?")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "event=start address=%s:%d pipeline=%s fingerprint=%s tasks=%d workers=%d",
        config.host, port, pipeline.name, pipeline.fingerprint, len(pipeline), config.workers,
    )
    return RunningServer(server, port, health_servicer, servicer)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m offload.server",
        description="Run the remaining tasks of items that devices stream to this server.",
        epilog="examples:\n"
        "  python -m offload.server                      # ball tracking on 0.0.0.0:50051\n"
        "  python -m offload.server --port 6000 --pipeline mypkg.pipeline\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=env("OFFLOAD_HOST", "0.0.0.0"), help="address to bind")
    parser.add_argument(
        "--port", type=int, default=int(env("OFFLOAD_PORT", "50051")), help="0 picks a free port"
    )
    parser.add_argument(
        "--pipeline",
        default=env("OFFLOAD_PIPELINE", DEFAULT_PIPELINE),
        help="import path: package.module or package.module:attribute (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("OFFLOAD_WORKERS", "64")),
        help="concurrent device streams (default %(default)s)",
    )
    parser.add_argument("--log-level", default=env("OFFLOAD_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--announce",
        action="store_true",
        help="print 'listening on HOST:PORT' to stdout once serving (for supervisors)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    config = ServerConfig(
        pipeline=args.pipeline, host=args.host, port=args.port, workers=args.workers
    )
    try:
        running = serve(config)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.announce:
        print(f"listening on {args.host}:{running.port}", flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("event=stopping signal=%s grace=%.1fs", signal.Signals(signum).name, config.grace_seconds)
        # stop() blocks until in-flight streams finish: do it off the signal handler.
        threading.Thread(target=running.stop, args=(config.grace_seconds,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.wait()
    log.info("event=stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
