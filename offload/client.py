"""The device side: ``python -m offload.client`` runs a pipeline split between here and a server."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import IO, Any

from ._client import Client, check_auto, check_split, starting_split
from ._config import WHEN_FULL, ClientConfig, ClientSecurity, Limits, LinkConfig
from ._embedded import EmbeddedServer
from ._emulation import LinkEmulator, LinkSpec
from ._logging import add_log_level_option
from ._logging import setup as setup_logging
from ._pipeline import DEFAULT_PIPELINE, load_pipeline
from ._progress import live_progress
from ._report import format_summary
from ._transport import GrpcTransport, Transport, client_options
from .exceptions import ConfigError, OffloadError

log = logging.getLogger("offload.client")

EPILOG = """\
examples:
  python -m offload.client --frames 100                  client-only: all tasks on this device
  python -m offload.client --local-tasks 3 --frames 300  tasks 0-2 here, the rest on an
                                                         embedded server (no --server given)
  python -m offload.client --local-tasks 1 --server cloud.example.com:50051
  python -m offload.client --local-tasks 4 --source clip.mp4 --output results.jsonl
  python -m offload.client --local-tasks 2 --source 0     camera 0, through OpenCV
  python -m offload.client --local-tasks 6 --fps 20       automatic: move the split to meet 20/s
  python -m offload.client --fps 20 --emulate-slowdown 15 --emulate-link 200mbit,30ms
                                                          ... as a slow device on a slow link
