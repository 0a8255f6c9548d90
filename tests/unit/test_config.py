"""The configuration dataclasses: each refuses a bad value naming the field and the option that
sets it, their defaults are valid, and they are frozen."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
from typing import Any

import pytest

from offload._config import (
    ClientConfig,
    ClientSecurity,
    Keepalive,
    Limits,
    LinkConfig,
    ServerConfig,
    ServerSecurity,
    field_default,
    grpc_target,
)
from offload.exceptions import ConfigError

CLASSES = [
    Limits,
    Keepalive,
    ServerSecurity,
    ClientSecurity,
    LinkConfig,
    ClientConfig,
    ServerConfig,
]

# (class, field, bad value, what the message must say: the option, or where no option sets the
# field, the class and field)
REFUSED: list[tuple[type, str, Any, str]] = [
    (Limits, "max_message_bytes", 1000, "--max-message-bytes 1000: use 1024 to 2147483647"),
    (Limits, "max_message_bytes", 2**31, "--max-message-bytes must be at most 2147483647"),
    (Keepalive, "time", 0.0, "Keepalive.time 0: give a number of seconds, more than 0"),
    (Keepalive, "timeout", -1.0, "Keepalive.timeout -1"),
    (Keepalive, "min_ping_interval", math.inf, "Keepalive.min_ping_interval inf"),
    (ClientSecurity, "tls_cert", "device.pem", "needs both --tls-cert and --tls-key"),
    (ClientSecurity, "tls_key", "device.key", "needs both --tls-cert and --tls-key"),
    (ClientSecurity, "tls_ca", "", "--tls-ca is empty"),
    (ClientSecurity, "token", "", "--token is empty"),
    (LinkConfig, "buffer", 0, "--buffer 0: at least 1 item must fit"),
    (LinkConfig, "when_full", "spill", "--when-full 'spill': use one of block, drop-oldest"),
    (LinkConfig, "item_timeout", 0.0, "--item-timeout 0: give a number of seconds, more than 0"),
    (LinkConfig, "resend_grace", -1.0, "--resend-grace -1: give a number of seconds, 0 or more"),
    (LinkConfig, "reconnect_backoff_max", math.nan, "LinkConfig.reconnect_backoff_max nan"),
    (LinkConfig, "max_sends", 0, "LinkConfig.max_sends 0: an item must be sent at least once"),
    (ClientConfig, "pipeline", " ", "--pipeline is empty"),
    (ClientConfig, "server", "cloud", "--server 'cloud': give HOST:PORT, e.g. cloud:50051"),
    (ClientConfig, "server", "10.0.0.1:1,cloud:2", "'cloud' is not an IP address; a list takes"),
    (ClientConfig, "server", "10.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6 addresses"),
    (ClientConfig, "server", "10.0.0.1:1,10.0.0.1:1", "an address is given twice"),
    (ClientConfig, "server", "dns:///cloud:0", "'0' in 'cloud:0' is not a port (1..65535)"),
    (ClientConfig, "server", "::1:50051", "put an IPv6 address in brackets: [::1]:50051"),
    (LinkConfig, "outage", "keep", "--outage 'keep': use one of run-all, hold-last"),
    (LinkConfig, "buffer_bytes", 100, "--buffer-bytes 100: give at least 1024 bytes"),
    (LinkConfig, "buffer_dir", " ", "--buffer-dir is empty"),
    (LinkConfig, "buffer_dir", "/var/lib/x", "--buffer-dir /var/lib/x keeps the items held"),
    (ClientConfig, "window", 0, "--window 0: at least 1 item must be in flight"),
    (ClientConfig, "device_id", " ", "--device-id ' ': give this device a name"),
    (ClientConfig, "frames", -1, "--frames -1: give 0 or more items"),
    (ClientConfig, "source", "", "--source is empty"),
    (ClientConfig, "connect_timeout", math.inf, "--connect-timeout inf: give a number of seconds"),
    (ClientConfig, "fps", 0.0, "--fps 0: the target must be a positive items/s rate"),
    (ClientConfig, "fps", math.nan, "--fps nan"),
    (ClientConfig, "control_period", 0.0, "--control-period 0: give a number of seconds"),
    (ClientConfig, "slowdown", 0.5, "--emulate-slowdown 0.5: use 1 (off) or more (slowdown)"),
    (ClientConfig, "batch_items", 0, "--batch-items 0: give 1 or more (1 = no batching)"),
    (ClientConfig, "batch_bytes", 0, "--batch-bytes 0: give 1 or more bytes"),
    (ClientConfig, "linger_ms", -1.0, "--linger-ms -1: give milliseconds, 0 or more"),
    (ClientConfig, "linger_ms", math.inf, "--linger-ms inf"),
    (ClientConfig, "device_workers", -1, "--device-workers -1: give 1 or more (0: one per CPU)"),
    (ServerConfig, "pipeline", "", "--pipeline is empty"),
    (ServerConfig, "host", "", "--host is empty: give an address"),
    (ServerConfig, "host", "[]", "--host is empty"),
    (ServerConfig, "port", 65536, "--port 65536 is not a port: use 0..65535"),
    (ServerConfig, "port", -1, "--port -1 is not a port"),
    (ServerConfig, "metrics_port", 70000, "--metrics-port 70000 is not a port"),
    (ServerConfig, "dashboard_port", 70000, "--dashboard-port 70000 is not a port"),
    (ServerConfig, "workers", 0, "--workers 0: at least 1 device stream must fit"),
    (ServerConfig, "task_threads", 0, "--task-threads must be at least 0"),
    (ServerConfig, "grace_seconds", math.nan, "--grace nan: give a number of seconds"),
    (ServerConfig, "grace_seconds", -1.0, "--grace -1: give a number of seconds, 0 or more"),
    (ServerConfig, "stream_idle_seconds", 0.0, "ServerConfig.stream_idle_seconds 0"),
    (ServerConfig, "streams_per_connection", 0, "ServerConfig.streams_per_connection 0"),
    (ServerConfig, "max_connections", 0, "ServerConfig.max_connections 0: give 1 or more"),
    (ServerConfig, "handshake_timeout", 0.0, "ServerConfig.handshake_timeout 0"),
    (ServerConfig, "metrics_max_devices", -1, "--metrics-max-devices -1: give 0 or more"),
    (ServerConfig, "state", "redis", "--state 'redis': give memory or redis://HOST:PORT/DB"),
    (ServerConfig, "state", "http://cache:6379", "--state 'http://cache:6379': give memory"),
    (ServerConfig, "state", "redis://cache:port/0", "the port is not a number"),
    (ServerConfig, "state", "redis://cache:6379/db", "the database is a number (/0)"),
    (ServerConfig, "state", "redis://:pw@cache:6379/0", "password in OFFLOAD_STATE_PASSWORD"),
    (ServerConfig, "state_password", "", "--state-password is empty"),
    (ServerConfig, "state_tls_ca", "ca.pem", "--state-tls-ca needs --state rediss://"),
    (ServerConfig, "state_timeout", 0.0, "--state-timeout 0: give a number of seconds"),
    (ServerConfig, "state_ttl", 10.0, "--state-ttl 10: give at least 60 seconds"),
    (ServerConfig, "state_max_bytes", 100, "--state-max-bytes 100: give 1024 or more"),
    (ServerConfig, "state_answers", 0, "--state-answers 0: keep at least 1 per run"),
    (ServerConfig, "max_connection_age", 0.0, "--max-connection-age 0: give a number of seconds"),
    (ServerConfig, "max_connection_age_grace", -1.0, "--max-connection-age-grace -1: give"),
    (ServerConfig, "health_port", 70000, "--health-port 70000 is not a port: use 0..65535"),
    (ClientConfig, "compression", "gzip", "--compression 'gzip': use one of none, lz4, zstd"),
    (ServerConfig, "compression", "", "--compression '': use one of none, lz4, zstd, auto"),
]


@pytest.mark.parametrize(
    ("cls", "name", "value", "expected"),
    REFUSED,
    ids=[f"{cls.__name__}.{name}={value!r}" for cls, name, value, _ in REFUSED],
)
def test_a_bad_value_is_refused_naming_the_field_and_its_option(
    cls: type, name: str, value: Any, expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        cls(**{name: value})
    message = str(refused.value)
    assert expected in message
    assert "\n" not in message
    # The field is named: by its option where that spells it (--max-message-bytes), else itself.
    assert name in message or f"--{name.replace('_', '-')}" in message, message


def test_every_validated_field_has_a_case() -> None:
    # Fields free of checks: any value is one a run can mean (None, a path, a count the codec
    # or executor enforces as given).
    unchecked = {
        (Limits, "max_depth"),
        (Limits, "max_elements"),
        (Limits, "max_total_elements"),
        (Limits, "max_dims"),
        (ClientSecurity, "tls"),
        (ClientConfig, "local_tasks"),
        (ServerConfig, "dedup_items"),
        (ServerConfig, "max_runs"),
        (ServerConfig, "dedup_total"),
        (ServerConfig, "dedup_bytes"),
        (ServerConfig, "read_ahead_bytes"),
        (ServerConfig, "read_ahead_total_bytes"),
        (ServerConfig, "reflection"),
    }
    nested = {"limits", "security", "keepalive", "link"}
    cased = {(cls, name) for cls, name, _, _ in REFUSED}
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            if cls is ServerSecurity or f.name in nested:
                continue  # PEM files are checked when read (offload._security)
            assert (cls, f.name) in cased | unchecked, f"{cls.__name__}.{f.name} needs a case"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_the_defaults_are_valid_and_frozen(cls: type) -> None:
    config = cls()
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, first, getattr(config, first))


def test_a_fields_default_reads_its_factory_too() -> None:
    assert field_default(ClientConfig, "window") == ClientConfig().window
    assert field_default(ClientConfig, "device_id") == socket.gethostname()


@pytest.mark.parametrize(
    ("server", "target"),
    [
        ("cloud.example.com:50051", "cloud.example.com:50051"),
        ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[fd00::1]:50051, [fd00::2]:50051", "ipv6:[fd00::1]:50051,[fd00::2]:50051"),
        ("dns:///offload.example.com:50051", "dns:///offload.example.com:50051"),
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
    ],
)
def test_several_replicas_become_one_grpc_target(server: str, target: str) -> None:
    assert ClientConfig(server=server).server == server
    assert grpc_target(server) == target


def test_device_workers_count_against_the_window_and_the_buffer_with_a_server() -> None:
    with pytest.raises(ConfigError, match=r"--device-workers 3 exceeds --window 2: items on"):
        ClientConfig(local_tasks=2, window=2, device_workers=3)
    with pytest.raises(ConfigError, match=r"--device-workers 3 exceeds --buffer 2"):
        ClientConfig(fps=10.0, link=LinkConfig(buffer=2), device_workers=3)
    # N workers and the item captured ahead: N + 1 must fit.
    with pytest.raises(ConfigError, match=r"--device-workers 2 exceeds --window 2: .* \(3\)"):
        ClientConfig(local_tasks=2, window=2, device_workers=2)
    assert ClientConfig(local_tasks=2, window=3, device_workers=2).device_items == 3
    assert ClientConfig(local_tasks=2, window=1).device_items == 1
    # Client-only mode has neither: any number of workers.
    assert ClientConfig(window=1, device_workers=3).workers == 3


def test_zero_device_workers_is_one_per_cpu_this_process_may_use() -> None:
    assert ClientConfig(device_workers=0).workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("compression", "package", "module"),
    [("zstd", "zstandard", "zstandard"), ("lz4", "lz4", "lz4.block")],
)
def test_a_compression_whose_package_is_missing_is_refused_saying_what_to_install(
    compression: str, package: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python itself marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, module, None)
    for cls in (ClientConfig, ServerConfig):
        with pytest.raises(ConfigError) as refused:
            cls(compression=compression)
        assert str(refused.value) == (
            f"--compression {compression} needs the {package} package, which is not installed: "
            "pip install 'offload[compression]', or use --compression auto (what is installed)"
        )
