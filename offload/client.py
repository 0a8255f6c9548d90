"""The device side: ``python -m offload.client`` runs a pipeline split between here and a server."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

from ._allocator import keep_large_buffers
from ._config import (
    COMPRESSION,
    OUTAGE,
    WHEN_FULL,
    ClientConfig,
    ClientSecurity,
    Limits,
    LinkConfig,
    field_default,
)
from ._device.autosplit import check_auto, starting_split
from ._device.buffer import check_folder
from ._device.client import Client, check_split
from ._device.embedded import EmbeddedServer
from ._device.emulation import LinkEmulator, LinkSpec
from ._device.progress import live_progress
from ._device.report import format_summary
from ._device.transport import Batching, GrpcTransport, client_options
from ._env import (
    OneLineParser,
    apply_env_defaults,
    from_environment,
    invoked_as,
    with_variables,
)
from ._logging import add_log_level_option
from ._logging import setup as setup_logging
from ._pipeline import Pipeline, load_pipeline
from ._security import channel_credentials
from .exceptions import ConfigError, OffloadError

log = logging.getLogger("offload.client")

EXAMPLES = [
    ("--frames 100", "client-only: all tasks on this device"),
    ("--local-tasks 3 --frames 300", "tasks 0-2 here, the rest on an embedded server"),
    ("--local-tasks 1 --server cloud.example.com:50051", "tasks 1-6 on that server"),
    ("--local-tasks 4 --source clip.mp4 --output results.jsonl", "a video file, results kept"),
    ("--local-tasks 2 --source 0", "camera 0, through OpenCV"),
    ("--local-tasks 6 --fps 20", "automatic: move the split to meet 20/s"),
    (
        "--fps 20 --emulate-slowdown 15 --emulate-link 200mbit,30ms",
        "... as a slow device on a slow link",
    ),
]


def build_parser(
    environ: Mapping[str, str] | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    """The client's options; each can also be set as ``OFFLOAD_<OPTION>`` (see ``_env``)."""
    prog = prog or invoked_as("offload.client")
    examples = "\n".join(f"  {prog} {args}\n      {what}" for args, what in EXAMPLES)
    parser = OneLineParser(
        prog=prog,
        description="Run a pipeline's first K tasks on this device and the rest on a server.\n"
        "Every option can also be set in the environment, named in [brackets].",
        epilog=f"examples:\n{examples}\n",
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
        default=ClientConfig.slowdown,
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
        metavar="HOST:PORT",
        help="the server, with --local-tasks (default: start an embedded one on loopback); "
        "replicas as IP:PORT,IP:PORT or dns:///NAME:PORT (every record of NAME), balanced "
        "round robin",
    )
    parser.add_argument(
        "--pipeline",
        default=ClientConfig.pipeline,
        help="import path: package.module or package.module:attribute (default %(default)s)",
    )
    parser.add_argument(
        "--source",
        help="what task 0 captures: 'synthetic' (default), 'synthetic:SEED', a video file, "
        "a camera index",
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
        default=field_default(ClientConfig, "device_id"),
        help="name this device reports (default: the host name)",
    )
    parser.add_argument(
        "--device-workers",
        type=int,
        default=ClientConfig.device_workers,
        metavar="N",
        help="run tasks [1, K) for up to N items at once on threads, results still in item order "
        "(default %(default)s; 0: one per CPU); @stateful tasks still run one item at a time",
    )
    parser.add_argument("--output", metavar="FILE", help="one JSON line per item, in item order")
    parser.add_argument("--report", metavar="FILE", help="write the summary as JSON")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=ClientConfig.connect_timeout,
        metavar="SECONDS",
        help="how long to wait at start for a server that does not answer (a refused "
        "connection is noticed at once; default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=Limits.max_message_bytes,
        metavar="BYTES",
        help="largest item or result on the wire (default %(default)s); the server must agree",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSION,
        default=ClientConfig.compression,
        help="compress items at the cut, where the server reads it and a sample shrinks; "
        "auto: the scheduler's choice with --fps, else the best installed (default %(default)s)",
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
    faults.add_argument(
        "--outage",
        choices=OUTAGE,
        default=LinkConfig.outage,
        help="while no server answers: run every task here (run-all, default), or all but the "
        "last and hold the items for the server (hold-last: for a last task that keeps state)",
    )
    faults.add_argument(
        "--buffer-bytes",
        type=int,
        default=LinkConfig.buffer_bytes,
        metavar="BYTES",
        help="the buffer's bound in bytes of encoded items (default %(default)s)",
    )
    faults.add_argument(
        "--buffer-dir",
        metavar="DIR",
        help="with --outage hold-last: keep held items in SQLite in DIR, so that a restart "
        "resends them",
    )
    security = parser.add_argument_group("security (with --server)")
    security.add_argument(
        "--tls", action="store_true", help="TLS, trusting the system's root certificates"
    )
    security.add_argument(
        "--tls-ca", metavar="PEM", help="TLS, trusting this CA for the server's certificate"
    )
    security.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="this device's certificate, for servers that require one (mutual TLS)",
    )
    security.add_argument("--tls-key", metavar="PEM", help="its private key")
    security.add_argument(
        "--token", help="the server's token (prefer the environment: arguments show in ps)"
    )
    batching = parser.add_argument_group("batching (several items per message, like Kafka's)")
    batching.add_argument(
        "--batch-items",
        type=int,
        default=ClientConfig.batch_items,
        metavar="N",
        help="most items in one message (default %(default)s; 1 = one item per message)",
    )
    batching.add_argument(
        "--batch-bytes",
        type=int,
        default=ClientConfig.batch_bytes,
        metavar="BYTES",
        help="most bytes in one message of several items (default %(default)s)",
    )
    batching.add_argument(
        "--linger-ms",
        type=float,
        default=ClientConfig.linger_ms,
        metavar="MS",
        help="wait up to this long for more items to fill a message (default 0: send what is "
        "ready, adding no latency; with --fps the scheduler chooses it, up to 25; 25 trades "
        "latency for less cloud CPU)",
    )
    add_log_level_option(parser, "WARNING")
    return apply_env_defaults(parser, environ)


