"""The dashboard's HTTP side on a real server: the JSON API, events, views, auth, TLS, bounds."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from offload import ConfigError, RunningServer, ServerSecurity, load_pipeline
from offload._cloud import dashboard_http
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, Pki, exchange, run_split, state, wait_until

TOKEN = "dashboard-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection: http.client.HTTPConnection
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    with closing(connection):
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()


def post_login(port: int, body: str) -> tuple[int, dict[str, str]]:
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as connection:
        kind = {"Content-Type": "application/x-www-form-urlencoded"}
        connection.request("POST", "/login", body=body, headers=kind)
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())


def fleet(port: int) -> dict[str, Any]:
    status, _, body = get(port, "/api/fleet", BEARER)
    assert status == 200
    data: dict[str, Any] = json.loads(body)
    return data


@contextmanager
def events(port: int, headers: dict[str, str] = BEARER) -> Iterator[Callable[[], Any]]:
    """An open /api/events stream; yields a function that reads its next event's JSON."""
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as connection:
        connection.request("GET", "/api/events", headers=headers)
        response = connection.getresponse()
        assert response.status == 200, response.status
        assert response.getheader("Content-Type") == "text/event-stream"

        def next_event() -> Any:
            line = response.readline()
            assert line.startswith(b"data: "), line
            assert response.readline() == b"\n"
            return json.loads(line[6:])

        try:
            yield next_event
        finally:
            response.close()  # the socket closes with its last reference, the response's


@pytest.fixture
def dashboard(start_server: Callable[..., RunningServer]) -> RunningServer:
    """A counter server with its dashboard on a free port, behind the token."""
    return start_server(COUNTER, dashboard_port=0, security=ServerSecurity(token=TOKEN))


def port_of(server: RunningServer) -> int:
    assert server.dashboard_port is not None
    return server.dashboard_port


def watchers(server: RunningServer) -> int:
    assert server.dashboard is not None
    return server.dashboard._events.watchers


@contextmanager
def open_event_streams(port: int, count: int) -> Iterator[None]:
    with ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(events(port))()
        yield


