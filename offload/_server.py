"""Starting a server: ``serve()`` returns a running server bound to a port (0 = any free one).

Besides ``offload.v1.Offload`` the server speaks the standard ``grpc.health.v1`` health service
and, unless turned off, server reflection; with ``metrics_port`` it serves Prometheus metrics.
Those come from the ``server`` extra and are imported only here, when a server starts, so a
device's lean install (no extra) imports everything else.
"""

from __future__ import annotations

import importlib
import logging
from concurrent import futures
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc

from ._config import ServerConfig
from ._pipeline import Pipeline, load_pipeline
from ._service import OffloadServicer, RemoteExecutor
from .exceptions import OffloadError
from .v1 import offload_pb2 as pb
from .v1 import offload_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

log = logging.getLogger("offload.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Offload"].full_name  # "offload.v1.Offload"


def server_extra(module: str) -> ModuleType:
    """Import a package of the ``server`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OffloadError(
            f"the server needs {exc.name or module}, which a device install leaves out: "
            "pip install 'offload[server]'"
        ) from None


def channel_options(config_limit: int) -> list[tuple[str, int]]:
    """Message size limits shared by the server and the client channel."""
    return [
        ("grpc.max_receive_message_length", config_limit),
        ("grpc.max_send_message_length", config_limit),
    ]


@dataclass
class RunningServer:
    """A started server: its bound ports, and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: Any  # grpc_health.v1.health.HealthServicer
    servicer: OffloadServicer
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within ``grace``."""
        not_serving = server_extra("grpc_health.v1.health_pb2").HealthCheckResponse.NOT_SERVING
        self.health.set("", not_serving)
        self.health.set(SERVICE_NAME, not_serving)
        self.server.stop(grace).wait()
        # Metrics stay readable until the last stream has ended, then the endpoint closes.
        if self.metrics is not None:
            self.metrics.stop_http()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(config: ServerConfig = ServerConfig(), pipeline: Pipeline | None = None) -> RunningServer:
    """Start a server (port 0 picks a free port; read it from ``.port``)."""
    pipeline = pipeline or load_pipeline(config.pipeline)
    health = server_extra("grpc_health.v1.health")
    health_pb2 = server_extra("grpc_health.v1.health_pb2")
    health_pb2_grpc = server_extra("grpc_health.v1.health_pb2_grpc")
    metrics = None
    executor = RemoteExecutor(pipeline, config)
    interceptors = []
    if config.metrics_port is not None:
        server_extra("prometheus_client")
        from ._metrics import MeteredExecutor, ServerMetrics, StreamMetrics  # noqa: PLC0415

        metrics = ServerMetrics(pipeline, config.metrics_max_devices)
        executor = MeteredExecutor(pipeline, config, metrics)
        interceptors.append(StreamMetrics(metrics))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="offload"),
        interceptors=interceptors,
        options=channel_options(config.limits.max_message_bytes),
        # Beyond this many streams a new one is refused with RESOURCE_EXHAUSTED, not queued.
        maximum_concurrent_rpcs=config.workers,
    )
    servicer = OffloadServicer(executor)
    pb_grpc.add_OffloadServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [SERVICE_NAME, health.SERVICE_NAME]
    if config.reflection:
        reflection = server_extra("grpc_reflection.v1alpha.reflection")
        services.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OffloadError(f"cannot bind {config.host}:{config.port}: is the port in use?")
    metrics_port = None
    if metrics is not None and config.metrics_port is not None:
        try:
            metrics_port = metrics.start_http(config.host, config.metrics_port)
        except OffloadError:
            server.stop(None)
            raise
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "event=start address=%s:%d pipeline=%s fingerprint=%s tasks=%d workers=%d "
        "reflection=%s metrics=%s",
        config.host,
        port,
        pipeline.name,
        pipeline.fingerprint,
        len(pipeline),
        config.workers,
        "on" if config.reflection else "off",
        f"{config.host}:{metrics_port}" if metrics_port is not None else "off",
    )
    return RunningServer(server, port, health_servicer, servicer, metrics, metrics_port)
