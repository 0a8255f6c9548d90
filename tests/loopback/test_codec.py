"""Values that cannot travel, and every type's JSON output, alike at every split: client-only,
all tasks here, split 1 against a server on loopback, and split 1 with the server away."""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    Pipeline,
    RunningServer,
    current_item,
    load_pipeline,
)

from ..helpers import free_port, run_split

UNSENDABLE = [{"s": {1, 2}}, 2**70, np.array(["a"]), {3: "x"}]
SUPPORTED = "None, bool, int, float, str, bytes, numpy arrays and scalars, list, tuple, dict[str]"


def results_app(name: str, results: list[Any]) -> Pipeline:
    def emit() -> Any:
        return True, None

    def result() -> Any:
        return True, results[current_item().item]

    module = types.ModuleType(name)
    module.tasks = [emit, result]  # type: ignore[attr-defined]
    sys.modules[name] = module
    return load_pipeline(name)


def every_way(pipeline: Pipeline, port: int, frames: int) -> dict[str, list[str]]:
    """The output lines of client-only, all tasks here, split 1, and split 1 with no server."""
    runs = {
        "client-only": run_split(pipeline, None, frames=frames)[0],
        "K=N": run_split(pipeline, 2, frames=frames)[0],
        "split": run_split(pipeline, 1, port, frames=frames)[0],
    }
    away = GrpcTransport.from_config(ClientConfig(connect_timeout=0.05), f"127.0.0.1:{free_port()}")
    config = ClientConfig(pipeline=pipeline.name, local_tasks=1, frames=frames)
    out = io.StringIO()
    try:
        report = Client(pipeline, config, away, out).run()
    finally:
        away.close()
    assert report["link"]["ran_locally"] == frames
    runs["server away"] = out.getvalue().splitlines()
    return runs


def test_a_result_that_cannot_travel_fails_alike_whatever_the_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = results_app("unsendable_app", [*UNSENDABLE, "fine"])
    runs = every_way(pipeline, start_server(pipeline).port, len(UNSENDABLE) + 1)
    assert runs["client-only"] == runs["K=N"] == runs["split"] == runs["server away"]
    records = [json.loads(line) for line in runs["client-only"]]
    assert records[-1] == {"item": 4, "status": "completed", "result": "fine"}
    assert {r["status"] for r in records[:-1]} == {"failed"}
    assert {r["task"] for r in records[:-1]} == {1}
    assert [r["error"] for r in records[:-1]] == [
        f"the result cannot be sent back: args['s']: cannot send a set; supported: {SUPPORTED}",
        f"the result cannot be sent back: args: int {2**70} does not fit in 64 bits; send it as "
        "a str",
        "the result cannot be sent back: args: arrays of dtype <U1 cannot travel; use a numeric "
        "or bool dtype",
        "the result cannot be sent back: args: map key 3 is not a str; only str keys travel",
    ]


EVERY_TYPE: dict[str, Any] = {
    "none": None,
    "bool": True,
    "int": -(2**63),
    "float": 0.1,
    "special": [float("nan"), float("inf"), -float("inf")],
    "str": "naïve",
    "bytes": b"\x00\xff",
    "array": np.array([[1, 2], [3, 4]], np.uint8),
    "empty": np.zeros((0, 3), np.float32),
    "scalars": [np.float32(1.5), np.int64(7), np.bool_(False)],
    "complex": [np.complex64(1 + 2j), np.array([3j, 4], np.complex128)],
    "list": [1, [2]],
    "tuple": (1, (2,)),
    "dict": {"z": 1, "a": {}},
}
EVERY_TYPE_JSON = (
    '{"none":null,"bool":true,"int":-9223372036854775808,"float":0.1,'
    '"special":[NaN,Infinity,-Infinity],"str":"na\\u00efve","bytes":"AP8=",'
    '"array":[[1,2],[3,4]],"empty":[],"scalars":[1.5,7,false],'
    '"complex":[[1.0,2.0],[[0.0,3.0],[4.0,0.0]]],"list":[1,[2]],"tuple":[1,[2]],'
    '"dict":{"z":1,"a":{}}}'
)


def test_each_type_is_written_to_output_in_its_documented_json_form_whatever_the_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = results_app("every_type_app", [EVERY_TYPE])
    runs = every_way(pipeline, start_server(pipeline).port, 1)
    expected = [f'{{"item":0,"status":"completed","result":{EVERY_TYPE_JSON}}}']
    assert runs == dict.fromkeys(runs, expected)
