"""Server replicas on one Redis: devices' results equal a client-only run's, stateful aggregate
included, when a replica is SIGKILLed or frozen mid-run, or Redis restarts.

Real processes: ``redis-server``, three ``offload.server --state redis://...`` replicas and four
``offload.client`` devices, each device behind a relay that stands in for a Service (a new
connection goes to the first live replica), with ``--buffer 1 --when-full block`` so that the
items unanswered when their replica died fill the buffer and capture waits for a replica, and a
long ``--resend-grace`` so that those items are resent, not run here; or, in the last test, with
the device's own fail-over: every replica in ``--server`` and ``--outage hold-last``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offload._device.embedded import EmbeddedServer

from ..helpers import ENV, ROOT, RedisServer, Relay, spawn_server, wait_until

STATEFUL = "tests.apps.stateful"
DEVICES = 4
FRAMES = 400


class Fleet:
    """Replicas on one Redis, devices behind relays; results read from the devices' files."""

    def __init__(self, redis: RedisServer, directory: Path) -> None:
        self.redis = redis
        self.directory = directory
        # Each item takes a few ms on the server, so that items are in flight at any moment.
        self.replicas = [self._replica() for _ in range(3)]
        ports = [r.port for r in self.replicas]
        self.relays = [Relay(ports[i % 3 :] + ports[: i % 3]) for i in range(DEVICES)]
        self.devices: list[subprocess.Popen[str]] = []

    def _replica(self) -> EmbeddedServer:
        return spawn_server(
            "--state", self.redis.url, "--state-timeout", "1", "--log-level", "ERROR",
            pipeline=STATEFUL, env={"OFFLOAD_TEST_DELAY": "0.003"},
        )  # fmt: skip

    def output(self, device: int) -> Path:
        return self.directory / f"device-{device}.jsonl"

    def start_devices(self, *options: str, fail_over: bool = False) -> None:
        """Each device behind its relay (``--buffer 1``, ``--outage hold-last``: capture waits
        while no stream is up);
        or, ``fail_over``, given every replica (its own first) with ``--outage hold-last``."""
        ports = [r.port for r in self.replicas]
        for i, relay in enumerate(self.relays):
            if fail_over:
                mine = ports[i % 3 :] + ports[: i % 3]
                server = ",".join(f"127.0.0.1:{p}" for p in mine)
                link = ["--outage", "hold-last"]
            else:
                server, link = relay.address, ["--buffer", "1", "--when-full", "block"]
                # As a fleet on shared state runs (docs/reliability.md#outage-mode): with
                # run-all, items captured while no stream is up would run here.
                link += ["--outage", "hold-last"]
            command = [
                sys.executable, "-m", "offload.client", "--pipeline", STATEFUL,
                "--server", server, "--local-tasks", "1", "--frames", str(FRAMES),
                "--device-id", f"device-{i}", "--output", str(self.output(i)),
                "--report", str(self.directory / f"report-{i}.json"),
                "--resend-grace", "120", "--log-level", "WARNING", *link, *options,
            ]  # fmt: skip
            self.devices.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

    def finished(self, device: int) -> int:
        path = self.output(device)
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait_for_devices(self) -> list[dict[str, Any]]:
        reports = []
        for i, device in enumerate(self.devices):
            _, stderr = device.communicate(timeout=300)
            assert device.returncode == 0, stderr
            reports.append(json.loads((self.directory / f"report-{i}.json").read_text()))
        return reports

    def results(self, device: int) -> list[Any]:
        lines = self.output(device).read_text().splitlines()
        return [(r["item"], r["status"], r.get("result")) for r in map(json.loads, lines)]

    def close(self) -> None:
        for device in self.devices:
            if device.poll() is None:
                device.kill()
                device.wait()
        for relay in self.relays:
            relay.close()
        for replica in self.replicas:
            replica.send_signal(signal.SIGCONT)
            replica.kill()
            replica.stop()


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(redis_server, tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def client_only(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """What every device's results must be: the same run with every task on the device."""
    out = tmp_path_factory.mktemp("client-only") / "out.jsonl"
    subprocess.run(
        [sys.executable, "-m", "offload.client", "--pipeline", STATEFUL, "--frames", str(FRAMES),
         "--output", str(out)],
        cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return [(r["item"], r["status"], r.get("result")) for r in map(json.loads, out.open())]


def assert_equal_to_client_only(fleet: Fleet, reports: list[dict[str, Any]], expected: Any) -> None:
    for i, report in enumerate(reports):
        assert report["link"]["ran_locally"] == 0, (i, report["link"]["events"])  # all in the cloud
        assert fleet.results(i) == expected, f"device {i}"


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_replica_killed_or_frozen_mid_run_loses_and_doubles_nothing(
    fleet: Fleet, client_only: list[Any], fault: str
) -> None:
    victim = fleet.replicas[0]
    fleet.start_devices()
    # Mid-run: every device has had answers, none has finished.
    assert wait_until(lambda: all(fleet.finished(i) >= 50 for i in range(DEVICES)), 120)
    victim.send_signal(signal.SIGSTOP)  # items in flight stop wherever they are
    for relay in fleet.relays:
        relay.targets.remove(victim.port)
    if fault == "killed":
        victim.kill()
    else:
        # The balancer drops the frozen endpoint's connections (today's device, left to notice
        # a stall by --item-timeout, would run the stalled items itself).
        for relay in fleet.relays:
            relay.cut(victim.port)
    reports = fleet.wait_for_devices()
    if fault == "frozen":
        victim.send_signal(signal.SIGCONT)  # its late commits must change nothing
    assert_equal_to_client_only(fleet, reports, client_only)
    # Devices 0 and 3 were on the victim: their unanswered items were resent to another.
    assert reports[0]["link"]["resent"] >= 1 and reports[3]["link"]["resent"] >= 1


def test_redis_restarted_mid_run_loses_and_doubles_nothing(
    fleet: Fleet, client_only: list[Any]
) -> None:
    fleet.start_devices()
    assert wait_until(lambda: all(fleet.finished(i) >= 50 for i in range(DEVICES)), 120)
    fleet.redis.restart()  # a clean restart: what it had committed survives
    reports = fleet.wait_for_devices()
    assert_equal_to_client_only(fleet, reports, client_only)
    # The restart was felt: replicas answered UNAVAILABLE, devices resent to them.
    assert sum(r["link"]["disconnects"] for r in reports) >= 1


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_devices_failing_over_by_themselves_lose_and_double_nothing(
    fleet: Fleet, client_only: list[Any], fault: str
) -> None:
    # The device's own fail-over (--server with every replica) and --outage hold-last: no relay.
    victim = fleet.replicas[0]
    fleet.start_devices("--item-timeout", "2", fail_over=True)
    assert wait_until(lambda: all(fleet.finished(i) >= 50 for i in range(DEVICES)), 120)
    victim.send_signal(signal.SIGSTOP)
    if fault == "killed":
        victim.kill()
    reports = fleet.wait_for_devices()
    if fault == "frozen":
        victim.send_signal(signal.SIGCONT)  # its late commits must change nothing
    assert_equal_to_client_only(fleet, reports, client_only)
