"""The device's transport seam: the ``Transport`` and ``Stream`` protocols the link speaks, and
``GrpcTransport``, the real one (``offload.testing.InProcessTransport`` is the one without a
network).
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from .. import _batch
from .._config import ClientConfig, ClientSecurity, grpc_target
from .._security import call_metadata, channel_credentials
from .._wire import (
    BATCH_METHOD,
    HEALTH_CHECK,
    METHOD,
    NOT_RUN_TRAILER,
    keepalive_options,
    parse_reads,
    server_error,
    size_options,
)
from ..exceptions import ConfigError, ServerError
from ..v1 import offload_pb2 as pb

# Asked to learn whether the server answers: open to every client (no token), and cheap.
_CLOSE = object()


class Stream(Protocol):
    """One ``ExecuteRemaining`` stream: send items, iterate answers with their wire sizes."""

    def send(self, state: pb.TaskState) -> int:
        """Queue one item; returns its size on the wire in bytes."""
        ...

    def send_bytes(self, data: bytes) -> int:
        """Queue one already encoded item (a resend costs no second encoding)."""
        ...

    def results(self) -> Iterator[tuple[pb.ItemResult, int]]:
        """Answers in arrival order; raises ``ServerError`` if the stream fails."""
        ...

    def reads(self) -> frozenset[int] | None:
        """The encodings (pb.Codec) the server said it reads when the stream opened, once its
        headers arrive (None: it did not say; its answers will)."""
        ...

    def close(self) -> None:
        """No more items: the answers still due will arrive, then ``results`` ends."""
        ...

    def cancel(self) -> None:
        """Abandon the stream now."""
        ...


class Transport(Protocol):
    def ready(self, timeout: float) -> bool:
        """Whether a stream can be opened now, waiting up to ``timeout`` seconds for it."""
        ...

    def open_stream(self) -> Stream: ...

    def close(self) -> None: ...


# Several replicas: round_robin keeps a connection to each one ready, so a stream that breaks
# opens again on another replica at once (pick_first would first have to connect to one); each
# new stream goes to the next replica, and gRPC starts each channel's round at a random one, so
# devices spread. A replica that goes away leaves the round until it answers again.
LOAD_BALANCING = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def client_options(config: ClientConfig) -> list[tuple[str, int | str]]:
    """The channel's size limits, keepalive (a dead link is noticed), reconnect backoff and load
    balancing over the server's replicas."""
    return [
        ("grpc.service_config", LOAD_BALANCING),
        *size_options(config.limits.max_message_bytes),
        *keepalive_options(config.keepalive),
        # gRPC reconnects with exponential backoff and jitter; cap it so a returning server is
        # used again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(config.link.reconnect_backoff_max * 1000)),
        # A device's own connection: gRPC otherwise shares one among channels of identical
        # settings, and the server takes a bounded number of streams per connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _server_error(exc: grpc.RpcError) -> ServerError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailer = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return server_error(code.name, details or "", NOT_RUN_TRAILER in tuple(trailer or ()))


@dataclass(frozen=True)
class ConnectFailure:
    """Why the server cannot be reached: one clause saying what is wrong and what to do."""

    reason: str
    tls: bool = False  # the two sides disagree on TLS: no retry helps until one side changes

    def __str__(self) -> str:
        return self.reason


def _host_port(target: str) -> tuple[str, int] | None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _speaks_tls(target: str, timeout: float) -> bool | None:
    """Whether whoever listens at ``target`` completes a TLS handshake (None: cannot tell)."""
    address = _host_port(target)
    if address is None:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol is in question, not who it is
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(address, timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=address[0]),
        ):
            return True
    except ssl.SSLError:
        return False
    except OSError:
        return None


