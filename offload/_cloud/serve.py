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
import resource
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
HEALTH_MAX_CALLS = 8  # the plaintext health port (--health-port): calls at once...
# Bytes of one stream the device may send ahead of what the server has read (HTTP/2's receive
# window, fixed: gRPC's BDP probe grows it with the queue of a slow link, until a keepalive ping
# waits longer behind the queued data than its timeout and the stream is reset). A link queues at
# most this: 1.6 s at 5 Mbit/s; a link slower than 8 MiB / keepalive timeout (0.8 Mbit/s with
# the default 10 s) needs a longer --keepalive-timeout. It caps one stream at this per RTT
# (170 Mbit/s at 50 ms).
RECEIVE_WINDOW = 2**20
HEALTH_MAX_BYTES = 4096  # ...and the largest request it reads


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
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
        # Client pings closer together than this count as strikes; too many: too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        # Hostile connections (docs/security.md): streams and connections at once, a deadline
        # for the handshake (TLS, HTTP/2 preface), a connection without a stream closed like an
        # idle stream (not before 10 s: a client connects before it streams), and headers (the
        # token included) of at most 8 KiB, 16 KiB hard.
        ("grpc.max_concurrent_streams", config.streams_per_connection),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(max(config.stream_idle_seconds, 10.0) * 1000)),
        ("grpc.max_metadata_size", 8 * 1024),
        ("grpc.absolute_max_metadata_size", 16 * 1024),
        *connection_age_options(config),
    ]


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """GOAWAY to connections older than ``max_connection_age`` (streams rebalance over
    replicas), which keep ``max_connection_age_grace`` seconds to finish."""
    if config.max_connection_age is None:
        return []
    return [
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)),
    ]


def raise_open_files_limit(config: ServerConfig) -> None:
    """Raise the soft limit on open files to fit ``max_connections`` (and the threads' own), as
    far as the hard limit allows; say so if it does not (the common soft limit is 1024)."""
    needed = config.max_connections + 2 * config.workers + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "event=open-files-limit soft=%d hard=%d needed=%d reason=%s",
            target,
            hard,
            needed,
            quote(
                "the hard limit on open files is below what --workers and "
                "ServerConfig.max_connections need: raise it (ulimit -Hn, LimitNOFILE=)"
            ),
        )


@dataclass
class RunningServer:
    """A started server: its bound ports, and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: Any  # grpc_health.v1.health.HealthServicer; None without the server extra
    servicer: OffloadServicer
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None
    health_server: grpc.Server | None = None  # plaintext health only (--health-port)
    health_port: int | None = None
    dashboard: Dashboard | None = None
    dashboard_port: int | None = None
    stopping: bool = False

    def set_health(self, serving: bool) -> None:
        """SERVING only while the state store is reachable and the server is not stopping."""
        if self.health is None:
            return
        serving = serving and not self.stopping and self.servicer.executor.store.reachable
        response = server_extra("grpc_health.v1.health_pb2").HealthCheckResponse
        status = response.SERVING if serving else response.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within ``grace``."""
        self.stopping = True
        self.set_health(False)
        stopped = self.server.stop(grace)  # refuses new streams from now on
        self.servicer.drain()  # streams end UNAVAILABLE after their current item
        stopped.wait()
        self.servicer.close()
        self.servicer.executor.store.close()
        # Metrics stay readable until the last stream has ended, then the endpoint closes.
        if self.metrics is not None:
            self.metrics.stop_http()
        if self.health_server is not None:  # it said NOT_SERVING until now
            self.health_server.stop(None)
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
    raise_open_files_limit(config)
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
    auth = TokenAuth(token) if token is not None else None
    interceptors: list[grpc.ServerInterceptor] = [auth] if auth is not None else []
    if config.metrics_port is not None:
        from .metrics import ServerMetrics, StreamMetrics  # noqa: PLC0415

        metrics = ServerMetrics(pipeline, config.metrics_max_devices)
        executor.add_listener(metrics.observe)
        if auth is not None:
            auth.add_listener(metrics.unauthenticated.inc)
        metrics.watch_store(executor.store)
        interceptors.append(StreamMetrics(metrics))
    dashboard = None
    if config.dashboard_port is not None:
        from .dashboard import FleetBoard  # noqa: PLC0415
        from .dashboard_http import Dashboard  # noqa: PLC0415

        dashboard = Dashboard(FleetBoard(pipeline), config)
        executor.add_listener(dashboard.board.observe)
    # The servicer refuses device streams beyond `workers` itself (saying so, and logging it);
    # as many again may wait for their first item without holding a worker (OffloadServicer);
    # the spare threads answer health checks and those refusals when every worker is busy.
    threads = 2 * config.workers + SPARE_THREADS
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
    health_server, health_port = None, None
    dashboard_port = None
    try:
        if config.health_port is not None:
            health_server, health_port = _health_only(config, health_servicer)
        if dashboard is not None:
            dashboard_port = dashboard.start()
    except ConfigError:
        server.stop(None)
        servicer.close()
        if metrics is not None:
            metrics.stop_http()
        if health_server is not None:
            health_server.stop(None)
        raise
    server.start()
    running = RunningServer(
        server,
        port,
        health_servicer,
        servicer,
        metrics,
        metrics_port,
        health_server,
        health_port,
        dashboard,
        dashboard_port,
    )
    # NOT_SERVING while the state store is unreachable: a load balancer sends devices elsewhere.
    executor.store.add_health_listener(running.set_health)
    running.set_health(True)
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
    if health_port is not None:
        log.info("event=health-port address=%s", grpc_address(config.host, health_port))
    log.info("event=state store=%s", quote(executor.store.name))
    return running


def _health_only(config: ServerConfig, health_servicer: Any) -> tuple[grpc.Server, int]:
    """A plaintext server of grpc.health.v1 alone (Kubernetes' gRPC probes speak no TLS): the
    main server's health servicer, so both say the same; started at once."""
    assert config.health_port is not None
    if health_servicer is None:
        server_extra("grpc_health.v1.health", "--health-port")  # says what to install
    problem = bind_problem(config.host, config.health_port)
    if problem is not None:
        raise ConfigError(problem.replace("--port", "--health-port"))
    # Probes ask one tiny question at a time: 8 calls at once, 4 kB each, is plenty.
    health = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[("grpc.max_receive_message_length", HEALTH_MAX_BYTES)],
        maximum_concurrent_rpcs=HEALTH_MAX_CALLS,
    )
    stubs = server_extra("grpc_health.v1.health_pb2_grpc")

    class CheckOnly(stubs.HealthServicer):  # type: ignore[misc,name-defined]
        """Check, as the main port answers it; Watch (a call held open) is left UNIMPLEMENTED,
        so that no client can hold the calls the probes need."""

        def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
            return health_servicer.Check(request, context)

    stubs.add_HealthServicer_to_server(CheckOnly(), health)
    port = health.add_insecure_port(grpc_address(config.host, config.health_port))
    health.start()
    return health, port
