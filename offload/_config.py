"""Configuration: frozen dataclasses whose defaults fit a Raspberry Pi client and a small server."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from ._pipeline import DEFAULT_PIPELINE

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may contain; both sides enforce them before allocating."""

    # A 640x480 BGR frame plus its HSV copy is ~1.8 MiB; 16 MiB leaves room for 1080p stages.
    max_message_bytes: int = 16 * MiB
    max_depth: int = 32  # nesting of lists / tuples / maps
    max_elements: int = 100_000  # items in one list / tuple / map
    max_dims: int = 32  # array dimensions (NumPy's own limit is 64)


@dataclass(frozen=True)
class ClientConfig:
    """How the device runs. ``local_tasks=None`` is client-only mode (no server)."""

    pipeline: str = DEFAULT_PIPELINE
    local_tasks: int | None = None
    server: str | None = None  # HOST:PORT; None with a split = start an embedded server
    window: int = 8  # items in flight (sent, not yet answered)
    device_id: str = field(default_factory=socket.gethostname)
    frames: int | None = None  # stop after this many captured items
    source: str | None = None
    connect_timeout: float = 10.0
    fps: float | None = None  # automatic mode: the throughput target, completed items/s
    control_period: float = 2.0  # seconds between split decisions in automatic mode
    slowdown: float = 1.0  # emulate a device this many times slower (1 = off)
    limits: Limits = Limits()


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs."""

    pipeline: str = DEFAULT_PIPELINE
    host: str = "0.0.0.0"
    port: int = 50051
    # One thread per open device stream (gRPC's sync server): this is the stream limit too.
    workers: int = 64
    grace_seconds: float = 5.0
    dedup_items: int = 1024  # answers remembered per device run, to replay a resent item
    max_runs: int = 10_000  # device runs remembered; the least recently used is forgotten
    limits: Limits = Limits()
    reflection: bool = True  # gRPC server reflection: grpcurl works without the .proto
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free); None = off
    metrics_max_devices: int = 100  # device label values; more devices are counted as "other"
