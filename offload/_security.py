"""Who may talk to the server: TLS credentials, the token interceptor, device identity.

The token is checked in a server interceptor. A refusal must use the refused method's own
handler kind: gRPC's example answers every method with a unary handler, which a client of a
bidirectional stream receives as UNIMPLEMENTED rather than UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from ._config import ClientSecurity, ServerSecurity
from ._logging import RefusalLog, quote
from .exceptions import ConfigError

log = logging.getLogger("offload.server")
REFUSAL_LOG_INTERVAL = 10.0  # a peer refused again within this is counted, not logged

TOKEN_HEADER = "authorization"
# Health checks stay open: load balancers and supervisors probe without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{option} {path}: cannot read it ({exc.strerror}): give a readable PEM file"
        ) from None


_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_KEY = b"PRIVATE KEY-----"


def read_key_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    """The PEM certificate (chain) and private key of ``--tls-cert`` / ``--tls-key``, checked
    for what gRPC refuses only with "Failed to bind" or log lines: a swapped pair, a file that
    is not PEM, an encrypted key, the key of another certificate."""
    cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    swapped = "; are --tls-cert and --tls-key swapped?"
    if _CERTIFICATE not in cert_pem:
        held = "a private key" if _KEY in cert_pem else "no PEM certificate"
        raise ConfigError(
            f"--tls-cert {cert} holds {held}: give a certificate (chain) in PEM"
            + (swapped if _KEY in cert_pem else "")
        )
    if _KEY not in key_pem:
        held = "a certificate" if _CERTIFICATE in key_pem else "no PEM private key"
        raise ConfigError(
            f"--tls-key {key} holds {held}: give the certificate's private key in PEM"
            + (swapped if _CERTIFICATE in key_pem else "")
        )
    if b"ENCRYPTED" in key_pem:
        raise ConfigError(
            f"--tls-key {key} is encrypted, which gRPC cannot use: decrypt it "
            f"(openssl pkey -in {key} -out key.pem) and give that"
        )
    try:
        # A password callback: OpenSSL must never prompt on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"--tls-key {key} is not the private key of --tls-cert {cert}: give the key "
                "the certificate was made with"
            ) from None
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: OpenSSL cannot load them ({exc.reason}): "
            "give a PEM certificate and its unencrypted PEM key"
        ) from None
    return cert_pem, key_pem


def read_ca(option: str, path: str) -> bytes:
    """The PEM CA certificates of ``option``, checked: gRPC only logs a bad bundle."""
    pem = _read(path, option)
    problem = "no PEM certificate" if _CERTIFICATE not in pem else None
    if problem is None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem.decode())
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "reason", None) or str(exc)
    if problem is not None:
        raise ConfigError(
            f"{option} {path} holds no usable CA certificate ({problem}): give the PEM "
            "certificate of the CA that signed the other side's certificates"
        )
    return pem


def server_credentials(security: ServerSecurity) -> grpc.ServerCredentials | None:
    """TLS credentials for the server's port, or None for plaintext."""
    if security.tls_cert is None and security.tls_key is None:
        if security.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        return None
    if security.tls_cert is None or security.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    cert_pem, key_pem = read_key_pair(security.tls_cert, security.tls_key)
    client_ca = security.tls_client_ca
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=read_ca("--tls-client-ca", client_ca) if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """TLS credentials for the client's channel, or None for plaintext."""
    if not security.uses_tls:
        return None
    if security.tls_cert is None or security.tls_key is None:
        if security.tls_cert is not None or security.tls_key is not None:
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        cert_pem = key_pem = None
    else:
        cert_pem, key_pem = read_key_pair(security.tls_cert, security.tls_key)
    return grpc.ssl_channel_credentials(
        # None: the system's root certificates (gRPC's bundled roots where there are none).
        root_certificates=read_ca("--tls-ca", security.tls_ca) if security.tls_ca else None,
        private_key=key_pem,
        certificate_chain=cert_pem,
    )


def call_metadata(security: ClientSecurity) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the token, if there is one."""
    return ((TOKEN_HEADER, f"Bearer {security.token}"),) if security.token else ()


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the lengths too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("--token must not be empty")
        self._expected = _digest(f"Bearer {token}")
        self._refusals = RefusalLog(REFUSAL_LOG_INTERVAL)
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` for every call refused (metrics count them)."""
        self._listeners.append(listener)

    def _refused(self, context: grpc.ServicerContext, reason: str) -> None:
        """Count a refusal, and log it with the peer (never what was given): a peer's first,
        then at most one per interval with the number refused meanwhile."""
        for listener in self._listeners:
            listener()
        peer = context.peer()
        host = peer.rpartition(":")[0] or peer  # the address without the port: per client
        refused = self._refusals.count(host)
        if refused:
            log.warning(
                "event=reject peer=%s code=UNAUTHENTICATED reason=%s refused=%d",
                quote(peer),
                quote(reason),
                refused,
            )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_HEADER and isinstance(value, str):
                given = value
        if hmac.compare_digest(_digest(given), self._expected):
            return handler
        reason = "wrong token" if given else "no token"
        return _refusal(
            handler,
            f"{reason}: give the server's token with --token or OFFLOAD_TOKEN",
            lambda context: self._refused(context, reason),
        )


def _refusal(
    handler: grpc.RpcMethodHandler,
    message: str,
    refused: Callable[[grpc.ServicerContext], None],
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED at once."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        refused(context)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_streaming(_request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        refused(context)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises; this makes it a generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse_streaming if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# What gRPC names every SAN it does not expose (otherName, RegisteredID, DirectoryName...):
# shared by every such certificate, so never an identity.
_OTHER_SAN = "other types of SAN"


def peer_device_id(context: grpc.ServicerContext) -> str | None:
    """The device id its client certificate proves, or None without a client certificate.

    The first SAN gRPC exposes (DNS, URI, IP, email), else the CN; a certificate naming neither
    is refused (UNAUTHENTICATED): gRPC's placeholder for other SAN types is the same for every
    such certificate, so two devices would share one identity.
    """
    auth = context.auth_context()
    if not auth.get("x509_pem_cert") and not context.peer_identities():
        return None
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key, ()):
            name = bytes(value).decode("utf-8", "replace")
            if name and name != _OTHER_SAN:
                return name
    context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "the client certificate names no usable device id: give it a DNS, URI or IP SAN or a CN",
    )
    raise AssertionError("unreachable")  # pragma: no cover - abort raises