def stream(server: RunningServer, states: list[Any]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        list(pb_grpc.OffloadStub(channel).ExecuteRemaining(iter(states), metadata=metadata))


def test_the_dashboard_is_off_unless_its_port_is_given(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    assert server.dashboard is None and server.dashboard_port is None


def test_the_fleet_api_shows_each_device_with_its_split_and_counts(
    dashboard: RunningServer,
) -> None:
    stream(dashboard, [state(i, i + 1, device="cam-1") for i in range(6)])  # value 5 fails
    stream(dashboard, [state(i, (i, i * i), next_task=2, device="cam-2") for i in range(3)])
    snapshot = fleet(port_of(dashboard))
    rows = {d["id"]: d for d in snapshot["devices"]}
    assert rows["cam-1"]["split"] == 1 and rows["cam-1"]["cloud_from"] == "check"
    assert (rows["cam-1"]["completed"], rows["cam-1"]["failed"]) == (5, 1)
    assert rows["cam-2"]["split"] == 2 and rows["cam-2"]["cloud_from"] == "count"
    assert rows["cam-2"]["completed"] == 3
    assert rows["cam-2"]["cloud_cpu_per_item"] > 0
    assert snapshot["fleet"]["devices_active"] == 2
    assert snapshot["tasks"] == ["emit", "check", "count"]


def test_without_the_token_the_page_and_the_api_answer_401(dashboard: RunningServer) -> None:
    port = port_of(dashboard)
    for path in ("/", "/api/fleet", "/api/events", "/api/view/cam-1"):
        status, headers, _ = get(port, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(port, path, {"Authorization": "Bearer wrong"})[0] == 401, path
    status, _, page = get(port, "/")
    assert b'<form method="post" action="/login">' in page  # people get the login form
    assert get(port, "/", BEARER)[0] == 200


def test_the_login_form_sets_an_httponly_strict_cookie_that_opens_the_page(
    dashboard: RunningServer,
) -> None:
    port = port_of(dashboard)
    status, headers = post_login(port, "token=wrong")
    assert status == 401 and "Set-Cookie" not in headers
    status, headers = post_login(port, f"token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie  # the cookie holds a value derived from the token
    pair = cookie.split(";", 1)[0]
    assert get(port, "/", {"Cookie": pair})[0] == 200
    assert get(port, "/api/fleet", {"Cookie": pair})[0] == 200
    assert get(port, "/", {"Cookie": pair[:-1] + "0"})[0] == 401


def test_events_push_the_snapshot_again_and_again_and_the_numbers_move(
    dashboard: RunningServer,
) -> None:
    port = port_of(dashboard)
    with events(port) as next_event:
        assert next_event()["devices"] == []
        stream(dashboard, [state(i, i + 1, device="cam-1", run_id="ev") for i in range(3)])

        def counted() -> bool:
            devices = next_event()["devices"]
            return bool(devices) and devices[0]["completed"] == 3

        assert wait_until(counted, 10)


def test_the_ball_tracker_publishes_its_annotated_frame_as_the_devices_view(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline("examples.ball_tracking")
    server = start_server(pipeline, dashboard_port=0)  # loopback: no token needed
    run_split(pipeline, 3, server.port, source="synthetic", frames=5)
    status, headers, jpeg = get(port_of(server), "/api/view/test-device")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert headers["X-Content-Type-Options"] == "nosniff"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] == 500
    (row,) = fleet(port_of(server))["devices"]
    assert row["view"] is not None and row["cloud_from"] == "contours"
    assert get(port_of(server), "/api/view/nobody")[0] == 404


def test_with_tls_the_dashboard_serves_tls_on_the_servers_certificate(
    start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    security = ServerSecurity(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), token=TOKEN
    )
    server = start_server(COUNTER, dashboard_port=0, security=security)
    port = port_of(server)
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    assert get(port, "/api/fleet", BEARER, tls=trusting)[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        get(port, "/api/fleet", BEARER)  # plain HTTP gets no answer
    with closing(http.client.HTTPSConnection("127.0.0.1", port, context=trusting)) as c:
        c.request("POST", "/login", body=f"token={TOKEN}")
        assert "Secure" in (c.getresponse().getheader("Set-Cookie") or "")


def test_a_page_opened_after_every_page_closed_gets_fresh_events(
    dashboard: RunningServer,
) -> None:
    port = port_of(dashboard)
    with events(port) as next_event:
        next_event()
    assert wait_until(lambda: watchers(dashboard) == 0, 10)
    stream(dashboard, [state(0, 1, device="late")])
    with events(port) as next_event:
        assert [d["id"] for d in next_event()["devices"]] == ["late"]  # not the stale event
        assert next_event()["time"] > 0  # and the ticker runs again


def test_event_streams_beyond_the_cap_are_refused_503(dashboard: RunningServer) -> None:
    port = port_of(dashboard)
    with open_event_streams(port, dashboard_http.EVENT_STREAMS):
        status, headers, _ = get(port, "/api/events", BEARER)
        assert status == 503 and headers["Retry-After"] == "5"
    assert wait_until(lambda: watchers(dashboard) == 0, 10)
    with events(port) as next_event:
        next_event()


def test_a_login_body_over_its_bound_is_refused_413(dashboard: RunningServer) -> None:
    body = "token=" + "x" * dashboard_http.LOGIN_BYTES
    assert post_login(port_of(dashboard), body)[0] == 413


def test_connections_beyond_the_cap_are_closed_unanswered(dashboard: RunningServer) -> None:
    port = port_of(dashboard)
    idle = [
        socket.create_connection(("127.0.0.1", port)) for _ in range(dashboard_http.CONNECTIONS)
    ]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(100) == b""  # closed by the server, no thread taken
    finally:
        for s in idle:
            s.close()
    assert wait_until(lambda: _answers(port), 10)


def _answers(port: int) -> bool:
    try:
        return get(port, "/login")[0] == 200
    except OSError:
        return False


def test_a_dashboard_port_in_use_is_one_config_error_naming_it(
    start_server: Callable[..., RunningServer],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--dashboard-port {port}: cannot serve"):
            start_server(COUNTER, dashboard_port=port)


def test_exchange_helper_still_reaches_a_server_with_a_dashboard(dashboard: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{dashboard.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            exchange(stub, [state(0, 1)])  # no token: the gRPC side refuses as before
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
