"""``python -m offload.healthcheck``: exit 0 if the server's gRPC health service says SERVING.

The container image's HEALTHCHECK runs it inside the container, so by default it asks
``127.0.0.1:$OFFLOAD_PORT`` (or ``$OFFLOAD_HOST`` when the server binds one address). Exit
codes: 0 serving, 1 not serving or unreachable, 2 bad usage.

A server with TLS is asked over TLS: the trust root is ``--tls-ca``, else the server's own
certificate (``$OFFLOAD_TLS_CERT``, right for a self-signed one). The health service is open
without the server's token; a server that requires client certificates needs ``--tls-cert``
and ``--tls-key`` here too. Options read ``OFFLOAD_HEALTHCHECK_<OPTION>`` from the environment.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping

import grpc

from ._config import ClientSecurity
from ._env import apply_env_defaults, invoked_as
from ._extras import server_extra
from ._security import channel_credentials
from ._wire import SERVICE_NAME
from .exceptions import OffloadError

ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


def default_address(environ: Mapping[str, str]) -> str:
    host = environ.get("OFFLOAD_HOST", "")
    host = "127.0.0.1" if host in ANY_ADDRESS else host
    return f"{host}:{environ.get('OFFLOAD_PORT') or '50051'}"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=invoked_as("offload.healthcheck"),
        description="Ask an offload server's gRPC health service; exit 0 when SERVING.",
    )
    parser.add_argument(
        "--address",
        default=default_address(environ),
        metavar="HOST:PORT",
        help="the server (default %(default)s, from $OFFLOAD_HOST and $OFFLOAD_PORT)",
    )
    parser.add_argument(
        "--service",
        default=SERVICE_NAME,
        help="the service to ask about; '' = the whole server (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait (default %(default)s)"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=environ.get("OFFLOAD_TLS_CERT"),
        help="use TLS, trusting this CA (default: the server's $OFFLOAD_TLS_CERT, if set)",
    )
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="the name in the server's certificate"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key")
    return apply_env_defaults(parser, environ, prefix="OFFLOAD_HEALTHCHECK_")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    security = ClientSecurity(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    credentials = channel_credentials(security)
    assert credentials is not None  # tls_ca is given
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(serving, what the server said) for the parsed options."""
    health_pb2 = server_extra("grpc_health.v1.health_pb2", "python -m offload.healthcheck")
    health_pb2_grpc = server_extra(
        "grpc_health.v1.health_pb2_grpc", "python -m offload.healthcheck"
    )
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=args.service)
        try:
            response = stub.Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if not 0 < args.timeout < math.inf:
        parser.error(f"--timeout {args.timeout}: give a positive number of seconds")
    try:
        serving, said = check(args)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = args.service or "(server)"
    print(f"{args.address} {service}: {said}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
