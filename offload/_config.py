"""Configuration: frozen dataclasses whose defaults fit a Raspberry Pi client and a small server.

Each validates itself on construction, naming the command line's option (and the field, where
its name differs), so the command line, the environment and the API share one check per setting.
"""

from __future__ import annotations

import importlib
import ipaddress
import math
import os
import socket
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

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
    # Items of every list / tuple / map in one message, counted before it is parsed: parsing
    # costs ~75 bytes and ~0.4 us of CPU per element, a message may hold 8 million.
    max_total_elements: int = 100_000
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


def _address(server: str, address: str, *, names: bool) -> str:
    """The family of ``address`` (HOST:PORT) for gRPC's ipv4:/ipv6: targets, "name" for a host
    name (only if ``names``); a ConfigError naming what is wrong."""
    host, colon, port = address.rpartition(":")
    if not colon:
        example = f"{address or 'cloud.example.com'}:50051"
        raise ConfigError(
            f"--server {server!r}: give HOST:PORT, e.g. {example} (the server's default)"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--server {server!r}: {port!r} in {address!r} is not a port (1..65535)")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family = "ipv6" if ipaddress.ip_address(bare).version == 6 else "ipv4"
    except ValueError:
        family = "name"
    if family == "ipv6" and bare == host:
        raise ConfigError(f"--server {server!r}: put an IPv6 address in brackets: [{host}]:{port}")
    if family == "name" and (not names or not bare or "," in bare or "/" in bare):
        raise ConfigError(
            f"--server {server!r}: {host!r} is not an IP address; a list takes addresses "
            "(10.0.0.1:50051,10.0.0.2:50051); for a name, give one with a record per replica: "
            "dns:///offload.example.com:50051"
        )
    return family


def grpc_target(server: str) -> str:
    """The gRPC target for ``--server``: HOST:PORT; several replicas as IP:PORT,IP:PORT (one
    family: gRPC's ``ipv4:``/``ipv6:`` targets) or ``dns:///NAME:PORT`` (every record of NAME,
    re-resolved when connections fail). Refuses anything else, saying what is wrong."""
    scheme, colon, rest = server.partition(":")
    if colon and scheme in ("unix", "unix-abstract"):
        return server  # a local socket: gRPC's own target, as given
    if colon and scheme in ("dns", "ipv4", "ipv6"):
        if scheme == "dns":
            # dns:NAME:PORT, dns:///NAME:PORT, or dns://RESOLVER/NAME:PORT
            name = rest[2:].partition("/")[2] if rest.startswith("//") else rest
            _address(server, name, names=True)
            return server
        parts = rest.split(",")
    else:
        parts = server.split(",")
        if len(parts) == 1:
            _address(server, server, names=True)
            return server
    families = {_address(server, part.strip(), names=False) for part in parts}
    if len(families) > 1 or (colon and scheme in ("ipv4", "ipv6") and families != {scheme}):
        raise ConfigError(
            f"--server {server!r}: mixes IPv4 and IPv6 addresses; gRPC takes one family per "
            "list: give one, or a DNS name with both kinds of records (dns:///NAME:PORT)"
        )
    addresses = [part.strip() for part in parts]
    if len(set(addresses)) < len(addresses):
        raise ConfigError(f"--server {server!r}: an address is given twice; give each once")
    return f"{families.pop()}:{','.join(addresses)}"


WHEN_FULL = ("block", "drop-oldest", "reject-new")
OUTAGE = ("run-all", "hold-last")


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
    # While no server answers: "run-all" runs the remaining tasks here (right for a last task
    # that keeps no state, and for the embedded server, which never comes back); "hold-last"
    # runs all but the last and holds the item for the server, so that a shared aggregate sees
    # each item once (docs/reliability.md#outage-mode).
    outage: str = "run-all"
    # The buffer is bounded in bytes too (the encoded items it holds); one item always fits.
    buffer_bytes: int = 64 * MiB
    buffer_dir: str | None = None  # hold-last: keep the held items in SQLite here (durable)

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
        if self.outage not in OUTAGE:
            raise ConfigError(f"--outage {self.outage!r}: use one of {', '.join(OUTAGE)}")
        if self.buffer_bytes < 1024:
            raise ConfigError(f"--buffer-bytes {self.buffer_bytes}: give at least 1024 bytes")
        if self.buffer_dir is not None and not self.buffer_dir.strip():
            raise ConfigError("--buffer-dir is empty: give a folder, or leave the option out")
        if self.buffer_dir is not None and self.outage != "hold-last":
            raise ConfigError(
                f"--buffer-dir {self.buffer_dir} keeps the items held for the server: it "
                "needs --outage hold-last (with run-all they run here at once)"
            )


@dataclass(frozen=True)
class ClientConfig:
    """How the device runs. ``local_tasks=None`` is client-only mode (no server)."""

    pipeline: str = DEFAULT_PIPELINE
    local_tasks: int | None = None
    # HOST:PORT, replicas (IP:PORT,IP:PORT or dns:///NAME:PORT: grpc_target); None with a split
    # = start an embedded server
    server: str | None = None
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
    # Items tasks [1, K) run for at once, on threads (0: one per CPU this process may use). 1 by
    # default: a seed-format task may keep module state without saying so (``@stateful``), and
    # running it for two items at once would change its results; several is opt-in.
    device_workers: int = 1
    # Items' args compressed at the cut (zstd level 1, LZ4) when the server reads it and a
    # sample shrinks; "auto": the best installed codec, or the scheduler's choice per split.
    compression: str = "auto"
    # Items per message on the stream, like Kafka's producer: a message carries what is ready
    # (up to batch_items and batch_bytes), waiting up to linger_ms for more; linger 0 adds no
    # latency (only items that queued up while the previous message was sent go together).
    # batch_items 1 sends one item per message (the ExecuteRemaining RPC). None: 0, but in
    # automatic mode the scheduler chooses it with the split (up to 25 ms).
    batch_items: int = 8
    batch_bytes: int = 1 * MiB
    linger_ms: float | None = None

    def __post_init__(self) -> None:
        """Refuse what no run could mean, naming the command line's option for it."""
        _compression(self.compression)
        if not self.pipeline.strip():
            raise ConfigError("--pipeline is empty: give package.module or package.module:name")
        if self.server is not None:
            grpc_target(self.server)
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
        if self.device_workers < 0:
            raise ConfigError(
                f"--device-workers {self.device_workers}: give 1 or more (0: one per CPU)"
            )
        if self.local_tasks is not None or self.fps is not None:
            # Items on the device's workers count against the window and the buffer.
            for option, bound in (("--window", self.window), ("--buffer", self.link.buffer)):
                if self.device_items > bound:
                    raise ConfigError(
                        f"--device-workers {self.workers} exceeds {option} {bound}: items on "
                        f"the device's workers and the one captured ahead ({self.device_items}) "
                        f"count against it; raise {option} or give fewer"
                    )
        if self.batch_items < 1:
            raise ConfigError(f"--batch-items {self.batch_items}: give 1 or more (1 = no batching)")
        if self.batch_bytes < 1:
            raise ConfigError(f"--batch-bytes {self.batch_bytes}: give 1 or more bytes")
        if self.linger_ms is not None and not (
            math.isfinite(self.linger_ms) and self.linger_ms >= 0
        ):
            raise ConfigError(f"--linger-ms {self.linger_ms:g}: give milliseconds, 0 or more")

    @property
    def workers(self) -> int:
        """Device workers: ``device_workers``, or one per CPU this process may use if 0."""
        if self.device_workers:
            return self.device_workers
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )

    @property
    def device_items(self) -> int:
        """Items on the device at most: the one being captured and run, or with N > 1 workers
        N on them and one captured ahead (capture, the serial stage, never waits for a worker)."""
        return self.workers + 1 if self.workers > 1 else 1


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
    # Bytes of items read and not yet answered, per stream and over all streams: beyond them
    # the server reads no further (TCP pushes back); a stream holding nothing may read one.
    read_ahead_bytes: int = 16 * MiB
    read_ahead_total_bytes: int = 256 * MiB
    limits: Limits = Limits()
    security: ServerSecurity = ServerSecurity()
    keepalive: Keepalive = Keepalive()
    # A stream that neither sends an item nor takes an answer for this long is dropped, so a
    # stalled device cannot hold one of the `workers` threads forever.
    stream_idle_seconds: float = 120.0
    # One connection may open this many streams at once (HTTP/2 max concurrent streams): a
    # device needs one, and a rapid-reset flood (HEADERS + RST_STREAM) is then held to it.
    streams_per_connection: int = 16
    # Connections at once; the soft limit on open files is raised to fit at start.
    max_connections: int = 1000
    # A connection that has not finished its TLS and HTTP/2 handshake by then is closed.
    handshake_timeout: float = 10.0
    reflection: bool = True  # gRPC server reflection: grpcurl works without the .proto
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free); None = off
    metrics_max_devices: int = 100  # device label values; more devices are counted as "other"
    # Where the last task's state (and, with Redis, the remembered answers) lives: "memory" (this
    # process) or redis://HOST:PORT/DB, rediss:// for TLS (docs/state.md).
    state: str = "memory"
    state_password: str | None = field(default=None, repr=False)
    state_tls_ca: str | None = None  # rediss://: the PEM CA bundle of Redis (else system roots)
    state_timeout: float = 2.0  # a Redis call slower than this: the item is answered UNAVAILABLE
    # How long a device's answers and state outlive its last item: at least as long as a device
    # may keep items buffered before resending them.
    state_ttl: float = 86_400.0
    state_max_bytes: int = 64 * 1024  # one device's encoded state
    state_answers: int = 256  # answers per device run kept in Redis (>= window + buffer)
    # A connection older than this (gRPC adds +-10% jitter) is sent GOAWAY, so that long-lived
    # device streams spread over replicas a scale-out added; None = never. Its stream gets
    # ``max_connection_age_grace`` more seconds, then ends UNAVAILABLE: the device reconnects
    # (to any replica) and resends what was unanswered.
    max_connection_age: float | None = 600.0
    max_connection_age_grace: float = 20.0
    # Plaintext grpc.health.v1 only, on this port (0 = any free), for Kubernetes' gRPC probes,
    # which speak no TLS; None = off (health is served on the main port in any case).
    health_port: int | None = None
    # The fleet dashboard on this port (0 = any free), on `host`; None = off. It shows camera
    # images: beyond loopback it needs the token (security.token).
    dashboard_port: int | None = None
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
        _seconds("ServerConfig.handshake_timeout", self.handshake_timeout)
        for name in ("streams_per_connection", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServerConfig.{name} {getattr(self, name)}: give 1 or more")
        if self.max_connection_age is not None:
            _seconds("--max-connection-age", self.max_connection_age, name="max_connection_age")
        _seconds(
            "--max-connection-age-grace",
            self.max_connection_age_grace,
            zero=True,
            name="max_connection_age_grace",
        )
        _port("--health-port", self.health_port)
        if self.metrics_max_devices < 0:
            raise ConfigError(
                f"--metrics-max-devices {self.metrics_max_devices}: give 0 or more (devices "
                "beyond it are counted as 'other')"
            )
        _port("--dashboard-port", self.dashboard_port)
        if (
            self.dashboard_port is not None
            and self.security.token is None
            and not _is_loopback(self.host)
        ):
            raise ConfigError(
                f"--dashboard-port shows camera images to anyone who reaches --host {self.host}: "
                "set --token (the dashboard then asks for it), or bind --host 127.0.0.1"
            )
        _check_state(self)


def _check_state(config: ServerConfig) -> None:
    """The --state options: a store the server can open, bounds it can keep."""
    state = config.state
    if state != "memory":
        parts = urlsplit(state)
        example = "give memory or redis://HOST:PORT/DB (rediss:// for TLS)"
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(f"--state {state!r}: {example}")
        try:
            parts.port  # noqa: B018  (parsing it is the check)
        except ValueError:
            raise ConfigError(f"--state {state!r}: the port is not a number; {example}") from None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigError(f"--state {state!r}: the database is a number (/0); {example}")
        if parts.password:
            raise ConfigError(
                "--state: give the password in OFFLOAD_STATE_PASSWORD, not in the URL (the "
                "command line shows in ps)"
            )
    elif config.state_tls_ca is not None:
        raise ConfigError("--state-tls-ca needs --state rediss://HOST:PORT/DB")
    if config.state_password == "":
        raise ConfigError("--state-password is empty: give a value, or leave it out")
    _seconds("--state-timeout", config.state_timeout)
    if config.state_ttl < 60:
        raise ConfigError(
            f"--state-ttl {config.state_ttl:g}: give at least 60 seconds (answers must outlive "
            "the device's buffer of unanswered items)"
        )
    if config.state_max_bytes < 1024:
        raise ConfigError(f"--state-max-bytes {config.state_max_bytes}: give 1024 or more")
    if config.state_answers < 1:
        raise ConfigError(f"--state-answers {config.state_answers}: keep at least 1 per run")


def _is_loopback(host: str) -> bool:
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
