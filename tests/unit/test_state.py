"""The state API and its in-memory backend: what a last task reads and changes, what is
committed and when, the bounds; and the test seam ``offload.testing.run_with_state``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from examples.ball_tracking.tasks import SNAPSHOT, TRAIL_LENGTH, aggregate
from offload import CodecError, ServerConfig, current_state, encode, load_pipeline
from offload._state import MAX_INDEXES, MAX_PUBLISHED_VALUE, MemoryState
from offload.testing import RemoteExecutor, run_with_state
from offload.v1 import offload_pb2 as pb

from ..helpers import install


def tally(n: int) -> tuple[bool, dict[str, Any]]:
    state = current_state()
    state.device["seen"] = state.device.get("seen", 0) + 1
    state.device.setdefault("values", []).append(n)
    if n < 0:
        raise ValueError("negative")
    return True, {"seen": state.device["seen"]}


def test_device_state_carries_from_item_to_item_and_a_failed_item_changes_nothing() -> None:
    store = MemoryState()
    assert run_with_state(tally, 5, store=store) == (True, {"seen": 1})
    with pytest.raises(ValueError, match="negative"):
        run_with_state(tally, -1, store=store)
    assert run_with_state(tally, 7, store=store) == (True, {"seen": 2})
    assert store.state("device").device == {"seen": 2, "values": [5, 7]}
    assert run_with_state(tally, 1, store=store, device_id="other") == (True, {"seen": 1})


def test_state_values_are_codec_values_arrays_included() -> None:
    store = MemoryState()

    def keep(value: Any) -> tuple[bool, None]:
        current_state().device["v"] = value
        return True, None

    value = {"a": np.arange(3, dtype=np.int16), "b": (1, "x", b"y"), "c": [None, 2.5]}
    run_with_state(keep, value, store=store)
    kept = store.state("device").device["v"]
    assert kept["b"] == (1, "x", b"y") and kept["c"] == [None, 2.5]
    np.testing.assert_array_equal(kept["a"], value["a"])
    with pytest.raises(CodecError, match="object"):
        run_with_state(keep, object(), store=store)


def test_a_device_states_numeric_lists_are_stored_packed_and_load_as_they_were() -> None:
    store = MemoryState()
    trail = [[x, 2 * x] for x in range(TRAIL_LENGTH)]

    def keep(value: Any) -> tuple[bool, None]:
        current_state().device.update(trail=value, seen=7)
        return True, None

    run_with_state(keep, trail, store=store)
    stored = pb.Value.FromString(store.snapshot("device").data)
    (entry,) = (e for e in stored.map_value.entries if e.key == "trail")
    assert entry.value.WhichOneof("kind") == "packed_list"
    assert store.state("device").device == {"trail": trail, "seen": 7}


def test_fleet_count_keeps_each_devices_highest_mark_and_counts_this_items_own() -> None:
    store = MemoryState()

    def seen(at: float) -> tuple[bool, int]:
        state = current_state()
        state.mark("t", at)
        return True, state.count("t", at - 10, at + 10)

    assert run_with_state(seen, 100.0, store=store, device_id="a") == (True, 1)
    assert run_with_state(seen, 105.0, store=store, device_id="b") == (True, 2)
    assert run_with_state(seen, 50.0, store=store, device_id="a") == (True, 0)  # a is at 100
    assert run_with_state(seen, 130.0, store=store, device_id="c") == (True, 1)
    with pytest.raises(ValueError, match="finite"):
        run_with_state(seen, float("nan"), store=store)

    def many(_: None) -> tuple[bool, None]:
        for i in range(MAX_INDEXES + 1):
            current_state().mark(f"i{i}", 1.0)
        return True, None

    with pytest.raises(ValueError, match=f"at most {MAX_INDEXES} indexes"):
        run_with_state(many, None, store=store)


def test_the_memory_store_forgets_the_least_recent_devices_beyond_its_bounds() -> None:
    store = MemoryState(max_devices=3, max_published_bytes=2500)

    def publish(size: int) -> tuple[bool, None]:
        state = current_state()
        state.device["size"] = size
        state.publish("frame", b"x" * size)
        return True, None

    for device in "abcd":
        run_with_state(publish, 1000, store=store, device_id=device)
    with pytest.raises(ValueError, match=f"more than {MAX_PUBLISHED_VALUE} per value"):
        run_with_state(publish, MAX_PUBLISHED_VALUE + 1, store=store, device_id="e")
    assert store.state("a").device == {}  # the fourth device pushed out the first
    assert store.published("a", "frame") is None and store.published("b", "frame") is None
    assert store.published("c", "frame") == b"x" * 1000 == store.published("d", "frame")


def test_a_state_over_its_byte_limit_fails_the_item_naming_the_option() -> None:
    def hoard(n: int) -> tuple[bool, int]:
        current_state().device["blob"] = b"x" * 5000
        return True, n

    def emit() -> tuple[bool, int]:
        return True, 1

    name = install("hoarder", tasks=[emit, hoard])
    pipeline = load_pipeline(name)
    executor = RemoteExecutor(pipeline, ServerConfig(pipeline=name, state_max_bytes=4096))
    state = pb.TaskState(
        pipeline=name, fingerprint=pipeline.fingerprint, device_id="d", run_id="r", next_task=1
    )
    state.args.CopyFrom(encode(1))
    result = executor.execute(state)
    assert result.status == pb.ItemResult.FAILED and result.task == 1
    assert "--state-max-bytes 4096" in result.error and "\n" not in result.error
    assert not result.HasField("output")


def test_current_state_outside_the_last_task_says_where_it_works() -> None:
    with pytest.raises(RuntimeError, match="only available to the last task"):
        current_state()


JPEG = b"\xff\xd8 a snapshot"


def test_the_ball_trackers_aggregate_is_tested_without_a_server() -> None:
    store = MemoryState()
    for n in range(40):
        ok, result = run_with_state(
            aggregate, JPEG, (1.0, 2.0), 15.0, (n, n), store=store, item=n, capture_time=n
        )
        assert ok and result["items_seen"] == n + 1 and result["trail"][-1] == [n, n]
    assert len(result["trail"]) == TRAIL_LENGTH
    assert store.published("device", SNAPSHOT) == JPEG
