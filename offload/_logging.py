"""Log lines as ``key=value`` fields (logfmt), one line per event, for both command lines.

    ts=2026-01-31T12:00:00.123 level=INFO logger=offload.server event=connect device=pi-7 ...

Values with spaces, quotes or ``=`` are double-quoted (``quote``), so every line splits into
fields with one regular expression and log tools index them without configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "ts=%(asctime)s.%(msecs)03d level=%(levelname)s logger=%(name)s %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def quote(value: object) -> str:
    """A logfmt value: bare when it is one plain word, else a JSON (double-quoted) string."""
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def add_log_level_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=default,
        metavar="LEVEL",
        help=f"{', '.join(LEVELS)} (default %(default)s)",
    )


def setup(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT, datefmt=DATE_FORMAT)


class RefusalLog:
    """Which refusals to log: a device's first, then at most one per ``interval`` with the
    number refused meanwhile, so that a device retrying in a loop cannot flood the log."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # device: (last logged, refused since)

    def count(self, device: str) -> int:
        """Count a refusal; the refusals to report now (this one included), or 0 for none."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget devices quiet for an interval
                self._seen = {
                    d: seen for d, seen in self._seen.items() if now - seen[0] < self.interval
                }
            logged, since = self._seen.get(device, (-self.interval, 0))
            if now - logged < self.interval:
                self._seen[device] = (logged, since + 1)
                return 0
            self._seen[device] = (now, 0)
            return since + 1