def diagnose(
    target: str, security: ClientSecurity, code: grpc.StatusCode, details: str, timeout: float
) -> ConnectFailure:
    """Say why a call that did not wait for the channel failed, from gRPC's own last error.

    gRPC's words for one-sided TLS are "WRONG_VERSION_NUMBER" (TLS here, plaintext there) and
    "Socket closed" (plaintext here, TLS there, or a client certificate refused): the latter is
    told apart by trying a TLS handshake with the server.
    """
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectFailure(
            f"no answer within {timeout:g} s (--connect-timeout): is the host up, and the port "
            "open in its firewall?"
        )
    last = details.rsplit("last error: ", 1)[-1]
    if "Connection refused" in details:
        return ConnectFailure(
            "connection refused: nothing listens on that port (is `python -m offload.server` "
            "running there, on that port?)"
        )
    if "resolving" in details or "DNS" in details:
        return ConnectFailure(f"cannot resolve the host name ({last}): check --server")
    if security.uses_tls:
        if "WRONG_VERSION_NUMBER" in details:
            given = [
                option
                for option, value in [
                    ("--tls", security.tls),
                    ("--tls-ca", security.tls_ca),
                    ("--tls-cert", security.tls_cert),
                    ("--tls-key", security.tls_key),
                ]
                if value
            ]
            return ConnectFailure(
                f"this device expects TLS ({', '.join(given)}) but the server speaks plaintext: "
                "start the server with --tls-cert and --tls-key, or drop "
                f"{' and '.join(given)} here",
                tls=True,
            )
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return ConnectFailure(
                "the server's TLS certificate is not trusted here: give the CA that signed it "
                "with --tls-ca PEM",
                tls=True,
            )
        if "Socket closed" in details and _speaks_tls(target, timeout):
            if security.tls_cert is None:
                return ConnectFailure(
                    "the server requires a client certificate (mutual TLS): give this device's "
                    "with --tls-cert and --tls-key",
                    tls=True,
                )
            return ConnectFailure(
                "the server refused this device's certificate (--tls-cert): it must be signed "
                "by the CA the server trusts (its --tls-client-ca)",
                tls=True,
            )
        if "andshake" in details:
            return ConnectFailure(f"the TLS handshake failed: {last}", tls=True)
    elif "Socket closed" in details and _speaks_tls(target, timeout):
        return ConnectFailure(
            "the server expects TLS but this device connects in plaintext: give --tls-ca PEM "
            "(the CA that signed the server's certificate), or --tls if a public CA did",
            tls=True,
        )
    return ConnectFailure(last)


def _tls_name(address: str) -> str | None:
    """For a list of replicas (``ipv4:``/``ipv6:``), the name their certificates are checked
    against: the first address (gRPC would check the whole list, which no certificate names)."""
    scheme, _, rest = address.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    return rest.split(",")[0].rpartition(":")[0].strip("[]")


def _said_reads(call: grpc.Call) -> frozenset[int] | None:
    """What the server said it reads in the stream's headers, once they are in (None: it did not
    say, or the stream failed: an older server's answers, or ``results``, will say)."""
    try:
        return parse_reads(call.initial_metadata())
    except grpc.RpcError:
        return None


class _GrpcStream:
    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...],
        on_error: Callable[[grpc.RpcError], None],
    ) -> None:
        self._on_error = on_error
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        # We serialise requests ourselves (to count bytes without serialising twice), and wrap
        # the deserialiser for the same reason.
        method = channel.stream_stream(
            METHOD,
            request_serializer=None,
            response_deserializer=lambda data: (pb.ItemResult.FromString(data), len(data)),
        )
        self._call = method(self._requests(), metadata=metadata)

    def _requests(self) -> Iterator[bytes]:
        while True:
            data = self._outbox.get()
            if data is _CLOSE:
                return
            assert isinstance(data, bytes)
            yield data

    def send(self, state: pb.TaskState) -> int:
        return self.send_bytes(state.SerializeToString())

    def send_bytes(self, data: bytes) -> int:
        self._outbox.put(data)
        return len(data)

    def reads(self) -> frozenset[int] | None:
        return _said_reads(self._call)

    def results(self) -> Iterator[tuple[pb.ItemResult, int]]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            self._on_error(exc)
            raise _server_error(exc) from None

    def close(self) -> None:
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()


