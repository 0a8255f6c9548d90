"""The transport seam: how the client's items reach a ``RemoteExecutor`` and answers come back.

``GrpcTransport`` is the real thing. ``InProcessTransport`` runs the same executor in a thread of
this process, with the same serialisation, so the client's logic runs in unit tests without a
network.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc

from ._config import ClientConfig, ClientSecurity
from ._security import call_metadata, channel_credentials
from ._service import RemoteExecutor, RequestRejected
from .exceptions import PipelineMismatch, ServerError
from .v1 import offload_pb2 as pb

METHOD = "/offload.v1.Offload/ExecuteRemaining"
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


def client_options(config: ClientConfig) -> list[tuple[str, int]]:
    """The channel's size limits, keepalive (a dead link is noticed) and reconnect backoff."""
    keepalive = config.keepalive
    return [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
        # gRPC >= 1.6x waits for a ping's answer this long (default a minute), whatever the
        # keepalive timeout says: without it a silent peer goes unnoticed for a minute.
        ("grpc.http2.ping_timeout_ms", int(keepalive.timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC reconnects with exponential backoff and jitter; cap it so a returning server is
        # used again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(config.link.reconnect_backoff_max * 1000)),
    ]


_HINTS = {
    "RESOURCE_EXHAUSTED": "if a message was too large, raise --max-message-bytes on the client "
    "and the server (both must allow the largest item and result); if the server has too many "
    "streams, raise its --workers",
    "UNAUTHENTICATED": "give the server's token with --token or OFFLOAD_TOKEN",
}


def _server_error(exc: grpc.RpcError) -> ServerError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    kind = PipelineMismatch if code == grpc.StatusCode.FAILED_PRECONDITION else ServerError
    hint = _HINTS.get(code.name)
    if hint and hint not in details:
        details = f"{details} ({hint})"
    return kind(f"server answered {code.name}: {details}", code.name)


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


class GrpcTransport:
    """Streams to a real server over one long-lived channel."""

    def __init__(
        self,
        target: str,
        options: list[tuple[str, int]],
        connect_timeout: float,
        security: ClientSecurity = ClientSecurity(),
    ) -> None:
        self.target = target
        credentials = channel_credentials(security)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = call_metadata(security)
        # Not reachable yet is not an error: the client runs every task itself meanwhile, and
        # the channel keeps trying with exponential backoff.
        self._known_ready = False
        self.initially_ready = self.ready(connect_timeout)

    def ready(self, timeout: float) -> bool:
        # Ask the channel only when a stream has failed since it was last ready: each question
        # starts a gRPC polling thread that raises if the channel closes while it runs.
        if self._known_ready:
            return True
        future = grpc.channel_ready_future(self.channel)
        try:
            future.result(timeout=max(timeout, 0.001))
        except grpc.FutureTimeoutError:
            future.cancel()
            return False
        self._known_ready = True
        return True

    def _stream_failed(self, exc: grpc.RpcError) -> None:
        # A full server refuses the call over a connection that is fine: no need to ask again.
        if getattr(exc, "code", lambda: None)() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._known_ready = False

    def open_stream(self) -> Stream:
        return _GrpcStream(self.channel, self._metadata, self._stream_failed)

    def close(self) -> None:
        # A readiness question leaves gRPC's polling thread running up to 0.2 s after it is
        # answered, and that thread raises ("Channel closed!") if the channel closes under it:
        # let it end first. (grpc keeps its flag on a private attribute; without it, no wait.)
        state = getattr(self.channel, "_connectivity_state", None)
        deadline = time.monotonic() + 1.0
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.channel.close()


class _InProcessStream:
    def __init__(self, executor: RemoteExecutor) -> None:
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._executor = executor
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def _serve(self) -> None:
        while True:
            data = self._inbox.get()
            if data is _CLOSE:
                self._outbox.put(_CLOSE)
                return
            assert isinstance(data, bytes)
            try:
                answer = self._executor.execute(pb.TaskState.FromString(data))
            except RequestRejected as exc:
                error = (
                    PipelineMismatch
                    if exc.code == grpc.StatusCode.FAILED_PRECONDITION
                    else ServerError
                )
                self._outbox.put(error(f"server answered {exc.code.name}: {exc}", exc.code.name))
                return
            self._outbox.put(answer.SerializeToString())

    def send(self, state: pb.TaskState) -> int:
        return self.send_bytes(state.SerializeToString())

    def send_bytes(self, data: bytes) -> int:
        self._inbox.put(data)
        return len(data)

    def results(self) -> Iterator[tuple[pb.ItemResult, int]]:
        while True:
            data = self._outbox.get()
            if data is _CLOSE:
                return
            if isinstance(data, ServerError):
                raise data
            assert isinstance(data, bytes)
            yield pb.ItemResult.FromString(data), len(data)

    def close(self) -> None:
        self._inbox.put(_CLOSE)

    def cancel(self) -> None:
        self._inbox.put(_CLOSE)


class InProcessTransport:
    """Runs a ``RemoteExecutor`` in this process: the client's logic without a network."""

    def __init__(self, executor: RemoteExecutor) -> None:
        self.executor = executor
        self.target = "in-process"

    def ready(self, timeout: float) -> bool:
        return True

    def open_stream(self) -> Stream:
        return _InProcessStream(self.executor)

    def close(self) -> None:
        pass
