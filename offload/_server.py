"""Starting a server: ``serve()`` returns a running server bound to a port (0 = any free one)."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._config import ServerConfig
from ._pipeline import Pipeline, load_pipeline
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
        config.host,
        port,
        pipeline.name,
        pipeline.fingerprint,
        len(pipeline),
        config.workers,
    )
    return RunningServer(server, port, health_servicer, servicer)