def _check_writable(option: str, path: str) -> None:
    """Refuse a file that cannot be written before anything runs (--report is written last)."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{option} {path}: that is a folder; give a file name")
    if not folder.is_dir():
        raise ConfigError(
            f"{option} {path}: the folder {folder} does not exist; create it, or give another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise ConfigError(f"{option} {path}: not allowed to write there; give another path")


def _config(args: argparse.Namespace) -> ClientConfig:
    """The run's settings; the dataclasses refuse values no run could mean, naming the option."""
    if args.server is not None and args.local_tasks is None and args.fps is None:
        raise ConfigError(
            f"--server {args.server} needs a split: add --local-tasks K (tasks [0, K) here, the "
            "rest on the server), or run client-only without --server"
        )
    if args.emulate_link is not None and args.local_tasks is None and args.fps is None:
        raise ConfigError(
            "--emulate-link shapes the traffic to a server: add --local-tasks K, or leave it out "
            "for client-only mode"
        )
    return ClientConfig(
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
        device_workers=args.device_workers,
        limits=Limits(max_message_bytes=args.max_message_bytes),
        compression=args.compression,
        link=LinkConfig(
            buffer=args.buffer,
            when_full=args.when_full,
            item_timeout=args.item_timeout,
            resend_grace=args.resend_grace,
            outage=args.outage,
            buffer_bytes=args.buffer_bytes,
            buffer_dir=args.buffer_dir,
        ),
        security=ClientSecurity(
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        ),
        batch_items=args.batch_items,
        batch_bytes=args.batch_bytes,
        linger_ms=args.linger_ms,
    )


def _connect(
    args: argparse.Namespace,
    config: ClientConfig,
    link: LinkSpec | None,
    stack: contextlib.ExitStack,
    children: list[EmbeddedServer],
) -> GrpcTransport:
    target = args.server
    if not target:
        embedded = EmbeddedServer(
            config.pipeline, max_message_bytes=config.limits.max_message_bytes
        )
        stack.callback(embedded.stop)
        children.append(embedded)
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
    transport = GrpcTransport(
        target,
        client_options(config),
        config.connect_timeout,
        security,
        Batching.from_config(config),
    )
    stack.callback(transport.close)
    # Unreachable is said by the link, once, with gRPC's reason: refused, TLS on one side...
    return transport


