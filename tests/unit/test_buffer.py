"""The durable outage buffer: held items survive closing it (a restart), each run's apart, and a
folder that does not exist is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload._device.buffer import DurableBuffer, Held
from offload.exceptions import ConfigError


def test_held_items_outlive_the_buffer_and_are_found_by_the_next_run_only(tmp_path: Path) -> None:
    first = DurableBuffer(str(tmp_path))
    first.put("run-1", 0, 1, b"zero")
    first.put("run-1", 1, 1, b"one")
    first.put("run-1", 1, 2, b"one, held at the last task")  # the same item, re-encoded
    first.put("run-1", 2, 2, b"two")
    first.delete("run-1", 0)  # answered
    first.close()
    again = DurableBuffer(str(tmp_path))
    assert again.earlier("run-2") == {
        "run-1": [
            Held("run-1", 1, 2, b"one, held at the last task"),
            Held("run-1", 2, 2, b"two"),
        ]
    }
    assert again.earlier("run-1") == {}  # a run never recovers its own items
    assert again.count() == 2
    again.close()


def test_a_missing_folder_is_refused_saying_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        DurableBuffer(str(tmp_path / "nowhere"))
    assert "--buffer-dir" in str(refused.value) and "create it" in str(refused.value)
    assert "\n" not in str(refused.value)
