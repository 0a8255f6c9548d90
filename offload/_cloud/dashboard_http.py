"""The dashboard's HTTP side, on ``--dashboard-port``: the page, its assets and a JSON API.

The standard library's threading HTTP server, in threads of its own beside gRPC's: the page
costs the gRPC path only the board's O(1) listener, and nothing when closed (measured in
``bench/dashboard.py``). Routes:

    GET  /                   the page (assets under /assets/, shipped in the package)
    GET  /login, POST /login the login form; the right token sets an HttpOnly cookie
    GET  /api/fleet          the board's snapshot as JSON
    GET  /api/events         the same snapshot, pushed as server-sent events REFRESH_HZ a second
    GET  /api/view/<device>  the latest JPEG the pipeline published for a device

With a token every route but /login and the assets (code and style, no data) refuses a
request without ``Authorization: Bearer <token>`` or the login's cookie (401).
With TLS the dashboard serves TLS on the server's certificate.
Bounded: CONNECTIONS open at once (one thread each; more are closed unanswered), EVENT_STREAMS
of them event streams, a login body of LOGIN_BYTES, idle connections closed after IDLE_SECONDS.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

from .._config import ServerConfig
from ..exceptions import ConfigError
from .dashboard import FleetBoard

log = logging.getLogger("offload.server")

REFRESH_HZ = 4.0
CONNECTIONS = 32
EVENT_STREAMS = 8
LOGIN_BYTES = 4096
IDLE_SECONDS = 15.0
COOKIE = "offload_dashboard"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
_PAGES = {"index.html", "login.html"}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # uPlot sets element styles from script, which needs no 'unsafe-inline' for scripts.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self'; frame-ancestors 'none'; form-action 'self'",
}


def _asset(name: str) -> bytes:
    return (resources.files(__package__) / "dashboard_assets" / name).read_bytes()


class _Events:
    """The latest snapshot as one encoded event, computed by one thread while anyone watches."""

    def __init__(self, board: FleetBoard) -> None:
        self.board = board
        self.changed = threading.Condition()
        self.generation = 0
        self.event = b""
        self.watchers = 0
        self.stopping = False
        self._thread: threading.Thread | None = None

    def subscribe(self) -> int | None:
        """A new watcher: the generation to wait past (its first event is fresh), or None when
        EVENT_STREAMS already watch."""
        with self.changed:
            if self.watchers >= EVENT_STREAMS or self.stopping:
                return None
            self.watchers += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._tick, name="offload-dashboard-tick", daemon=True
                )
                self._thread.start()
            self.changed.notify_all()  # wakes the ticker if nobody watched until now
            return self.generation

    def unsubscribe(self) -> None:
        with self.changed:
            self.watchers -= 1

    def _tick(self) -> None:
        while True:
            with self.changed:
                while self.watchers == 0 and not self.stopping:
                    self.changed.wait()  # nobody watches: the board is not read at all
                if self.stopping:
                    return
            data = json.dumps(self.board.snapshot(), separators=(",", ":"))
            with self.changed:
                self.event = f"data: {data}\n\n".encode()
                self.generation += 1
                self.changed.notify_all()
                self.changed.wait(1 / REFRESH_HZ)

    def next(self, seen: int) -> tuple[int, bytes] | None:
        """The first event newer than ``seen``; None once stopping."""
        with self.changed:
            while self.generation == seen and not self.stopping:
                self.changed.wait()
            return None if self.stopping else (self.generation, self.event)

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: views and events reuse connections
    timeout = IDLE_SECONDS
    server_version = "offload-dashboard"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            # In this connection's thread, within its timeout: a slow client delays no other.
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("event=dashboard-request peer=%s %s", self.client_address[0], format % args)

    def _send(
        self, status: HTTPStatus, body: bytes, kind: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self) -> None:
        if self.path.startswith("/api/"):
            body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}\n'
            self._send(
                HTTPStatus.UNAUTHORIZED,
                body,
                "application/json",
                {"WWW-Authenticate": 'Bearer realm="offload"'},
            )
        else:
            self._login_page(HTTPStatus.UNAUTHORIZED, "")

    def _login_page(self, status: HTTPStatus, message: str) -> None:
        page = _asset("login.html").replace(b"<!--message-->", message.encode())
        self._send(
            status, page, "text/html; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="offload"'}
        )

    def _authorised(self) -> bool:
        auth = self.server.auth
        if auth is None:
            return True
        header = self.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return hmac.compare_digest(header[7:].strip().encode(), auth.token)
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), auth.session)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/login":
            self._login_page(HTTPStatus.OK, "")
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path.startswith("/assets/") and path[8:] in ASSETS:
            # Code and style only, no data: the login page needs its style before a login.
            self._send(HTTPStatus.OK, _asset(path[8:]), ASSETS[path[8:]])
        elif not self._authorised():
            self._refuse()
        elif path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _asset("index.html"), "text/html; charset=utf-8")
        elif path == "/api/fleet":
            body = json.dumps(self.server.board.snapshot(), separators=(",", ":")).encode()
            self._send(HTTPStatus.OK, body, "application/json")
        elif path == "/api/events":
            self._events()
        elif path.startswith("/api/view/"):
            view = self.server.board.view(unquote(path[10:]))
            if view is None:
                self._send(HTTPStatus.NOT_FOUND, b"no view yet\n", "text/plain")
            else:
                self._send(HTTPStatus.OK, view, "image/jpeg")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        if self.path != "/login":
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= LOGIN_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"login form too large\n", "text/plain")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        auth = self.server.auth
        given = (form.get("token") or [""])[0].encode()
        if auth is None or hmac.compare_digest(given, auth.token):
            session = auth.session.decode() if auth is not None else ""
            secure = "; Secure" if self.server.tls else ""
            cookie = f"{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/{secure}"
            self._send(
                HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie}
            )
        else:
            self._login_page(HTTPStatus.UNAUTHORIZED, "That token is not the server's.")

    def _events(self) -> None:
        events = self.server.events
        seen = events.subscribe()
        if seen is None:
            self._send(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"at most {EVENT_STREAMS} dashboards may watch at once\n".encode(),
                "text/plain",
                {"Retry-After": "5"},
            )
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.close_connection = True  # no length: the stream ends with the connection
            while (event := events.next(seen)) is not None:
                seen, data = event
                self.wfile.write(data)
                self.wfile.flush()
        except OSError:
            pass  # the page went away
        finally:
            events.unsubscribe()


class _Auth:
    def __init__(self, token: str) -> None:
        self.token = token.encode()
        # The cookie holds a value derived from the token, not the token devices send.
        derived = hmac.new(self.token, b"offload-dashboard-session", hashlib.sha256)
        self.session = derived.hexdigest().encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = CONNECTIONS  # the default 5 makes a page's burst of requests wait
    board: FleetBoard
    events: _Events
    auth: _Auth | None
    tls: bool

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.slots = threading.BoundedSemaphore(CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed unanswered, the thread cap holds
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("event=dashboard-connection-error peer=%s", client_address[0], exc_info=True)


class Dashboard:
    """The dashboard's HTTP server for one ``FleetBoard``; ``start`` binds, ``stop`` closes."""

    def __init__(self, board: FleetBoard, config: ServerConfig) -> None:
        self.board = board
        self.config = config
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._events = _Events(board)

    @property
    def tls(self) -> bool:
        return self.config.security.tls_cert is not None

    def start(self) -> int:
        """Serve on ``--host`` and ``--dashboard-port`` (0 picks a free port); the bound port."""
        host = self.config.host.strip("[]")
        port = self.config.dashboard_port or 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            http = _HTTPServer((host, port), family)
        except OSError as exc:
            raise ConfigError(
                f"--dashboard-port {port}: cannot serve the dashboard on {host} "
                f"({exc.strerror}): is the port in use? Choose another --dashboard-port"
            ) from None
        security = self.config.security
        if security.tls_cert is not None and security.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(security.tls_cert, security.tls_key)
            except (OSError, ssl.SSLError) as exc:
                http.server_close()
                raise ConfigError(
                    f"--tls-cert/--tls-key: the dashboard cannot load them ({exc})"
                ) from None
            http.socket = context.wrap_socket(
                http.socket, server_side=True, do_handshake_on_connect=False
            )
        http.board = self.board
        http.events = self._events
        http.auth = _Auth(security.token) if security.token is not None else None
        http.tls = self.tls
        self._http = http
        self._thread = threading.Thread(
            target=http.serve_forever, args=(0.5,), name="offload-dashboard", daemon=True
        )
        self._thread.start()
        return int(http.server_address[1])

    def stop(self) -> None:
        self._events.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
