"""The cloud side: ``python -m offload.server`` serves ``ExecuteRemaining`` for many devices."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from ._config import Limits, ServerConfig, ServerSecurity
from ._pipeline import DEFAULT_PIPELINE
from ._server import serve
from .exceptions import OffloadError

log = logging.getLogger("offload.server")


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
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(env("OFFLOAD_MAX_MESSAGE_BYTES", str(Limits.max_message_bytes))),
        metavar="BYTES",
        help="largest item or result on the wire (default %(default)s); clients must agree",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls-cert", default=env("OFFLOAD_TLS_CERT"), metavar="PEM", help="serve TLS: certificate"
    )
    security.add_argument(
        "--tls-key", default=env("OFFLOAD_TLS_KEY"), metavar="PEM", help="its private key"
    )
    security.add_argument(
        "--tls-client-ca",
        default=env("OFFLOAD_TLS_CLIENT_CA"),
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA; the certificate's "
        "name (SAN, else CN) becomes the device id",
    )
    security.add_argument(
        "--token",
        default=env("OFFLOAD_TOKEN"),
        help="require this token from clients (prefer $OFFLOAD_TOKEN: arguments show in ps)",
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
    if args.max_message_bytes < 1024:
        print("error: --max-message-bytes must be at least 1024", file=sys.stderr)
        return 2
    config = ServerConfig(
        pipeline=args.pipeline,
        host=args.host,
        port=args.port,
        workers=args.workers,
        limits=Limits(max_message_bytes=args.max_message_bytes),
        security=ServerSecurity(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=args.token,
        ),
    )
    try:
        running = serve(config)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
    if args.announce:
        print(f"listening on {args.host}:{running.port}", flush=True)
    running.wait()
    log.info("event=stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