"""


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m offload.client",
        description="Run a pipeline's first K tasks on this device and the rest on a server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--local-tasks",
        type=int,
        metavar="K",
        help="tasks [0, K) run here, the rest on the server; omit for client-only mode",
    )
    parser.add_argument(
        "--fps",
        type=float,
        metavar="TARGET",
        help="automatic mode: move the split to complete TARGET items/s with the least server "
        "work, starting at --local-tasks (default N-1)",
    )
    parser.add_argument(
        "--control-period",
        type=float,
        default=ClientConfig.control_period,
        metavar="SECONDS",
        help="automatic mode: seconds between split decisions (default %(default)s)",
    )
    parser.add_argument(
        "--emulate-slowdown",
        type=float,
        default=1.0,
        metavar="X",
        help="emulate a device X times slower: local tasks sleep to take X times their CPU time",
    )
    parser.add_argument(
        "--emulate-link",
        metavar="RATE[,RTT]",
        help="shape traffic to the server, e.g. 20mbit,30ms (units as in Linux tc)",
    )
    parser.add_argument(
        "--server",
        default=env("OFFLOAD_SERVER"),
        metavar="HOST:PORT",
        help="the server (default $OFFLOAD_SERVER; none: start an embedded one on loopback)",
    )
    parser.add_argument(
        "--pipeline",
        default=env("OFFLOAD_PIPELINE", DEFAULT_PIPELINE),
        help="import path: package.module or package.module:attribute (default %(default)s)",
    )
    parser.add_argument(
        "--source", help="what task 0 captures: 'synthetic' (default), a video file, a camera index"
    )
    parser.add_argument("--frames", type=int, metavar="N", help="stop after N items")
    parser.add_argument(
        "--window",
        type=int,
        default=ClientConfig.window,
        metavar="W",
        help="items in flight to the server (default %(default)s)",
    )
    parser.add_argument(
        "--device-id",
        default=env("OFFLOAD_DEVICE_ID") or socket.gethostname(),
        help="name this device reports (default: the host name)",
    )
    parser.add_argument("--output", metavar="FILE", help="one JSON line per item, in item order")
    parser.add_argument("--report", metavar="FILE", help="write the summary as JSON")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=ClientConfig.connect_timeout,
        metavar="SECONDS",
        help="how long to wait for the server at start (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(env("OFFLOAD_MAX_MESSAGE_BYTES", str(Limits.max_message_bytes))),
        metavar="BYTES",
        help="largest item or result on the wire (default %(default)s); the server must agree",
    )
    faults = parser.add_argument_group("when the server is away")
    faults.add_argument(
        "--buffer",
        type=int,
        default=LinkConfig.buffer,
        metavar="N",
        help="items that wait for the server while it is away (default %(default)s)",
    )
    faults.add_argument(
        "--when-full",
        choices=WHEN_FULL,
        default=LinkConfig.when_full,
        help="a full buffer blocks capture (default), drops its oldest item or the new one",
    )
    faults.add_argument(
        "--item-timeout",
        type=float,
        default=LinkConfig.item_timeout,
        metavar="SECONDS",
        help="an item unanswered this long, with no other answer meanwhile, resets the stream "
        "(default %(default)s)",
    )
    faults.add_argument(
        "--resend-grace",
        type=float,
        default=LinkConfig.resend_grace,
        metavar="SECONDS",
        help="after a broken stream, how long unanswered items wait for a reconnect before "
        "running here (default %(default)s)",
    )
    security = parser.add_argument_group("security (with --server)")
    security.add_argument(
        "--tls", action="store_true", help="TLS, trusting the system's root certificates"
    )
    security.add_argument(
        "--tls-ca",
        default=env("OFFLOAD_TLS_CA"),
        metavar="PEM",
        help="TLS, trusting this CA for the server's certificate",
    )
    security.add_argument(
        "--tls-cert",
        default=env("OFFLOAD_TLS_CERT"),
        metavar="PEM",
        help="this device's certificate, for servers that require one (mutual TLS)",
    )
    security.add_argument(
        "--tls-key", default=env("OFFLOAD_TLS_KEY"), metavar="PEM", help="its private key"
    )
    security.add_argument(
        "--token",
        default=env("OFFLOAD_TOKEN"),
        help="the server's token (prefer $OFFLOAD_TOKEN: arguments show in ps)",
    )
    add_log_level_option(parser, env("OFFLOAD_LOG_LEVEL", "WARNING").upper())
    return parser


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[IO[str] | None]:
    if path is None:
        yield None
        return
    with open(path, "w", encoding="utf-8") as f:
        yield f


def _connect(
    args: argparse.Namespace,
    config: ClientConfig,
    link: LinkSpec | None,
    stack: contextlib.ExitStack,
) -> Transport:
    target = args.server
    if not target:
        embedded = EmbeddedServer(
            config.pipeline, max_message_bytes=config.limits.max_message_bytes
        )
        stack.callback(embedded.stop)
        target = embedded.target
        print(
            f"offload: no --server given; started an embedded server on {target}", file=sys.stderr
        )
    if link is not None:
        emulator = LinkEmulator(target, link)
        stack.callback(emulator.close)
        print(f"offload: emulating a {link} link to the server", file=sys.stderr)
        target = emulator.target
    # The embedded server is a plaintext child on loopback: credentials are for --server.
    security = config.security if args.server else ClientSecurity()
    transport = GrpcTransport(target, client_options(config), config.connect_timeout, security)
    stack.callback(transport.close)
    if not transport.initially_ready:
        print(
            f"offload: cannot reach the server at {target} within {config.connect_timeout:.0f} s "
            "(is `python -m offload.server` running there? do both sides agree on TLS?); "
            "running every task on this device meanwhile, and reconnecting with backoff",
            file=sys.stderr,
        )
    return transport


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.frames is not None and args.frames < 0:
        parser.error("--frames must be 0 or more")
    try:
        pipeline = load_pipeline(args.pipeline)
        check_split(pipeline, args.local_tasks)
        if args.window < 1:
            raise ConfigError(f"--window {args.window}: at least 1 item must be in flight")
        if args.max_message_bytes < 1024:
            raise ConfigError(f"--max-message-bytes {args.max_message_bytes}: at least 1024")
        if args.emulate_slowdown < 1:
            raise ConfigError(f"--emulate-slowdown {args.emulate_slowdown}: use 1 (off) or more")
        link = LinkSpec.parse(args.emulate_link) if args.emulate_link else None
        config = ClientConfig(
            pipeline=args.pipeline,
            local_tasks=args.local_tasks,
            server=args.server,
            window=args.window,
            device_id=args.device_id,
            frames=args.frames,
            source=args.source,
            connect_timeout=args.connect_timeout,
            fps=args.fps,
            control_period=args.control_period,
            slowdown=args.emulate_slowdown,
            limits=Limits(max_message_bytes=args.max_message_bytes),
            link=LinkConfig(
                buffer=args.buffer,
                when_full=args.when_full,
                item_timeout=args.item_timeout,
                resend_grace=args.resend_grace,
            ),
            security=ClientSecurity(
                tls=args.tls,
                tls_ca=args.tls_ca,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                token=args.token,
            ),
        )
        config.link.check()
        check_auto(pipeline, config)
        if args.source is not None:
            pipeline.set_source(args.source)
    except (OffloadError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    report: dict[str, Any]
    stop = _stop_on_signals()
    try:
        with contextlib.ExitStack() as stack, _open_output(args.output) as output:
            remote = starting_split(pipeline, config) < len(pipeline)
            transport = _connect(args, config, link, stack) if remote else None
            client = Client(pipeline, config, transport, output, stop)
            with live_progress(client, sys.stderr):
                report = client.run()
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["emulation"] = {"slowdown": args.emulate_slowdown, "link": str(link) if link else None}
    print(format_summary(report))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if report.get("error"):
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def _stop_on_signals() -> threading.Event:
    """First Ctrl-C / SIGTERM: stop capturing and let items in flight finish. Second: abort."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            f"\noffload: {signal.Signals(signum).name}: finishing items in flight (again to abort)",
            file=sys.stderr,
        )
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


if __name__ == "__main__":
    sys.exit(main())
