"""The dashboard's page in headless Chromium, against a real server process with two real devices
streaming, and against 100 synthetic devices fed through the board's listener seam."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from playwright.sync_api import Page, expect

from offload import RunningServer, ServerConfig, load_pipeline, publish_view, serve
from offload._device.embedded import EmbeddedServer
from offload._pipeline import ItemContext, _current
from offload.v1 import offload_pb2 as pb

from ..helpers import ENV, ROOT, spawn_server

TOKEN = "browser-test-token"
# Two devices at different splits; the link shaping keeps them to a few items a second each,
# so that two clients, a server and a browser share two cores without starving each other.
DEVICES = {"cam-a": 1, "cam-b": 3}
WAIT_MS = 60_000  # a deadline for the page, not a pace: it is met in seconds when all is well


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server process with its dashboard behind the token, and two client processes streaming
    to it; yields the dashboard's URL."""
    logs = tmp_path_factory.mktemp("fleet")
    server: EmbeddedServer = spawn_server(
        *("--dashboard-port", "0", "--token", TOKEN, "--log-level", "WARNING")
    )
    clients: list[subprocess.Popen[bytes]] = []
    try:
        assert server.process.stdout is not None
        announced = server.process.stdout.readline().strip()
        assert announced.startswith("dashboard on "), announced
        for device, split in DEVICES.items():
            clients.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "offload.client", "--server", server.target),
                        *("--local-tasks", str(split), "--device-id", device),
                        *("--emulate-link", "50mbit", "--log-level", "WARNING"),
                    ],
                    cwd=ROOT,
                    env={**ENV, "OFFLOAD_TOKEN": TOKEN},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=(logs / f"{device}.log").open("wb"),
                )
            )
        yield "http://" + announced.removeprefix("dashboard on ")
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            try:
                client.wait(15)
            except subprocess.TimeoutExpired:
                client.kill()
        server.stop()


def sign_in(page: Page, url: str) -> None:
    response = page.goto(url)
    assert response is not None and response.status == 401
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")


def completed(page: Page, device: str) -> int:
    return int(page.text_content(f'tr[data-device="{device}"] td.completed') or "0")


def test_both_devices_appear_with_their_splits_views_and_moving_numbers(
    fleet: str, page: Page, artifacts: Path
) -> None:
    sign_in(page, fleet)
    tasks = load_pipeline("examples.ball_tracking")
    for device, split in DEVICES.items():
        row = page.locator(f'tr[data-device="{device}"]')
        expect(row).to_be_visible(timeout=WAIT_MS)
        expect(row.locator("td.split")).to_have_text(
            f"{split} (cloud from {tasks.task_name(split)})", timeout=WAIT_MS
        )
        page.wait_for_function(
            "device => document.querySelector(`tr[data-device='${device}'] img`).naturalWidth > 0",
            arg=device,
            timeout=WAIT_MS,
        )
    before = {device: completed(page, device) for device in DEVICES}
    page.wait_for_function(
        """before => Object.entries(before).every(([device, count]) =>
             Number(document.querySelector(`tr[data-device='${device}'] td.completed`)
                    .textContent) > count)""",
        arg=before,
        timeout=WAIT_MS,
    )
    expect(page.locator("#devices-active")).to_have_text("2 / 2")
    expect(page.locator("#saving-bytes")).to_have_text(re.compile(r"-?\d+ %"), timeout=WAIT_MS)
    # Some history for the screenshot: ten seconds of points in the plot.
    page.wait_for_function(
        "plot !== null && plot.data[1].filter(v => v !== null).length >= 10", timeout=WAIT_MS
    )
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)


def test_without_the_token_the_page_and_the_api_refuse(fleet: str, page: Page) -> None:
    for path in ("/", "/api/fleet", "/api/events", "/api/view/cam-a"):
        response = page.goto(fleet + path)
        assert response is not None and response.status == 401, path
    page.goto(fleet + "/")
    expect(page.locator("#token")).to_be_visible()
    assert page.locator("#devices").count() == 0
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator("#message")).to_have_text("That token is not the server's.")


def _jpeg(n: int) -> bytes:
    image = np.full((90, 120, 3), (n * 37) % 255, np.uint8)
    cv2.putText(image, str(n), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 2)
    return bytes(cv2.imencode(".jpg", image)[1])


def test_the_page_keeps_up_with_100_devices(page: Page) -> None:
    """100 synthetic devices through the listener seam, each with a view; the page must show all
    of them and keep applying updates. The time one update takes the page is printed."""
    pipeline = load_pipeline("examples.ball_tracking")
    running: RunningServer = serve(
        ServerConfig(pipeline=pipeline.name, host="127.0.0.1", port=0, dashboard_port=0), pipeline
    )
    assert running.dashboard is not None
    board = running.dashboard.board
    views = [_jpeg(n) for n in range(100)]
    stop = threading.Event()

    def feed() -> None:
        item = 0
        while not stop.is_set():
            for n in range(100):
                device = f"synthetic-{n:03}"
                state = pb.TaskState(device_id=device, run_id="r", item=item, next_task=1 + n % 6)
                state.capture_time = board.clock() - 0.02
                token = _current.set(ItemContext(device, "r", item, 0.0, on_server=True))
                publish_view(views[n])
                _current.reset(token)
                result = pb.ItemResult(item=item, status=pb.ItemResult.COMPLETED)
                result.server_cpu_seconds = 0.001
                board.observe(state, result)
            item += 1
            stop.wait(0.1)  # ten items a second per device: a fleet's pace, not a wait for a race

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        page.goto(f"http://127.0.0.1:{running.dashboard_port}/")
        expect(page.locator("#devices tbody tr")).to_have_count(100, timeout=WAIT_MS)
        first = completed(page, "synthetic-099")
        page.wait_for_function(
            f"""Number(document.querySelector("tr[data-device='synthetic-099'] td.completed")
                 .textContent) > {first} + 10""",
            timeout=WAIT_MS,
        )
        page.wait_for_function(
            "[...document.querySelectorAll('#devices img')].filter(i => i.naturalWidth > 0)"
            ".length === 100",
            timeout=WAIT_MS,
        )
        per_update = page.evaluate(
            """async () => {
                 const snap = await (await fetch('/api/fleet')).json();
                 const t = performance.now();
                 for (let i = 0; i < 20; i++) render(snap);
                 return (performance.now() - t) / 20;
               }"""
        )
        print(f"\nthe page applies one update of 100 devices in {per_update:.1f} ms")
    finally:
        stop.set()
        feeder.join(5)
        running.stop(1.0)
