"""TLS, mutual TLS and the token, against real servers on loopback with throw-away certificates."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload import (
    Client,
    ClientConfig,
    ClientSecurity,
    GrpcTransport,
    RunningServer,
    ServerSecurity,
    decode,
    load_pipeline,
)
from offload._device.transport import client_options
from offload._security import channel_credentials
from offload.v1 import offload_pb2 as pb

from ..helpers import COUNTER, Pki, free_port, state

METHOD = "/offload.v1.Offload/ExecuteRemaining"


def channel(port: int, security: ClientSecurity) -> grpc.Channel:
    credentials = channel_credentials(security)
    target = f"127.0.0.1:{port}"
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def exchange(
    port: int, security: ClientSecurity, states: list[pb.TaskState], token: str | None = None
) -> list[pb.ItemResult]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    with channel(port, security) as ch:
        call = ch.stream_stream(
            METHOD,
            request_serializer=pb.TaskState.SerializeToString,
            response_deserializer=pb.ItemResult.FromString,
        )
        return list(call(iter(states), metadata=metadata, timeout=10))


def refused_code(
    port: int, security: ClientSecurity, token: str | None = None, device: str = "d1"
) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        exchange(port, security, [state(0, 1, device=device)], token)
    return err.value.code()


@pytest.fixture
def tls_server(start_server: Callable[..., RunningServer], pki: Pki) -> RunningServer:
    return start_server(
        COUNTER, security=ServerSecurity(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    )


@pytest.fixture
def mtls_server(start_server: Callable[..., RunningServer], pki: Pki) -> RunningServer:
    return start_server(
        COUNTER,
        security=ServerSecurity(
            tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
        ),
    )


def test_tls_with_the_right_ca_works_and_plaintext_is_refused(
    tls_server: RunningServer, pki: Pki
) -> None:
    answers = exchange(tls_server.port, ClientSecurity(tls_ca=str(pki.ca)), [state(0, 1)])
    assert answers[0].status == pb.ItemResult.COMPLETED
    assert refused_code(tls_server.port, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE
    # A server certificate from a CA the client does not trust is refused by the client.
    untrusting = ClientSecurity(tls_ca=str(pki.rogue_ca))
    assert refused_code(tls_server.port, untrusting) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_names_the_device_from_its_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    device = ClientSecurity(
        tls_ca=str(pki.ca), tls_cert=str(pki.device_cert), tls_key=str(pki.device_key)
    )
    # The message claims to be another device: the certificate wins, so one device cannot
    # feed (or read) another's aggregate.
    answers = exchange(
        mtls_server.port, device, [state(0, 1, device="someone-else"), state(1, 2, device="")]
    )
    assert [decode(a.output)["device"] for a in answers] == ["device-7", "device-7"]
    assert [decode(a.output)["seen"] for a in answers] == [1, 2]


@pytest.mark.parametrize("which", ["missing", "rogue", "plaintext"])
def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    mtls_server: RunningServer, pki: Pki, which: str
) -> None:
    security = {
        "missing": ClientSecurity(tls_ca=str(pki.ca)),
        "rogue": ClientSecurity(
            tls_ca=str(pki.ca), tls_cert=str(pki.rogue_cert), tls_key=str(pki.rogue_key)
        ),
        "plaintext": ClientSecurity(),
    }[which]
    assert refused_code(mtls_server.port, security) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def token_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(COUNTER, security=ServerSecurity(token="s3cret-t0ken"))


@pytest.mark.parametrize("token", [None, "", "wrong", "s3cret-t0ke", "s3cret-t0ken-"])
def test_a_missing_or_wrong_token_is_unauthenticated(
    token_server: RunningServer, token: str | None
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        exchange(token_server.port, ClientSecurity(), [state(0, 1)], token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "--token or OFFLOAD_TOKEN" in err.value.details()


def test_refused_tokens_are_logged_rate_limited_with_the_peer_and_counted(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="offload.server")
    server = start_server(COUNTER, security=ServerSecurity(token="s3cret-t0ken"), metrics_port=0)
    for token in [None, *["guess-" + "x" * i for i in range(12)]]:  # 13 refusals in a loop
        with pytest.raises(grpc.RpcError):
            exchange(server.port, ClientSecurity(), [state(0, 1)], token)
    lines = [r.getMessage() for r in caplog.records if "code=UNAUTHENTICATED" in r.getMessage()]
    # The first is logged at once, naming the peer and the reason; the rest within the interval
    # are counted into the next line, and no line shows what was given.
    assert len(lines) == 1, lines
    assert "peer=ipv4:127.0.0.1:" in lines[0] and 'reason="no token"' in lines[0]
    assert not any("guess" in line or "s3cret" in line for line in lines)
    assert server.metrics is not None
    assert server.metrics.registry.get_sample_value("offload_unauthenticated_total") == 13


def test_unauthenticated_arrives_before_the_client_sends_anything(
    token_server: RunningServer,
) -> None:
    # gRPC's example interceptor refuses with a unary handler: a stream client then sees
    # UNIMPLEMENTED, or nothing at all until it sends. The refusal must be the stream's own.
    never = threading.Event()

    def silent() -> Iterator[pb.TaskState]:
        never.wait(30)
        yield from ()

    with channel(token_server.port, ClientSecurity()) as ch:
        call = ch.stream_stream(
            METHOD,
            request_serializer=pb.TaskState.SerializeToString,
            response_deserializer=pb.ItemResult.FromString,
        )(silent(), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(call)
    never.set()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_works_and_health_needs_none(token_server: RunningServer) -> None:
    answers = exchange(token_server.port, ClientSecurity(), [state(0, 1)], "s3cret-t0ken")
    assert answers[0].status == pb.ItemResult.COMPLETED
    with channel(token_server.port, ClientSecurity()) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="offload.v1.Offload"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_runs_with_tls_mtls_and_token(
    start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    server = start_server(
        COUNTER,
        security=ServerSecurity(
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
            token="tok",
        ),
    )
    pipeline = load_pipeline(COUNTER)
    security = ClientSecurity(
        tls_ca=str(pki.ca), tls_cert=str(pki.device_cert), tls_key=str(pki.device_key), token="tok"
    )
    config = ClientConfig(
        pipeline=COUNTER, local_tasks=1, frames=12, device_id="claimed", security=security
    )
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{server.port}")
    try:
        report = Client(pipeline, config, transport).run()
    finally:
        transport.close()
    assert report["error"] is None
    assert report["items"]["captured"] == 12
    assert report["items"]["completed"] + report["items"]["failed"] == 12


def test_the_client_reports_a_wrong_token_clearly(token_server: RunningServer) -> None:
    pipeline = load_pipeline(COUNTER)
    security = ClientSecurity(token="nope")
    config = ClientConfig(pipeline=COUNTER, local_tasks=1, frames=3, security=security)
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{token_server.port}")
    try:
        report = Client(pipeline, config, transport).run()
    finally:
        transport.close()
    assert "UNAUTHENTICATED" in report["error"]
    assert "--token or OFFLOAD_TOKEN" in report["error"]


@pytest.mark.parametrize(
    ("server_kind", "which", "said", "tls"),
    [
        ("plaintext", "ca", "this device expects TLS (--tls-ca) but the server speaks plain", True),
        ("plaintext", "system", "this device expects TLS (--tls) but the server speaks", True),
        ("tls", "plaintext", "the server expects TLS but this device connects in plain", True),
        ("tls", "rogue-ca", "the server's TLS certificate is not trusted here: give the CA", True),
        ("mtls", "ca", "the server requires a client certificate (mutual TLS): give", True),
        ("mtls", "rogue-cert", "the server refused this device's certificate (--tls-cert)", True),
        ("none", "plaintext", "connection refused: nothing listens on that port", False),
    ],
)
def test_the_transport_says_at_once_why_it_cannot_reach_the_server(
    start_server: Callable[..., RunningServer],
    pki: Pki,
    server_kind: str,
    which: str,
    said: str,
    tls: bool,
) -> None:
    tls_pair = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    servers = {
        "plaintext": ServerSecurity(),
        "tls": ServerSecurity(**tls_pair),
        "mtls": ServerSecurity(**tls_pair, tls_client_ca=str(pki.ca)),
    }
    port = (
        free_port()
        if server_kind == "none"
        else start_server(COUNTER, security=servers[server_kind]).port
    )
    security = {
        "plaintext": ClientSecurity(),
        "system": ClientSecurity(tls=True),
        "ca": ClientSecurity(tls_ca=str(pki.ca)),
        "rogue-ca": ClientSecurity(tls_ca=str(pki.rogue_ca)),
        "rogue-cert": ClientSecurity(
            tls_ca=str(pki.ca), tls_cert=str(pki.rogue_cert), tls_key=str(pki.rogue_key)
        ),
    }[which]
    connect_timeout = 60.0
    began = time.monotonic()
    transport = GrpcTransport(
        f"127.0.0.1:{port}", client_options(ClientConfig()), connect_timeout, security
    )
    try:
        elapsed = time.monotonic() - began
        assert not transport.initially_ready
        assert transport.failure is not None and said in str(transport.failure)
        assert transport.failure.tls is tls
        # gRPC said why at the first failed attempt: nothing waited for the timeout.
        assert elapsed < connect_timeout / 2
    finally:
        transport.close()


def _cert_pems(
    tmp: Path, name: str, sans: list[x509.GeneralName], cn: str | None
) -> tuple[str, str]:
    """A client certificate (with ``sans``, first first) signed by the CA in ``tmp``; its
    certificate and key files. The CA is made on first use."""
    ca_key_path, ca_path = tmp / "other-ca.key", tmp / "other-ca.pem"
    if not ca_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2100, 1, 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        ca_key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devices"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


UPN = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


def _upn(name: str) -> x509.OtherName:
    # A DER UTF8String: tag 0x0c, then the length.
    return x509.OtherName(UPN, b"\x0c" + bytes([len(name)]) + name.encode())


def test_mutual_tls_never_gives_two_devices_the_placeholder_of_other_san_types(
    start_server: Callable[..., RunningServer], pki: Pki, tmp_path: Path
) -> None:
    # gRPC names an otherName, RegisteredID or DirectoryName SAN "other types of SAN": devices
    # whose first SAN is one of those must be told apart by a later SAN or the CN, or refused.
    certs = {
        "upn-then-dns": _cert_pems(
            tmp_path, "a", [_upn("a@corp"), x509.DNSName("cam-a.example")], None
        ),
        "rid-then-uri": _cert_pems(
            tmp_path,
            "b",
            [
                x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
                x509.UniformResourceIdentifier("spiffe://corp/cam-b"),
            ],
            None,
        ),
        "dirname-then-cn": _cert_pems(
            tmp_path,
            "c",
            [x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))],
            "cam-c",
        ),
        "upn-only": _cert_pems(tmp_path, "d", [_upn("d@corp")], None),
        "upn-only-too": _cert_pems(tmp_path, "e", [_upn("e@corp")], None),
    }
    server = start_server(
        COUNTER,
        security=ServerSecurity(
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(tmp_path / "other-ca.pem"),
        ),
    )
    seen = {}
    for which, (cert, key) in certs.items():
        security = ClientSecurity(tls_ca=str(pki.ca), tls_cert=cert, tls_key=key)
        if which.startswith("upn-only"):
            with pytest.raises(grpc.RpcError) as err:
                exchange(server.port, security, [state(0, 1, device="claimed")])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
            details = err.value.details() or ""
            assert "certificate" in details and "\n" not in details
            continue
        answers = exchange(server.port, security, [state(0, 1, device="claimed")])
        seen[which] = decode(answers[0].output)["device"]
    assert seen == {
        "upn-then-dns": "cam-a.example",
        "rid-then-uri": "spiffe://corp/cam-b",
        "dirname-then-cn": "cam-c",
    }