@dataclass(frozen=True)
class Batching:
    """Items per message (``ClientConfig.batch_items``, ``batch_bytes``, ``linger_ms``)."""

    items: int = ClientConfig.batch_items
    max_bytes: int = ClientConfig.batch_bytes
    linger: float = 0.0  # seconds

    @classmethod
    def from_config(cls, config: ClientConfig) -> Batching:
        # A batch of several items is one message: it must fit the message limit too. No more
        # than the window can come before an answer: lingering for more would only wait.
        size = min(config.batch_bytes, config.limits.max_message_bytes)
        linger = (config.linger_ms or 0.0) / 1000  # None: 0 until automatic mode chooses it
        return cls(min(config.batch_items, config.window), size, linger)


class _BatchStream:
    """A stream over ``ExecuteBatches``: each message carries the items ready to go (see
    ``Batching``); answers come batched and are handed out one by one.

    gRPC takes the next message only once the previous one is written, so items queued
    meanwhile go together: with no linger, batching costs an idle device no latency. A server
    without the method (UNIMPLEMENTED before any answer) gets the stream's items again over
    ``ExecuteRemaining``, from ``fallback``; the link sees one stream either way.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...],
        on_error: Callable[[grpc.RpcError], None],
        batching: Callable[[], Batching],  # read for each message: the linger may change
        fallback: Callable[[], Stream],
    ) -> None:
        self._on_error = on_error
        self._batching = batching
        self._fallback = fallback
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._kept: list[bytes] | None = []  # sent before the first answer: resent on fallback
        self._closed = False
        self._inner: Stream | None = None
        method = channel.stream_stream(BATCH_METHOD)  # bytes each way
        self._call = method(self._requests(), metadata=metadata)

    def _requests(self) -> Iterator[bytes]:
        carry: object = None
        while True:
            first = self._outbox.get() if carry is None else carry
            if first is _CLOSE:
                return
            assert isinstance(first, bytes)
            batch, size, carry = [first], len(first), None
            batching = self._batching()
            items, max_bytes = batching.items, batching.max_bytes
            deadline = time.monotonic() + batching.linger
            while len(batch) < items and size < max_bytes:
                try:
                    entry = self._outbox.get_nowait()
                except queue.Empty:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        entry = self._outbox.get(timeout=wait)
                    except queue.Empty:
                        break
                if entry is _CLOSE:
                    carry = entry
                    break
                assert isinstance(entry, bytes)
                grown = size + _batch.framing(len(entry)) + len(entry)
                if grown > max_bytes:
                    carry = entry
                    break
                batch.append(entry)
                size = grown
            yield _batch.join(batch)

    def send(self, state: pb.TaskState) -> int:
        return self.send_bytes(state.SerializeToString())

    def send_bytes(self, data: bytes) -> int:
        with self._lock:
            if self._inner is not None:
                return self._inner.send_bytes(data)
            if self._kept is not None:
                self._kept.append(data)
            self._outbox.put(data)
        return len(data)

    def reads(self) -> frozenset[int] | None:
        return _said_reads(self._call)

    def results(self) -> Iterator[tuple[pb.ItemResult, int]]:
        try:
            for data in self._call:
                with self._lock:
                    self._kept = None
                answers = pb.ResultBatch.FromString(data).results
                share = len(data) // max(1, len(answers))  # each answer's part of the bytes
                for answer in answers:
                    yield answer, share
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and self._kept is not None:
                yield from self._fall_back().results()
                return
            self._on_error(exc)
            raise _server_error(exc) from None

    def _fall_back(self) -> Stream:
        self._outbox.put(_CLOSE)  # ends the request iterator gRPC no longer reads
        with self._lock:
            inner = self._inner = self._fallback()
            for data in self._kept or ():
                inner.send_bytes(data)
            self._kept = None
            if self._closed:
                inner.close()
        return inner

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._inner is not None:
                self._inner.close()
                return
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        with self._lock:
            inner = self._inner
        (inner or self._call).cancel()


class GrpcTransport:
    """Streams to a real server over one long-lived channel."""

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, int | str]],
        connect_timeout: float,
        security: ClientSecurity = ClientSecurity(),
        batching: Batching = Batching(),
    ) -> None:
        self.target = target
        self.security = security
        self.batching = batching
        # Until a server answers ExecuteBatches UNIMPLEMENTED (an older one): then one per message.
        self.batches = batching.items > 1
        credentials = channel_credentials(security)
        address = grpc_target(target)  # the list of replicas as gRPC spells it
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            name = _tls_name(address)
            if name is not None:
                options = [*options, ("grpc.ssl_target_name_override", name)]
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self._metadata = call_metadata(security)
        self._check = self.channel.unary_unary(HEALTH_CHECK)  # bytes in, bytes out
        # Not reachable yet is not an error: the client runs every task itself meanwhile, and
        # the channel keeps trying with exponential backoff.
        self._known_ready = False
        self._asked = False
        self._last_details = ""
        self.failure: ConnectFailure | None = None  # why the latest question found it away
        self.initially_ready = self.ready(connect_timeout)

    @classmethod
    def from_config(cls, config: ClientConfig, target: str | None = None) -> GrpcTransport:
        """The channel production uses for ``config``: its size limits, keepalive, reconnect
        backoff, credentials and connect timeout, to ``target`` (default ``config.server``)."""
        target = target or config.server
        if not target:
            raise ConfigError("no server to connect to: give --server HOST:PORT")
        return cls(
            target,
            client_options(config),
            config.connect_timeout,
            config.security,
            Batching.from_config(config),
        )

    def _ask(self, timeout: float, wait: bool) -> tuple[grpc.StatusCode, str] | None:
        """One health check: None if the server answered (whatever it said), else gRPC's code
        and reason."""
        try:
            self._check(b"", timeout=max(timeout, 0.001), wait_for_ready=wait)
        except grpc.RpcError as exc:
            code = exc.code()
            away = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if code in away or code == grpc.StatusCode.CANCELLED:  # cancelled: closing
                return code, exc.details() or ""
        except ValueError:  # the channel was closed before the call
            return grpc.StatusCode.CANCELLED, "closed"
        return None

    def ready(self, timeout: float) -> bool:
        """Whether the server answers, waiting up to ``timeout`` seconds for it.

        The first question does not wait for the channel: a refused connection or a failed TLS
        handshake fails it within milliseconds, with gRPC's reason, where waiting would cost the
        whole timeout. Later ones (the link's reconnects) wait, so that asking again while the
        server is away is no busy loop, and if that fails ask once more without waiting, for
        the reason. Asked only when a stream has failed since the server last answered.
        """
        if self._known_ready:
            return True
        began = time.monotonic()
        first = not self._asked
        self._asked = True
        error = self._ask(timeout, wait=not first)
        if error is not None and not first:
            error = self._ask(min(timeout, 0.1), wait=False)
        if error is None:
            self._known_ready = True
            self.failure = None
            self._last_details = ""
            return True
        code, details = error
        if code == grpc.StatusCode.UNAVAILABLE and details != self._last_details:
            self._last_details = details  # each new reason is diagnosed once: that may probe
            probe = max(timeout - (time.monotonic() - began), 1.0)
            self.failure = diagnose(self.target, self.security, code, details, probe)
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and first:
            self.failure = diagnose(self.target, self.security, code, details, timeout)
        return False

    def _stream_failed(self, exc: grpc.RpcError) -> None:
        # A full server refuses the call over a connection that is fine: no need to ask again.
        if getattr(exc, "code", lambda: None)() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._known_ready = False

    def open_stream(self) -> Stream:
        if self.batches:
            return _BatchStream(
                self.channel,
                self._metadata,
                self._stream_failed,
                lambda: self.batching,
                self._unbatched,
            )
        return _GrpcStream(self.channel, self._metadata, self._stream_failed)

    def set_linger(self, seconds: float) -> None:
        """Messages from now on wait up to ``seconds`` for more items (automatic mode's choice)."""
        self.batching = replace(self.batching, linger=seconds)

    def _unbatched(self) -> Stream:
        self.batches = False
        return _GrpcStream(self.channel, self._metadata, self._stream_failed)

    def close(self) -> None:
        # No readiness poll to wait for: ``ready`` asks with a call, never with gRPC's
        # connectivity polling thread (which raised when the channel closed under it).
        self.channel.close()
