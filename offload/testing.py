"""Testing without a network: the seam between the device and the cloud, in one process.

``InProcessTransport`` runs a real ``RemoteExecutor`` (the cloud's validation, de-duplication
and tasks) in a thread of this process behind the device's ``Transport`` protocol, with the same
serialisation as the wire, so a ``Client`` runs end to end in a unit test. This is the only
module that sees both sides of the fence (``offload._device`` and ``offload._cloud``).

``run_with_state`` runs a stateful last task on its own, the way the server does: with a
``State`` from a ``MemoryState`` (a fresh one, or the test's), committed if the task succeeds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._cloud.executor import RemoteExecutor, RequestRejected
from ._device.transport import Stream
from ._pipeline import ItemContext
from ._pipeline import _current as _current_item
from ._state import MemoryState, using
from ._wire import server_error
from .exceptions import ServerError
from .v1 import offload_pb2 as pb

__all__ = ["InProcessTransport", "MemoryState", "RemoteExecutor", "run_with_state"]

_CLOSE = object()


class _InProcessStream:
    def __init__(self, executor: RemoteExecutor) -> None:
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._executor = executor
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def _serve(self) -> None:
        while True:
            data = self._inbox.get()
            if data is _CLOSE:
                self._outbox.put(_CLOSE)
                return
            assert isinstance(data, bytes)
            try:
                answer = self._executor.execute(pb.TaskState.FromString(data))
            except RequestRejected as exc:
                self._outbox.put(server_error(exc.code, str(exc)))
                return
            self._outbox.put(answer.SerializeToString())

    def send(self, state: pb.TaskState) -> int:
        return self.send_bytes(state.SerializeToString())

    def send_bytes(self, data: bytes) -> int:
        self._inbox.put(data)
        return len(data)

    def results(self) -> Iterator[tuple[pb.ItemResult, int]]:
        while True:
            data = self._outbox.get()
            if data is _CLOSE:
                return
            if isinstance(data, ServerError):
                raise data
            assert isinstance(data, bytes)
            yield pb.ItemResult.FromString(data), len(data)

    def reads(self) -> frozenset[int] | None:
        return None  # no headers in process: the device learns from the first answer

    def close(self) -> None:
        self._inbox.put(_CLOSE)

    def cancel(self) -> None:
        self._inbox.put(_CLOSE)


class InProcessTransport:
    """Runs a ``RemoteExecutor`` in this process: the client's logic without a network."""

    def __init__(self, executor: RemoteExecutor) -> None:
        self.executor = executor
        self.target = "in-process"

    def ready(self, timeout: float) -> bool:
        return True

    def open_stream(self) -> Stream:
        return _InProcessStream(self.executor)

    def close(self) -> None:
        pass


def run_with_state(
    task: Callable[..., Any],
    *args: Any,
    store: MemoryState | None = None,
    device_id: str = "device",
    run_id: str = "run",
    item: int = 0,
    capture_time: float = 0.0,
) -> Any:
    """Call ``task(*args)`` as the server calls a pipeline's last task for one item of
    ``device_id``: ``current_item()`` and ``current_state()`` answer, and the state's changes
    are committed to ``store`` unless the task raises (then it raises here). Returns what the
    task returned."""
    store = store if store is not None else MemoryState()
    state = store.state(device_id)
    token = _current_item.set(ItemContext(device_id, run_id, item, capture_time, on_server=True))
    try:
        with using(state):
            returned = task(*args)
    finally:
        _current_item.reset(token)
    if state.used and not store.apply(device_id, state.version, state.changes()):
        raise RuntimeError(f"device {device_id!r}: another thread changed its state meanwhile")
    return returned
