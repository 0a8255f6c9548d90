"""Starting a server: ``serve()`` returns a running server bound to a port (0 = any free one).

Besides ``offload.v1.Offload`` the server speaks the standard ``grpc.health.v1`` health service
and, unless turned off, server reflection; with ``metrics_port`` it serves Prometheus metrics.
Those come from the ``server`` extra and are imported only here, when a server starts, so a
device's lean install (no extra) imports everything else.
"""

from __future__ import annotations

import importlib
import logging
import sys
from concurrent import futures
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc

from ._config import ServerConfig
from ._pipeline import Pipeline, load_pipeline
from ._security import TokenAuth, server_credentials
from ._service import SERVICE_NAME, OffloadServicer, RemoteExecutor
from .exceptions import OffloadError

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

__all__ = [
    "SERVICE_NAME",
    "RunningServer",
    "channel_options",
    "serve",
    "server_extra",
    "server_options",
]

log = logging.getLogger("offload.server")


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


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Size limits and keepalive: the server pings idle clients, and tolerates their pings."""
    keepalive = config.keepalive
    min_ping_ms = int(keepalive.min_ping_interval * 1000)
    limit = config.limits.max_message_bytes
    return [
        # Twice the limit reaches the service, which refuses anything over the limit itself
        # with a message naming --max-message-bytes; beyond that gRPC refuses on its own.
        ("grpc.max_receive_message_length", min(2 * limit, 2**31 - 1)),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
        # gRPC >= 1.6x waits for a ping's answer this long (default a minute), whatever the
        # keepalive timeout says: without it a silent peer goes unnoticed for a minute.
        ("grpc.http2.ping_timeout_ms", int(keepalive.timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Client pings closer together than this count as strikes; too many: too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
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
        stopped = self.server.stop(grace)  # refuses new streams from now on
        self.servicer.drain()  # streams end UNAVAILABLE after their current item
        stopped.wait()
        self.servicer.close()
        # Metrics stay readable until the last stream has ended, then the endpoint closes.
        if self.metrics is not None:
            self.metrics.stop_http()

    def wait(self) -> None:
        self.server.wait_for_termination()


def limit_task_threads(threads: int | None) -> None:
    """Cap the thread pool of OpenCV, if the pipeline uses it (see ServerConfig.task_threads)."""
    cv2 = sys.modules.get("cv2")
    if threads is not None and cv2 is not None:
        cv2.setNumThreads(threads)


def serve(config: ServerConfig = ServerConfig(), pipeline: Pipeline | None = None) -> RunningServer:
    """Start a server (port 0 picks a free port; read it from ``.port``)."""
    pipeline = pipeline or load_pipeline(config.pipeline)
    if config.task_threads is not None and config.task_threads < 1:
        raise OffloadError(
            f"task_threads {config.task_threads}: give at least 1, or None for the libraries' "
            "own default"
        )
    limit_task_threads(config.task_threads)
    config.keepalive.check()
    credentials = server_credentials(config.security)
    token = config.security.token
    health = server_extra("grpc_health.v1.health")
    health_pb2 = server_extra("grpc_health.v1.health_pb2")
    health_pb2_grpc = server_extra("grpc_health.v1.health_pb2_grpc")
    metrics = None
    executor = RemoteExecutor(pipeline, config)
    # The token is checked first: an unauthenticated call reaches nothing else.
    interceptors: list[grpc.ServerInterceptor] = [TokenAuth(token)] if token is not None else []
    if config.metrics_port is not None:
        server_extra("prometheus_client")
        from ._metrics import MeteredExecutor, ServerMetrics, StreamMetrics  # noqa: PLC0415

        metrics = ServerMetrics(pipeline, config.metrics_max_devices)
        executor = MeteredExecutor(pipeline, config, metrics)
        interceptors.append(StreamMetrics(metrics))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="offload"),
        interceptors=interceptors,
        options=server_options(config),
        # Beyond this many streams a new one is refused with RESOURCE_EXHAUSTED, not queued.
        maximum_concurrent_rpcs=config.workers,
    )
    servicer = OffloadServicer(executor)
    server.add_generic_rpc_handlers([servicer.handler()])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [SERVICE_NAME, health.SERVICE_NAME]
    if config.reflection:
        reflection = server_extra("grpc_reflection.v1alpha.reflection")
        services.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        servicer.close()
        raise OffloadError(f"cannot bind {config.host}:{config.port}: is the port in use?")
    metrics_port = None
    if metrics is not None and config.metrics_port is not None:
        try:
            metrics_port = metrics.start_http(config.host, config.metrics_port)
        except OffloadError:
            server.stop(None)
            servicer.close()
            raise
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "event=start address=%s:%d pipeline=%s fingerprint=%s tasks=%d workers=%d "
        "reflection=%s metrics=%s tls=%s client_certs=%s token=%s max_message_bytes=%d",
        config.host,
        port,
        pipeline.name,
        pipeline.fingerprint,
        len(pipeline),
        config.workers,
        "on" if config.reflection else "off",
        f"{config.host}:{metrics_port}" if metrics_port is not None else "off",
        "on" if credentials is not None else "off",
        "required" if config.security.tls_client_ca is not None else "off",
        "required" if token is not None else "off",
        config.limits.max_message_bytes,
    )
    return RunningServer(server, port, health_servicer, servicer, metrics, metrics_port)
