"""The fleet's command-line options reach the configuration: replicas, outage mode, the durable
buffer on the client; connection age and the health port on the server."""

from __future__ import annotations

import pytest

from offload import client, server


def test_the_client_options_for_a_fleet_reach_its_link_configuration() -> None:
    args = client.build_parser({}).parse_args(
        [
            "--local-tasks",
            "2",
            "--server",
            "10.0.0.1:50051,10.0.0.2:50051",
            "--outage",
            "hold-last",
            "--buffer-bytes",
            "4096",
            "--buffer-dir",
            "/var/lib/offload",
        ]
    )
    config = client._config(args)
    assert config.server == "10.0.0.1:50051,10.0.0.2:50051"
    assert (config.link.outage, config.link.buffer_bytes, config.link.buffer_dir) == (
        "hold-last",
        4096,
        "/var/lib/offload",
    )


def test_a_connection_age_of_0_is_never_and_the_health_port_reaches_the_server() -> None:
    parse = server.build_parser({}).parse_args
    assert server._config(parse([])).max_connection_age == 600.0
    config = server._config(
        parse(
            [
                "--max-connection-age",
                "0",
                "--max-connection-age-grace",
                "3",
                "--health-port",
                "8081",
            ]
        )
    )
    assert (config.max_connection_age, config.max_connection_age_grace) == (None, 3.0)
    assert config.health_port == 8081


def test_a_health_port_with_several_processes_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        server.main(["--processes", "2", "--health-port", "8081"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--health-port serves one process's health: use it with --processes 1" in error
