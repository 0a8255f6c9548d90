"""Configuration: frozen dataclasses whose defaults fit a Raspberry Pi client and a small server.

Each validates itself on construction, naming the command line's option (and the field, where
its name differs), so the command line, the environment and the API share one check per setting.
"""

from __future__ import annotations

import importlib
import math
import socket
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ._pipeline import DEFAULT_PIPELINE
from .exceptions import ConfigError

MiB = 1024 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's message limits are C ints


def field_default(cls: type, name: str) -> Any:
    """A field's default (its factory's value, if it has one), for a command line's default."""
    found = next(f for f in fields(cls) if f.name == name)
    if found.default is MISSING and found.default_factory is not MISSING:
        return found.default_factory()
    return found.default


def _seconds(option: str, value: float, *, zero: bool = False, name: str = "") -> None:
    """Refuse a duration that is negative (or zero, unless ``zero``), infinite or not a number.

    ``name`` is the field, when the option does not spell it (``--grace`` sets grace_seconds).
    """
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        field_name = f" ({name})" if name else ""
        raise ConfigError(f"{option} {value:g}: give a number of seconds, {least}{field_name}")


def _port(option: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise ConfigError(f"{option} {value} is not a port: use 0..65535 (0 picks a free one)")


# --compression: what crosses the cut compressed (and what the answers may be, the other way).
COMPRESSION = ("none", "lz4", "zstd", "auto")
_COMPRESSION_PACKAGES = {"zstd": ("zstandard", "zstandard"), "lz4": ("lz4", "lz4.block")}


def _compression(value: str) -> None:
    """Refuse an unknown ``--compression``, or one whose optional package is not installed."""
    if value not in COMPRESSION:
        raise ConfigError(f"--compression {value!r}: use one of {', '.join(COMPRESSION)}")
    package, module = _COMPRESSION_PACKAGES.get(value, ("", ""))
    if not package:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--compression {value} needs the {package} package, which is not installed: "
            "pip install 'offload[compression]', or use --compression auto (what is installed)"
        ) from None


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may contain; both sides enforce them before allocating."""

    # A 640x480 BGR frame plus its HSV copy is ~1.8 MiB; 16 MiB leaves room for 1080p stages.
    max_message_bytes: int = 16 * MiB
    max_depth: int = 32  # nesting of lists / tuples / maps
    max_elements: int = 100_000  # items in one list / tuple / map
    max_dims: int = 32  # array dimensions (NumPy's own limit is 64)

    def __post_init__(self) -> None:
        value = self.max_message_bytes
        if not 1024 <= value <= MAX_MESSAGE_BYTES:
            cap = f" (--max-message-bytes must be at most {MAX_MESSAGE_BYTES}: gRPC's limit)"
            raise ConfigError(
                f"--max-message-bytes {value}: use 1024 to {MAX_MESSAGE_BYTES}"
                + (cap if value > MAX_MESSAGE_BYTES else "")
            )


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive: a silent dead link is noticed within ``time + timeout`` seconds.

    The server accepts a ping every ``min_ping_interval`` seconds; a client pinging more often is
    sent GOAWAY ``too_many_pings``. So ``min_ping_interval`` must not exceed the client's ``time``:
    the defaults leave a factor of two.
    """

    time: float = 20.0  # ping after this many seconds without traffic
    timeout: float = 10.0  # no ping answer within this: the link is dead
    min_ping_interval: float = 10.0  # (server) the most frequent ping it accepts

    def __post_init__(self) -> None:
        # No command-line option sets these: the message names the field.
        for name in ("time", "timeout", "min_ping_interval"):
            _seconds(f"Keepalive.{name}", getattr(self, name))


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (``tls_cert`` + ``tls_key``), mutual TLS (``tls_client_ca``) and a shared token."""

    tls_cert: str | None = None  # PEM certificate chain of the server
    tls_key: str | None = None  # its PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates it signed
    token: str | None = field(default=None, repr=False)  # required as `authorization: Bearer`


@dataclass(frozen=True)
class ClientSecurity:
    """How the device reaches the server: plaintext, TLS (system roots or ``tls_ca``), mTLS."""

    tls: bool = False  # TLS with the system's root certificates (implied by tls_ca / tls_cert)
    tls_ca: str | None = None  # PEM CA bundle that signed the server's certificate
    tls_cert: str | None = None  # this device's PEM certificate, for mutual TLS
    tls_key: str | None = None  # its PEM private key
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        for option, value in [
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--token", self.token),
        ]:
            if value == "":
                raise ConfigError(f"{option} is empty: give a value, or leave the option out")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None


WHEN_FULL = ("block", "drop-oldest", "reject-new")


@dataclass(frozen=True)
class LinkConfig:
    """How the device rides out a flaky link or a restarting server (``_device/link.py``)."""

    # Items waiting for the server while it is away (cut at the split, encoded). Beyond this,
    # ``when_full``: "block" capture (lossless, right for files), "drop-oldest" (right for live
    # cameras: the freshest frames matter) or "reject-new"; drops are counted and reported.
    buffer: int = 32
    when_full: str = "block"
    # An item unanswered this long, with no other answer meanwhile, means the stream is stuck:
    # reset it (items queued behind each other at a slow server are progress, not a stall).
    item_timeout: float = 30.0
    # After a broken stream, unanswered items wait this long for a reconnect (to be resent:
    # the server replays what it already ran) before the device runs them itself.
    resend_grace: float = 5.0
    max_sends: int = 3  # an item sent this often without an answer runs on the device
    reconnect_backoff_max: float = 10.0  # gRPC's exponential connection backoff caps here

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ConfigError(f"--buffer {self.buffer}: at least 1 item must fit")
        if self.when_full not in WHEN_FULL:
            raise ConfigError(f"--when-full {self.when_full!r}: use one of {', '.join(WHEN_FULL)}")
        _seconds("--item-timeout", self.item_timeout)
        _seconds("--resend-grace", self.resend_grace, zero=True)
        _seconds("LinkConfig.reconnect_backoff_max", self.reconnect_backoff_max)
        if self.max_sends < 1:
            raise ConfigError(
                f"LinkConfig.max_sends {self.max_sends}: an item must be sent at least once"
            )


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
    security: ClientSecurity = ClientSecurity()
    keepalive: Keepalive = Keepalive()
    link: LinkConfig = LinkConfig()
    # Items' args compressed at the cut (zstd level 1, LZ4) when the server reads it and a
    # sample shrinks; "auto": the best installed codec, or the scheduler's choice per split.
    compression: str = "auto"

    def __post_init__(self) -> None:
        """Refuse what no run could mean, naming the command line's option for it."""
        _compression(self.compression)
        if not self.pipeline.strip():
            raise ConfigError("--pipeline is empty: give package.module or package.module:name")
        if self.server is not None and ":" not in self.server:
            example = f"{self.server or 'cloud.example.com'}:50051"
            raise ConfigError(
                f"--server {self.server!r}: give HOST:PORT, e.g. {example} (the server's default)"
            )
        if self.window < 1:
            raise ConfigError(f"--window {self.window}: at least 1 item must be in flight")
        if not self.device_id.strip():
            raise ConfigError(
                f"--device-id {self.device_id!r}: give this device a name (default: the host name)"
            )
        if self.frames is not None and self.frames < 0:
            raise ConfigError(f"--frames {self.frames}: give 0 or more items")
        if self.source is not None and not self.source.strip():
            raise ConfigError("--source is empty: give 'synthetic', a video file or a camera index")
        _seconds("--connect-timeout", self.connect_timeout, zero=True)
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"--fps {self.fps:g}: the target must be a positive items/s rate")
        _seconds("--control-period", self.control_period)
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1):
            raise ConfigError(
                f"--emulate-slowdown {self.slowdown:g}: use 1 (off) or more (slowdown)"
            )


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs."""

    pipeline: str = DEFAULT_PIPELINE
    host: str = "0.0.0.0"
    port: int = 50051
    # One thread per open device stream (gRPC's sync server): this is the stream limit too.
    workers: int = 64
    # Threads OpenCV may use inside one task. The server already runs its streams' items in
    # parallel, so a library pool per task only makes threads fight over the same cores
    # (measured on 2 cores: ~0.5 ms more server CPU per frame). None = the library's default.
    task_threads: int | None = 1
    grace_seconds: float = 5.0
    dedup_items: int = 1024  # answers remembered per device run, to replay a resent item
    max_runs: int = 10_000  # device runs remembered; the least recently used is forgotten
    # Answers remembered over all runs (~1 kB each for the demo): past it, the least recently
    # used runs are forgotten first. A run's resends need only its window and buffer.
    dedup_total: int = 100_000
    # The same in bytes (serialised answers; a task's error text is cut to 4096 characters).
    dedup_bytes: int = 64 * MiB
    limits: Limits = Limits()
    security: ServerSecurity = ServerSecurity()
    keepalive: Keepalive = Keepalive()
    # A stream that neither sends an item nor takes an answer for this long is dropped, so a
    # stalled device cannot hold one of the `workers` threads forever.
    stream_idle_seconds: float = 120.0
    reflection: bool = True  # gRPC server reflection: grpcurl works without the .proto
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free); None = off
    metrics_max_devices: int = 100  # device label values; more devices are counted as "other"
    # Answers' outputs compressed for a device that reads it (large results only).
    compression: str = "auto"

    def __post_init__(self) -> None:
        """Refuse what no server could mean, naming the command line's option for it."""
        _compression(self.compression)
        if not self.pipeline.strip():
            raise ConfigError("--pipeline is empty: give package.module or package.module:name")
        if not self.host.strip("[]"):
            raise ConfigError(
                "--host is empty: give an address, 0.0.0.0 (every IPv4 interface) or ::"
            )
        _port("--port", self.port)
        _port("--metrics-port", self.metrics_port)
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: at least 1 device stream must fit")
        if self.task_threads is not None and self.task_threads < 1:
            raise ConfigError(
                f"--task-threads must be at least 0 (0 = the libraries' own default); "
                f"task_threads {self.task_threads}: give 1 or more, or None for that default"
            )
        _seconds("--grace", self.grace_seconds, zero=True, name="grace_seconds")
        _seconds("ServerConfig.stream_idle_seconds", self.stream_idle_seconds)
        if self.metrics_max_devices < 0:
            raise ConfigError(
                f"--metrics-max-devices {self.metrics_max_devices}: give 0 or more (devices "
                "beyond it are counted as 'other')"
            )
