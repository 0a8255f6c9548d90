"""Starting a server: ``serve()`` returns a running server bound to a port (0 = any free one).

Besides ``offload.v1.Offload`` the server speaks the standard ``grpc.health.v1`` health service
and, unless turned off, server reflection; with ``metrics_port`` it serves Prometheus metrics.
Those come from the ``server`` extra and are imported only here, when a server starts; without
the extra a server still runs (health and reflection off: the embedded server of a device's lean
install needs neither), and only ``metrics_port`` is refused, saying what to install.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from .._config import ServerConfig
from .._extras import optional as _optional
from .._extras import pip_install_server_extra, server_extra
from .._logging import quote
from .._pipeline import Pipeline, load_pipeline
from .._security import TokenAuth, server_credentials
from .._wire import SERVICE_NAME, keepalive_options
from ..exceptions import ConfigError
from .executor import RemoteExecutor
from .servicer import SPARE_THREADS, OffloadServicer

if TYPE_CHECKING:
    from .dashboard_http import Dashboard
    from .metrics import ServerMetrics

__all__ = [
    "SERVICE_NAME",
    "RunningServer",
    "bind_problem",
    "grpc_address",
    "serve",
    "server_options",
]

log = logging.getLogger("offload.server")


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC parses it: an IPv6 literal in brackets."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, found by binding a socket as gRPC does (with
    SO_REUSEADDR, without SO_REUSEPORT, so that any other holder of the port shows); None if
    it can be. The message names the option and what to do."""
    bare = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return (
            f"--host {host!r} is not an address or a name this machine can resolve ({reason}): "
            "give one of its addresses, 0.0.0.0 (every IPv4 interface) or 127.0.0.1"
        )
    failures: list[OSError] = []
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                failures.append(exc)
    if any(exc.errno == errno.EADDRINUSE for exc in failures):
        return (
            f"--port {port}: address already in use on {host} (another server or program "
            "listens there): stop it or choose another --port; servers share a port only as "
            "the processes of one --processes N"
        )
    if not failures or len(failures) < len(addresses):
        return None  # like gRPC, serve on the addresses that bind (localhost without IPv6)
    first = failures[0]
    if first.errno == errno.EADDRNOTAVAIL:
        return (
            f"--host {host} is not an address of this machine: give one of its addresses, "
            "0.0.0.0 (every IPv4 interface) or 127.0.0.1"
        )
    if first.errno == errno.EACCES:
        return (
            f"--port {port}: permission denied (ports below 1024 need privileges): choose a "
            "port of 1024 or more"
        )
    return f"cannot bind --host {host} --port {port}: {first.strerror}"


def server_options(config: ServerConfig, share_port: bool = False) -> list[tuple[str, int]]:
    """Size limits and keepalive: the server pings idle clients, and tolerates their pings.

    The port is the server's alone unless ``share_port`` (``--processes N``): gRPC sets
    SO_REUSEPORT by default, with which a second server on the same port starts silently and
    the kernel spreads the devices between the two.
    """
    keepalive = config.keepalive
    min_ping_ms = int(keepalive.min_ping_interval * 1000)
    limit = config.limits.max_message_bytes
    return [
        ("grpc.so_reuseport", int(share_port)),
        # Twice the limit reaches the service, which refuses anything over the limit itself
        # with a message naming --max-message-bytes; beyond that gRPC refuses on its own.
        ("grpc.max_receive_message_length", min(2 * limit, 2**31 - 1)),
        ("grpc.max_send_message_length", limit),
        *keepalive_options(keepalive),
        # Client pings closer together than this count as strikes; too many: too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
    ]


@dataclass
class RunningServer:
    """A started server: its bound ports, and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: Any  # grpc_health.v1.health.HealthServicer; None without the server extra
    servicer: OffloadServicer
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None
    dashboard: Dashboard | None = None
    dashboard_port: int | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within ``grace``."""
        if self.health is not None:
            health_pb2 = server_extra("grpc_health.v1.health_pb2")
            self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        stopped = self.server.stop(grace)  # refuses new streams from now on
        self.servicer.drain()  # streams end UNAVAILABLE after their current item
        stopped.wait()
        self.servicer.close()
        # Metrics stay readable until the last stream has ended, then the endpoint closes.
        if self.metrics is not None:
            self.metrics.stop_http()
        if self.dashboard is not None:
            self.dashboard.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()


def limit_task_threads(threads: int | None) -> None:
    """Cap the thread pool of OpenCV, if the pipeline uses it (see ServerConfig.task_threads)."""
    cv2 = sys.modules.get("cv2")
    if threads is not None and cv2 is not None:
        cv2.setNumThreads(threads)


