"""The wire contract's names, written once: the service and its method, the status maps, what a
gRPC status means to the device, and the keepalive options both sides set.

The contract itself is ``protos/offload/v1/offload.proto``; the names here are read from its
generated descriptor where it has them, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from ._config import Keepalive
from ._pipeline import Status
from .exceptions import PipelineMismatch, ServerError
from .v1 import offload_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Offload"].full_name  # "offload.v1.Offload"
METHOD_NAME = "ExecuteRemaining"
METHOD = f"/{SERVICE_NAME}/{METHOD_NAME}"
# Several items per message each way (``_batch.py``); an older server has only METHOD.
BATCH_METHOD_NAME = "ExecuteBatches"
BATCH_METHOD = f"/{SERVICE_NAME}/{BATCH_METHOD_NAME}"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
HEALTH_CHECK = f"/{HEALTH_SERVICE_NAME}/Check"

# How an item ended: the pipeline's outcome on the wire, and the wire's status in reports.
WIRE_STATUS = {
    Status.COMPLETED: pb.ItemResult.COMPLETED,
    Status.FILTERED: pb.ItemResult.FILTERED,
    Status.FAILED: pb.ItemResult.FAILED,
}
STATUS_NAMES: dict[int, str] = {int(wire): status.value for status, wire in WIRE_STATUS.items()}


def status_name(wire_status: int) -> str:
    """``"completed"``, ``"filtered"`` or ``"failed"`` (an unknown status is a failure)."""
    return STATUS_NAMES.get(wire_status, Status.FAILED.value)


def status_code(name: str) -> grpc.StatusCode:
    """The gRPC status code called ``name`` (``"INVALID_ARGUMENT"``); the cloud's executor names
    codes by string so that it needs no gRPC."""
    return grpc.StatusCode[name]


# A refusal for size: no retry helps, so the device stops and says which option to raise. gRPC's
# own wording (beyond twice the limit) and the server's (between one and two times it).
TOO_LARGE = ("larger than max", "more than this server's --max-message-bytes")


def too_large(details: str) -> bool:
    """Whether a RESOURCE_EXHAUSTED says a message was too large (not that the server is full)."""
    return any(mark in details for mark in TOO_LARGE)


_HINTS = {
    "RESOURCE_EXHAUSTED": "if a message was too large, raise --max-message-bytes on the client "
    "and the server (both must allow the largest item and result); if the server has too many "
    "streams, raise its --workers",
    "UNAUTHENTICATED": "give the server's token with --token or OFFLOAD_TOKEN",
}


def server_error(code: str, details: str, not_run: bool = False) -> ServerError:
    """What a stream's end with ``code`` means to the device, with the knob to turn;
    ``not_run``: the trailer said the server ran none of the items it did not answer."""
    kind = PipelineMismatch if code == "FAILED_PRECONDITION" else ServerError
    hint = _HINTS.get(code)
    if hint and hint not in details:
        details = f"{details} ({hint})"
    error = kind(f"server answered {code}: {details}", code)
    error.not_run = not_run
    return error


def keepalive_options(keepalive: Keepalive) -> list[tuple[str, int]]:
    """HTTP/2 keepalive, the same on both sides: a silent dead link is noticed within
    ``time + timeout`` seconds, also while no call is open."""
    return [
        ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
        # gRPC >= 1.6x waits for a ping's answer this long (default a minute), whatever the
        # keepalive timeout says: without it a silent peer goes unnoticed for a minute.
        ("grpc.http2.ping_timeout_ms", int(keepalive.timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# The server's response headers name the encodings it reads (pb.Codec numbers, comma-separated)
# as soon as a stream opens, so the device compresses its first items too; the same list is in
# every ItemResult.accepts, for a peer that does not read headers.
READS_HEADER = "offload-reads"

# A stream's trailer when the server ends it to be retried later (its state store away, a
# drain): it ran none of the items it did not answer, so their sends do not count towards
# --max-sends (a store blip of a few seconds must cost no item).
NOT_RUN_TRAILER = ("offload-not-run", "1")


def reads_header(reads: tuple[int, ...]) -> tuple[tuple[str, str]]:
    return ((READS_HEADER, ",".join(str(int(c)) for c in reads)),)


def parse_reads(metadata: Iterable[tuple[str, str | bytes]] | None) -> frozenset[int] | None:
    """The encodings a stream's response headers say the server reads (None: they do not say)."""
    for key, value in metadata or ():
        if key == READS_HEADER:
            return frozenset(int(c) for c in str(value).split(",") if c.strip().isdigit())
    return None


def size_options(limit: int) -> list[tuple[str, int]]:
    """The largest message a channel sends and receives, in bytes."""
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
