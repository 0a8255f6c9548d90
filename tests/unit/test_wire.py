"""What a stream's end means to the device: the contract's status codes, read once."""

from __future__ import annotations

import pytest

from offload import PipelineMismatch
from offload._device.link import is_fatal, is_full
from offload._wire import server_error


@pytest.mark.parametrize(
    "details",
    [
        "Received message larger than max (40000000 vs. 33554432)",  # gRPC's own, past 2x
        "message 3 of the stream is 20000000 bytes, more than this server's "
        "--max-message-bytes 16777216: raise it on the server and on the client",
    ],
)
def test_a_message_too_large_stops_the_run_whoever_refused_it(details: str) -> None:
    error = server_error("RESOURCE_EXHAUSTED", details)
    assert is_fatal(error)
    assert not is_full(error)


def test_a_full_server_is_asked_again_though_the_hint_names_the_size_option() -> None:
    error = server_error("RESOURCE_EXHAUSTED", "the server is full: 1 of 1 streams (--workers 1)")
    assert "--max-message-bytes" in str(error)  # the hint covers both causes
    assert not is_fatal(error)
    assert is_full(error)


def test_codes_map_to_the_errors_users_catch() -> None:
    assert isinstance(server_error("FAILED_PRECONDITION", "pipeline mismatch"), PipelineMismatch)
    assert is_fatal(server_error("UNAUTHENTICATED", "no token"))
    assert not is_fatal(server_error("UNAVAILABLE", "the server is shutting down"))
