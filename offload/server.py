"""The cloud side: ``python -m offload.server`` serves ``ExecuteRemaining`` for many devices."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from ._allocator import keep_large_buffers
from ._config import ServerConfig
from ._pipeline import DEFAULT_PIPELINE
from ._prefork import reserve_port, run_processes
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
        "--processes",
        type=int,
        default=int(env("OFFLOAD_PROCESSES", "1")),
        help="server processes sharing the port (SO_REUSEPORT), forked at start; each keeps "
        "its own per-device state, so aggregation sees only its own devices (default 1)",
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
    for name in ("workers", "processes"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1", file=sys.stderr)
            return 2
    config = ServerConfig(
        pipeline=args.pipeline, host=args.host, port=args.port, workers=args.workers
    )
    keep_large_buffers()  # before the first item: ~1 ms less CPU per 560 kB frame
    if args.processes == 1:
        return _serve_until_signalled(config, args.announce)
    try:
        reserved = reserve_port(args.host, args.port)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    port = reserved.getsockname()[1]
    shared = replace(config, port=port)

    def child(_index: int, ready: Callable[[], None]) -> int:
        reserved.close()
        return _serve_until_signalled(shared, False, ready)

    try:
        _pids, wait = run_processes(args.processes, child)
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        reserved.close()
    log.info("event=start processes=%d address=%s:%d", args.processes, args.host, port)
    if args.announce:
        print(f"listening on {args.host}:{port}", flush=True)
    return wait()


def _serve_until_signalled(
    config: ServerConfig, announce: bool, ready: Callable[[], None] | None = None
) -> int:
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
    if ready is not None:
        ready()
    if announce:
        print(f"listening on {config.host}:{running.port}", flush=True)
    running.wait()
    log.info("event=stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
