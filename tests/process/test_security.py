"""TLS on one side only, as the client's command line says it: one line, a non-zero exit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from offload import RunningServer, ServerSecurity

from ..helpers import COUNTER, Pki, offload


@pytest.mark.parametrize(
    ("tls_server_side", "tls_here", "said"),
    [
        (
            False,
            True,
            "this device expects TLS (--tls-ca) but the server speaks plaintext: start the "
            "server with --tls-cert and --tls-key, or drop --tls-ca here",
        ),
        (
            True,
            False,
            "the server expects TLS but this device connects in plaintext: give --tls-ca PEM",
        ),
    ],
    ids=["tls-here-only", "tls-there-only"],
)
def test_tls_on_one_side_only_is_said_in_one_line_and_the_run_exits_non_zero(
    start_server: Callable[..., RunningServer],
    pki: Pki,
    tmp_path: Path,
    tls_server_side: bool,
    tls_here: bool,
    said: str,
) -> None:
    security = ServerSecurity(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    server = start_server(COUNTER, security=security if tls_server_side else ServerSecurity())
    target = f"127.0.0.1:{server.port}"
    report_path = tmp_path / "report.json"
    result = offload(
        "offload.client",
        *("--pipeline", COUNTER, "--local-tasks", "1", "--frames", "3", "--server", target),
        *(["--tls-ca", str(pki.ca)] if tls_here else []),
        *("--report", str(report_path)),
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if target in line]
    assert len(ours) == 2, result.stderr  # at the start, and why the run failed
    assert f"event=unreachable target={target}" in ours[0] and said in ours[0]
    assert ours[1].startswith(f"error: never reached the server at {target}: ") and said in ours[1]
    report = json.loads(report_path.read_text())
    assert report["link"]["connects"] == 0 and report["link"]["ran_locally"] == 3
    assert said in report["error"]
