"""Load: 16 devices stream to one real server process for ~20 s: no error, every item answered.

``OFFLOAD_LOAD_SECONDS`` changes the duration. Throughput is printed, not asserted (speed is
measured by ``make bench``); the assertions are about correctness under load.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zlib
from typing import Any

import numpy as np

from offload import Client, ClientConfig, GrpcTransport, load_pipeline
from tests.apps.load import payload

from ..helpers import spawn_server

DEVICES = 16
SECONDS = float(os.environ.get("OFFLOAD_LOAD_SECONDS", "20"))


def test_sixteen_devices_for_twenty_seconds_every_item_answered() -> None:
    child = spawn_server("--log-level", "WARNING", pipeline="tests.apps.load")
    server, port = child.process, child.port
    try:
        pipeline = load_pipeline("tests.apps.load")
        stop = threading.Event()
        outputs: dict[str, io.StringIO] = {}
        reports: dict[str, dict[str, Any]] = {}

        def device(name: str) -> None:
            config = ClientConfig(pipeline=pipeline.name, local_tasks=1, device_id=name)
            transport = GrpcTransport.from_config(config, f"127.0.0.1:{port}")
            outputs[name] = io.StringIO()
            try:
                reports[name] = Client(pipeline, config, transport, outputs[name], stop).run()
            finally:
                transport.close()

        threads = [threading.Thread(target=device, args=(f"load-{i:02d}",)) for i in range(DEVICES)]
        began = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(SECONDS)  # the load runs this long; the clients then drain what is in flight
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - began
        assert server.poll() is None, "the server died under load"
    finally:
        child.stop(15)
    assert sorted(reports) == [f"load-{i:02d}" for i in range(DEVICES)]
    total = 0
    for name, report in reports.items():
        records = [json.loads(line) for line in outputs[name].getvalue().splitlines()]
        captured = report["items"]["captured"]
        assert captured > 0 and report["error"] is None, (name, report["error"])
        assert report["items"]["completed"] == captured, (name, report["items"])
        assert report["link"]["disconnects"] == report["link"]["ran_locally"] == 0
        assert [r["item"] for r in records] == list(range(captured))
        for r in records:
            data = payload(name, r["item"])
            expected = {
                "item": r["item"],
                "sum": int(data.sum(dtype=np.uint64)),
                "crc": zlib.crc32(data.tobytes()),
                "device": name,
            }
            assert r["result"] == expected, (name, r["item"])
        total += captured
    print(f"\nload: {DEVICES} devices, {total} items in {elapsed:.1f} s = {total / elapsed:.0f}/s")