def serve(
    config: ServerConfig = ServerConfig(),
    pipeline: Pipeline | None = None,
    share_port: bool = False,
) -> RunningServer:
    """Start a server (port 0 picks a free port; read it from ``.port``).

    A port already in use is a ``ConfigError``; ``share_port`` lets servers share one (the
    processes of ``--processes N``). Health checking and reflection are served when their
    packages (the ``server`` extra) are installed; ``metrics_port`` requires its package.
    """
    pipeline = pipeline or load_pipeline(config.pipeline)
    limit_task_threads(config.task_threads)
    credentials = server_credentials(config.security)
    token = config.security.token
    if config.metrics_port is not None:
        server_extra("prometheus_client", "--metrics-port")
    health = _optional("grpc_health.v1.health")
    reflection = _optional("grpc_reflection.v1alpha.reflection") if config.reflection else None
    if config.reflection and reflection is None:
        log.warning(
            "event=reflection-off reason=%s",
            quote(
                "grpcio-reflection is not installed, so grpcurl needs the .proto: "
                f"{pip_install_server_extra()}, or give --no-reflection"
            ),
        )
    metrics = None
    executor = RemoteExecutor(pipeline, config)
    # The token is checked first: an unauthenticated call reaches nothing else.
    interceptors: list[grpc.ServerInterceptor] = [TokenAuth(token)] if token is not None else []
    if config.metrics_port is not None:
        from .metrics import ServerMetrics, StreamMetrics  # noqa: PLC0415

        metrics = ServerMetrics(pipeline, config.metrics_max_devices)
        executor.add_listener(metrics.observe)
        interceptors.append(StreamMetrics(metrics))
    dashboard = None
    if config.dashboard_port is not None:
        from .dashboard import FleetBoard  # noqa: PLC0415
        from .dashboard_http import Dashboard  # noqa: PLC0415

        dashboard = Dashboard(FleetBoard(pipeline), config)
        executor.add_listener(dashboard.board.observe)
    # The servicer refuses device streams beyond `workers` itself (saying so, and logging it);
    # the spare threads answer health checks and those refusals when every worker is busy.
    threads = config.workers + SPARE_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="offload"),
        interceptors=interceptors,
        options=server_options(config, share_port),
        # Beyond this gRPC refuses with RESOURCE_EXHAUSTED on its own: nothing ever queues.
        maximum_concurrent_rpcs=threads,
    )
    servicer = OffloadServicer(executor)
    server.add_generic_rpc_handlers([servicer.handler()])
    services = [SERVICE_NAME]
    health_servicer = None
    if health is not None:
        health_servicer = health.HealthServicer()
        server_extra("grpc_health.v1.health_pb2_grpc").add_HealthServicer_to_server(
            health_servicer, server
        )
        services.append(health.SERVICE_NAME)
    if reflection is not None:
        services.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
    address = grpc_address(config.host, config.port)
    # Found before gRPC tries, so that its own log line does not precede ours (a child of
    # --processes N binds a port its parent holds: the parent checked it).
    problem = None if share_port else bind_problem(config.host, config.port)
    if problem is not None:
        servicer.close()
        raise ConfigError(problem)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's "Failed to bind": find out why
        port = 0
    if port == 0:
        servicer.close()
        raise ConfigError(
            bind_problem(config.host, config.port)
            or f"cannot serve on {address}: gRPC refused it (GRPC_VERBOSITY=debug shows why)"
        )
    metrics_port = None
    if metrics is not None and config.metrics_port is not None:
        try:
            metrics_port = metrics.start_http(config.host, config.metrics_port)
        except ConfigError:
            server.stop(None)
            servicer.close()
            raise
    dashboard_port = None
    if dashboard is not None:
        try:
            dashboard_port = dashboard.start()
        except ConfigError:
            server.stop(None)
            servicer.close()
            if metrics is not None:
                metrics.stop_http()
            raise
    server.start()
    if health_servicer is not None:
        serving = server_extra("grpc_health.v1.health_pb2").HealthCheckResponse.SERVING
        health_servicer.set("", serving)
        health_servicer.set(SERVICE_NAME, serving)
    log.info(
        "event=start address=%s pipeline=%s fingerprint=%s tasks=%d workers=%d "
        "health=%s reflection=%s metrics=%s dashboard=%s tls=%s client_certs=%s token=%s "
        "max_message_bytes=%d",
        grpc_address(config.host, port),
        pipeline.name,
        pipeline.fingerprint,
        len(pipeline),
        config.workers,
        "on" if health_servicer is not None else "off",
        "on" if reflection is not None else "off",
        grpc_address(config.host, metrics_port) if metrics_port is not None else "off",
        grpc_address(config.host, dashboard_port) if dashboard_port is not None else "off",
        "on" if credentials is not None else "off",
        "required" if config.security.tls_client_ca is not None else "off",
        "required" if token is not None else "off",
        config.limits.max_message_bytes,
    )
    return RunningServer(
        server, port, health_servicer, servicer, metrics, metrics_port, dashboard, dashboard_port
    )
