"""The cloud side: ``python -m offload.server`` serves ``ExecuteRemaining`` for many devices."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import FrameType

from ._allocator import keep_large_buffers
from ._cloud.prefork import reserve_port, run_processes
from ._cloud.serve import grpc_address, serve
from ._config import COMPRESSION, Limits, ServerConfig, ServerSecurity
from ._env import (
    OneLineParser,
    apply_env_defaults,
    from_environment,
    invoked_as,
    with_variables,
)
from ._logging import add_log_level_option
from ._logging import setup as setup_logging
from ._pipeline import load_pipeline
from .exceptions import ConfigError, OffloadError

log = logging.getLogger("offload.server")
# Options that are actions, not settings: no environment variable sets them.
ACTIONS = frozenset({"print_fingerprint"})


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The server's options; each can also be set as ``OFFLOAD_<OPTION>`` (see ``_env``)."""
    prog = invoked_as("offload.server")
    parser = OneLineParser(
        prog=prog,
        description="Run the remaining tasks of items that devices stream to this server.\n"
        "Every option can also be set in the environment, named in [brackets].",
        epilog="examples:\n"
        f"  {prog}                      # ball tracking on 0.0.0.0:50051\n"
        f"  {prog} --port 6000 --pipeline mypkg.pipeline\n"
        f"  OFFLOAD_METRICS_PORT=9464 {prog}   # with Prometheus metrics\n"
        f"  {prog} --print-fingerprint  # what a client in another language sends\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default=ServerConfig.host, help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=ServerConfig.port,
        help="gRPC port, 0 = any free one (default %(default)s)",
    )
    parser.add_argument(
        "--pipeline",
        default=ServerConfig.pipeline,
        help="import path: package.module or package.module:attribute (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=ServerConfig.workers,
        help="concurrent device streams (default %(default)s)",
    )
    parser.add_argument(
        "--task-threads",
        type=int,
        default=ServerConfig.task_threads,
        metavar="N",
        help="threads OpenCV may use inside one task; 0 = OpenCV's default (default "
        "%(default)s: streams already run in parallel, nested pools only fight over cores)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), forked at start; each keeps "
        "its own per-device state unless --state is shared (Redis) (default 1)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=ServerConfig.grace_seconds,
        metavar="SECONDS",
        help="on SIGTERM, how long streams in flight may take to finish (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=ServerConfig.metrics_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port "
        "(default: off; the container image uses 9464)",
    )
    parser.add_argument(
        "--metrics-max-devices",
        type=int,
        default=ServerConfig.metrics_max_devices,
        metavar="N",
        help="devices with their own metrics label; later ones count as 'other' (default "
        "%(default)s)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=ServerConfig.dashboard_port,
        metavar="PORT",
        help="serve the fleet dashboard at http(s)://HOST:PORT/ (0 picks a free port; "
        "beyond loopback it needs --token; default: off; docs/dashboard.md)",
    )
    parser.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=ServerConfig.reflection,
        help="turn off gRPC server reflection (on by default, so grpcurl needs no .proto)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=Limits.max_message_bytes,
        metavar="BYTES",
        help="largest item or result on the wire (default %(default)s); clients must agree",
    )
    state = parser.add_argument_group("state (docs/state.md)")
    state.add_argument(
        "--state",
        default=ServerConfig.state,
        metavar="URL",
        help="where the last task's state and the remembered answers live: memory (this "
        "process) or redis://HOST:PORT/DB, rediss:// for TLS, shared by replicas (default "
        "%(default)s)",
    )
    state.add_argument(
        "--state-password",
        help="the Redis password (prefer the environment: arguments show in ps)",
    )
    state.add_argument(
        "--state-tls-ca",
        metavar="PEM",
        help="rediss://: the CA bundle that signed Redis' certificate",
    )
    state.add_argument(
        "--state-timeout",
        type=float,
        default=ServerConfig.state_timeout,
        metavar="SECONDS",
        help="a slower Redis call answers the item UNAVAILABLE (default %(default)s)",
    )
    state.add_argument(
        "--state-ttl",
        type=float,
        default=ServerConfig.state_ttl,
        metavar="SECONDS",
        help="a device's answers and state expire this long after its last item; at least the "
        "time a device may buffer items (default %(default)s)",
    )
    state.add_argument(
        "--state-max-bytes",
        type=int,
        default=ServerConfig.state_max_bytes,
        metavar="BYTES",
        help="largest state of one device, encoded (default %(default)s)",
    )
    state.add_argument(
        "--state-answers",
        type=int,
        default=ServerConfig.state_answers,
        metavar="N",
        help="answers kept per device run in Redis, to replay resends (default %(default)s)",
    )
    parser.add_argument(
        "--max-connection-age",
        type=float,
        default=ServerConfig.max_connection_age,
        metavar="SECONDS",
        help="send GOAWAY to connections older than this (+-10%%), so device streams spread "
        "over new replicas; devices reconnect and resend; 0 = never (default %(default)s)",
    )
    parser.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=ServerConfig.max_connection_age_grace,
        metavar="SECONDS",
        help="how long a stream may go on after its connection's GOAWAY (default %(default)s)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=ServerConfig.health_port,
        metavar="PORT",
        help="also serve grpc.health.v1 alone, in plaintext, on PORT: for Kubernetes' gRPC "
        "probes, which speak no TLS (default: off)",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSION,
        default=ServerConfig.compression,
        help="compress large results for devices that read it (default %(default)s: the best "
        "installed)",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    security.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    security.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA; the certificate's "
        "name (SAN, else CN) becomes the device id",
    )
    security.add_argument(
        "--token",
        help="require this token from clients (prefer the environment: arguments show in ps)",
    )
    add_log_level_option(parser, "INFO")
    parser.add_argument(
        "--announce",
        action="store_true",
        help="print 'listening on HOST:PORT' to stdout once serving (for supervisors)",
    )
    parser.add_argument(
        "--print-fingerprint",
        action="store_true",
        help="print the pipeline's fingerprint (what a TaskState must carry) and exit",
    )
    return apply_env_defaults(parser, environ, skip=ACTIONS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # --processes is the one setting outside ServerConfig: each process serves one config.
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.processes > 1 and args.metrics_port is not None:
        parser.error("--metrics-port serves one process's metrics: use it with --processes 1")
    if args.processes > 1 and args.health_port is not None:
        parser.error("--health-port serves one process's health: use it with --processes 1")
    if args.processes > 1 and args.dashboard_port is not None:
        parser.error("--dashboard-port shows one process's devices: use it with --processes 1")
    try:
        config = _config(args)
    except ConfigError as exc:
        parser.error(with_variables(str(exc), from_environment(parser, args)))
    if args.print_fingerprint:
        try:
            print(load_pipeline(args.pipeline).fingerprint)
        except OffloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    keep_large_buffers()  # before the first item: ~1 ms less CPU per 560 kB frame
    if args.processes == 1:
        return _serve_until_signalled(config, args.announce)
    try:
        reserved = reserve_port(args.host, args.port)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = reserved.getsockname()[1]
    shared = replace(config, port=port)

    def child(_index: int, ready: Callable[[], None]) -> int:
        reserved.close()
        return _serve_until_signalled(shared, False, ready, share_port=True)

    try:
        _pids, wait = run_processes(args.processes, child)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        reserved.close()
    address = grpc_address(args.host, port)
    log.info("event=start processes=%d address=%s", args.processes, address)
    if args.announce:
        print(f"listening on {address}", flush=True)
    return wait()


def _config(args: argparse.Namespace) -> ServerConfig:
    """The server's settings; the dataclasses refuse values no server could mean."""
    return ServerConfig(
        pipeline=args.pipeline,
        host=args.host,
        port=args.port,
        workers=args.workers,
        # The command line's 0 is the library's default, which the dataclass spells None.
        task_threads=None if args.task_threads == 0 else args.task_threads,
        grace_seconds=args.grace,
        reflection=args.reflection,
        metrics_port=args.metrics_port,
        metrics_max_devices=args.metrics_max_devices,
        state=args.state,
        state_password=args.state_password,
        state_tls_ca=args.state_tls_ca,
        state_timeout=args.state_timeout,
        state_ttl=args.state_ttl,
        state_max_bytes=args.state_max_bytes,
        state_answers=args.state_answers,
        # The command line's 0 is "never", which the dataclass spells None.
        max_connection_age=args.max_connection_age or None,
        max_connection_age_grace=args.max_connection_age_grace,
        health_port=args.health_port,
        dashboard_port=args.dashboard_port,
        limits=Limits(max_message_bytes=args.max_message_bytes),
        compression=args.compression,
        security=ServerSecurity(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=args.token,
        ),
    )


def _serve_until_signalled(
    config: ServerConfig,
    announce: bool,
    ready: Callable[[], None] | None = None,
    share_port: bool = False,
) -> int:
    try:
        running = serve(config, share_port=share_port)
    except OffloadError as exc:  # the configuration: a port in use, a bad certificate, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info(
            "event=stopping signal=%s grace=%.1fs",
            signal.Signals(signum).name,
            config.grace_seconds,
        )
        # stop() blocks until in-flight streams finish: do it off the signal handler.
        threading.Thread(target=running.stop, args=(config.grace_seconds,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Announce only once a signal can stop us gracefully: supervisors may signal right away.
    if ready is not None:
        ready()
    if announce:
        print(f"listening on {grpc_address(config.host, running.port)}", flush=True)
        if running.metrics_port is not None:
            print(f"metrics on {grpc_address(config.host, running.metrics_port)}", flush=True)
        if running.health_port is not None:
            print(f"health on {grpc_address(config.host, running.health_port)}", flush=True)
        if running.dashboard_port is not None:
            print(f"dashboard on {grpc_address(config.host, running.dashboard_port)}", flush=True)
    running.wait()
    log.info("event=stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
