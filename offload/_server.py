"""Starting a server: ``serve()`` returns a running server bound to a port (0 = any free one)."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._config import ServerConfig
from ._pipeline import Pipeline, load_pipeline
from ._security import TokenAuth, server_credentials
from ._service import SERVICE_NAME, OffloadServicer, RemoteExecutor
from .exceptions import OffloadError

log = logging.getLogger("offload.server")


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
    return [
        *channel_options(config.limits.max_message_bytes),
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
    """A started server: its bound port, and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: OffloadServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within ``grace``."""
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        stopped = self.server.stop(grace)  # refuses new streams from now on
        self.servicer.drain()
        stopped.wait()
        self.servicer.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(config: ServerConfig = ServerConfig(), pipeline: Pipeline | None = None) -> RunningServer:
    """Start a server (port 0 picks a free port; read it from ``.port``)."""
    pipeline = pipeline or load_pipeline(config.pipeline)
    config.keepalive.check()
    credentials = server_credentials(config.security)
    token = config.security.token
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="offload"),
        interceptors=[TokenAuth(token)] if token is not None else None,
        options=server_options(config),
        # Beyond this many streams a new one is refused with RESOURCE_EXHAUSTED, not queued.
        maximum_concurrent_rpcs=config.workers,
    )
    servicer = OffloadServicer(RemoteExecutor(pipeline, config))
    server.add_generic_rpc_handlers([servicer.handler()])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OffloadError(f"cannot bind {config.host}:{config.port}: is the port in use?")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "event=start address=%s:%d pipeline=%s fingerprint=%s tasks=%d workers=%d tls=%s "
        "client_certs=%s token=%s max_message_bytes=%d",
        config.host,
        port,
        pipeline.name,
        pipeline.fingerprint,
        len(pipeline),
        config.workers,
        credentials is not None,
        config.security.tls_client_ca is not None,
        token is not None,
        config.limits.max_message_bytes,
    )
    return RunningServer(server, port, health_servicer, servicer)