class _Aborted(KeyboardInterrupt):
    """A second Ctrl-C / SIGTERM: stop at once. Not an Exception, so no ``except Exception``
    eats it; an interrupt, so items it leaves unfinished are said to be interrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the run began: nothing to finish
        return 128 + signal.SIGINT


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    output: IO[str] | None = None
    try:
        config = _config(args)
        for option, path in (("--output", args.output), ("--report", args.report)):
            if path is not None:
                _check_writable(option, path)
        if args.buffer_dir is not None:
            check_folder(args.buffer_dir)  # before anything runs: a usage error
        link = LinkSpec.parse(args.emulate_link) if args.emulate_link else None
        if args.server:
            channel_credentials(config.security)  # the PEM files are read (and checked) now
        pipeline = load_pipeline(args.pipeline)
        check_split(pipeline, args.local_tasks)
        check_auto(pipeline, config)
        if args.source is not None:
            pipeline.set_source(args.source)
        if args.output is not None:
            try:
                output = open(args.output, "w", encoding="utf-8")  # closed at the end of main
            except OSError as exc:
                message = f"--output {args.output}: cannot write it ({exc.strerror})"
                raise ConfigError(message) from None
    except (OffloadError, ValueError) as exc:
        parser.exit(2, f"error: {with_variables(str(exc), from_environment(parser, args))}\n")
    stop = _stop_on_signals()
    keep_large_buffers()  # before the first item: each cut's buffers are reused, not faulted in
    try:
        return _run(args, config, pipeline, link, output, stop)
    except _Aborted as exc:
        # The link is stopped and the embedded server too; items still running on the link's
        # threads are abandoned, as asked: exit before they (or the interpreter) say anything.
        for stream in (output, sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(128 + exc.signum)
    finally:
        if output is not None:
            output.close()


def _run(
    args: argparse.Namespace,
    config: ClientConfig,
    pipeline: Pipeline,
    link: LinkSpec | None,
    output: IO[str] | None,
    stop: threading.Event,
) -> int:
    report: dict[str, Any]
    transport: GrpcTransport | None = None
    children: list[EmbeddedServer] = []
    with contextlib.ExitStack() as stack:
        try:
            remote = starting_split(pipeline, config) < len(pipeline)
            transport = _connect(args, config, link, stack, children) if remote else None
            client = Client(pipeline, config, transport, output, stop)
            with live_progress(client, sys.stderr):
                report = client.run()
        except OffloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except _Aborted:  # Client.run has ended every item not_run already
            for child in children:  # no grace for its items: they are abandoned too
                child.process.kill()
            raise
    report["emulation"] = {"slowdown": args.emulate_slowdown, "link": str(link) if link else None}
    failure = transport.failure if transport is not None else None
    never = report["link"] is not None and report["link"]["connects"] == 0
    if transport is not None and never and failure is not None and failure.tls:
        # One side expects TLS: every item ran here, which is not the run that was asked for.
        report["error"] = report.get("error") or (
            f"never reached the server at {transport.target}: {failure}"
        )
    print(format_summary(report))
    if args.report:
        try:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        except OSError as exc:
            print(
                f"error: --report {args.report}: cannot write it ({exc.strerror})", file=sys.stderr
            )
            return 1
    if report.get("error"):
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def _stop_on_signals() -> threading.Event:
    """First Ctrl-C (SIGTERM, SIGHUP): stop capturing, let items in flight finish. Second: abort."""
    stop = threading.Event()
    calls = itertools.count(1)

    def handler(signum: int, _frame: FrameType | None) -> None:
        # A second signal may run this handler again before the first one returns: counting
        # comes first, in one step, so that whichever runs first is the first.
        call = next(calls)
        if call == 2:
            raise _Aborted(signum)
        if call > 2:
            os._exit(128 + signum)  # a third, while aborting: the user insists
        stop.set()  # before saying so: a second signal right after the line must abort
        print(
            f"\noffload: {signal.Signals(signum).name}: finishing items in flight (again to abort)",
            file=sys.stderr,
        )

    # SIGHUP too (the terminal closed): the embedded server, in a session of its own, does not
    # get it and must still be stopped. A signal ignored on purpose (nohup, `&`) stays ignored.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)
    return stop


if __name__ == "__main__":
    sys.exit(main())
