"""State that the last task keeps across items: per device, and fleet-wide.

The last task of a pipeline calls ``current_state()`` and gets a ``State``:

* ``state.device``: this device's dict, as the previous item of the device left it. The task
  changes it in place; the framework commits the change together with the item's answer, and
  only if the item did not fail. Values are what the codec carries (numbers, strings, bytes,
  lists, tuples, string-keyed dicts, NumPy arrays), encoded by the codec like any wire value.
* ``state.mark(index, score)`` / ``state.count(index, low, high)``: fleet-wide indexes where each
  device owns one score (the highest it marked), e.g. its latest capture time; ``count`` says
  how many devices have a score in ``[low, high]`` (this item's own mark included).
* ``state.publish(name, value)``: a per-device value for viewers (the latest snapshot), written
  with the item, never read back by the task.

A task that never calls ``current_state()`` costs nothing and commits nothing: seed-format
tasks with module globals keep working on one server process (their globals are not shared
between processes or replicas; the State is). Where the state lives is the server's ``--state``
(``docs/state.md``): this module holds the API and the in-memory backend, which the device also
uses when it runs the last task itself (client-only mode); the Redis backend is the cloud's.
"""

from __future__ import annotations

import bisect
import contextvars
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._codec import decode, encode
from ._config import Limits
from .exceptions import CodecError

MAX_STATE_BYTES = 64 * 1024  # one device's encoded state (ServerConfig.state_max_bytes)
MAX_INDEXES = 16  # fleet indexes a pipeline may mark
MAX_PUBLISHED = 8  # published names per device
MAX_PUBLISHED_VALUE = 1024 * 1024  # bytes of one published value
MAX_PUBLISHED_BYTES = 32 * 1024 * 1024  # published values in one process (MemoryState)
_STATE_LIMITS = Limits(max_message_bytes=1024 * 1024 * 1024)  # sizes are checked separately


@dataclass(frozen=True)
class Snapshot:
    """One device's state as stored: its version (0 = never written) and encoded dict."""

    version: int = 0
    data: bytes = b""


EMPTY = Snapshot()


@dataclass
class Changes:
    """What one item changes: a new device state (None: unchanged), marks, published values."""

    data: bytes | None = None
    marks: dict[str, float] = field(default_factory=dict)
    published: dict[str, bytes] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.data is not None or bool(self.marks) or bool(self.published)


class Fleet(Protocol):
    """The fleet-wide indexes as a backend sees them."""

    def count(self, index: str, low: float, high: float, device_id: str, own: float | None) -> int:
        """Devices whose score in ``index`` is in ``[low, high]``, with ``device_id``'s score
        taken as at least ``own`` (its mark from the item being run)."""
        ...


def encode_state(value: dict[str, Any], limit: int) -> bytes:
    """A device dict as stored; ``CodecError`` naming the limit if it is over ``limit`` bytes.

    Numeric lists packed: a trail of points costs a tenth to store and load, every item (every
    server that reads a state reads packed lists; the state arrived with them)."""
    data = encode(value, _STATE_LIMITS, packed=True).SerializeToString()
    if len(data) > limit:
        raise CodecError(
            f"the device state is {len(data)} bytes encoded, more than the server's "
            f"--state-max-bytes {limit}: keep less per device (a bounded deque, not a list)"
        )
    return data


def decode_state(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    from .v1 import offload_pb2 as pb  # noqa: PLC0415  (the stubs load with the package)

    value = decode(pb.Value.FromString(data), _STATE_LIMITS)
    if not isinstance(value, dict):
        raise CodecError(f"the stored device state is a {type(value).__name__}, not a dict")
    return value


class State:
    """The state the last task reads and changes for one item (see the module's docstring)."""

    def __init__(self, device_id: str, load: Callable[[], Snapshot], fleet: Fleet) -> None:
        self.device_id = device_id
        self._load = load
        self._fleet = fleet
        self._snapshot: Snapshot | None = None
        self._device: dict[str, Any] | None = None
        self._marks: dict[str, float] = {}
        self._published: dict[str, bytes] = {}

    @property
    def device(self) -> dict[str, Any]:
        """This device's state: change it in place (read on first use)."""
        if self._device is None:
            self._snapshot = self._load()
            self._device = decode_state(self._snapshot.data)
        return self._device

    @property
    def version(self) -> int | None:
        """The version of the device state read (None: the task did not read it)."""
        return None if self._snapshot is None else self._snapshot.version

    def mark(self, index: str, score: float) -> None:
        """Set this device's score in the fleet-wide ``index`` (the highest marked is kept)."""
        if not math.isfinite(score):
            raise ValueError(f"mark({index!r}, {score}): the score must be a finite number")
        if index not in self._marks and len(self._marks) >= MAX_INDEXES:
            raise ValueError(f"mark({index!r}): a pipeline marks at most {MAX_INDEXES} indexes")
        self._marks[index] = max(self._marks.get(index, -math.inf), float(score))

    def count(self, index: str, low: float, high: float) -> int:
        """How many devices have a score in ``[low, high]`` in ``index``, this one included."""
        return self._fleet.count(index, low, high, self.device_id, self._marks.get(index))

    def publish(self, name: str, value: bytes) -> None:
        """Keep ``value`` as this device's latest ``name`` for viewers (not read by tasks)."""
        if name not in self._published and len(self._published) >= MAX_PUBLISHED:
            raise ValueError(f"publish({name!r}): at most {MAX_PUBLISHED} names per device")
        if len(value) > MAX_PUBLISHED_VALUE:
            raise ValueError(
                f"publish({name!r}): {len(value)} bytes, more than {MAX_PUBLISHED_VALUE} per value"
            )
        self._published[name] = bytes(value)

    def changes(self, limit: int = MAX_STATE_BYTES) -> Changes:
        """What to commit; raises ``CodecError`` for a state that cannot be stored."""
        data = None
        if self._device is not None:
            data = encode_state(self._device, limit)
            if self._snapshot is not None and data == self._snapshot.data:
                data = None  # read, unchanged: only the version is checked
        return Changes(data, dict(self._marks), dict(self._published))

    @property
    def used(self) -> bool:
        return self._device is not None or bool(self._marks) or bool(self._published)


_current: contextvars.ContextVar[State | None] = contextvars.ContextVar(
    "offload_state", default=None
)


def current_state() -> State:
    """The state of the item the calling task is processing (only for the pipeline's last task)."""
    state = _current.get()
    if state is None:
        raise RuntimeError(
            "current_state() is only available to the last task of a pipeline, run by offload "
            "(tests: offload.testing.run_with_state)"
        )
    return state


@contextmanager
def using(state: State | None) -> Iterator[None]:
    token = _current.set(state)
    try:
        yield
    finally:
        _current.reset(token)


def active() -> State | None:
    return _current.get()


class ScoreIndex:
    """Each device's score, and the scores sorted: a count in a range costs O(log devices)."""

    def __init__(self, scores: dict[str, float] | None = None) -> None:
        self.scores: dict[str, float] = dict(scores or {})
        self._sorted = sorted(self.scores.values())

    def raise_to(self, device_id: str, score: float) -> None:
        """Keep the higher of the device's score and ``score``."""
        old = self.scores.get(device_id)
        if old is not None:
            if old >= score:
                return
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self.scores[device_id] = score
        bisect.insort(self._sorted, score)

    def remove(self, device_id: str) -> None:
        old = self.scores.pop(device_id, None)
        if old is not None:
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def count(self, low: float, high: float, device_id: str, own: float | None) -> int:
        """Scores in ``[low, high]``, with ``device_id``'s taken as at least ``own``."""
        total = bisect.bisect_right(self._sorted, high) - bisect.bisect_left(self._sorted, low)
        old = self.scores.get(device_id)
        mine = old if own is None or (old is not None and old >= own) else own
        if old is not None and low <= old <= high:
            total -= 1
        if mine is not None and low <= mine <= high:
            total += 1
        return total


class MemoryState:
    """The in-memory backend: device states, fleet indexes and published values in this process.

    Bounded: ``max_devices`` devices (the least recently committed is forgotten first, with its
    marks and published values), each state at most ``max_state_bytes`` (checked on commit),
    published values at most ``max_published_bytes`` in all (the least recently committed
    devices' go first).
    """

    def __init__(
        self,
        max_devices: int = 10_000,
        max_state_bytes: int = MAX_STATE_BYTES,
        max_published_bytes: int = MAX_PUBLISHED_BYTES,
    ) -> None:
        self.max_devices = max_devices
        self.max_state_bytes = max_state_bytes
        self.max_published_bytes = max_published_bytes
        self._published_bytes = 0
        self._lock = threading.Lock()
        self._states: OrderedDict[str, Snapshot] = OrderedDict()
        self._indexes: dict[str, ScoreIndex] = {}
        self._published: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def snapshot(self, device_id: str) -> Snapshot:
        with self._lock:
            return self._states.get(device_id, EMPTY)

    def state(self, device_id: str) -> State:
        return State(device_id, lambda: self.snapshot(device_id), self)

    def count(self, index: str, low: float, high: float, device_id: str, own: float | None) -> int:
        with self._lock:
            scores = self._indexes.get(index)
            total = 0 if scores is None else scores.count(low, high, device_id, own)
            if scores is None and own is not None and low <= own <= high:
                total = 1
            if device_id not in self._states and len(self._states) >= self.max_devices:
                # Committing this item will forget the least recently seen device: not counted.
                oldest = next(iter(self._states))
                score = None if scores is None else scores.scores.get(oldest)
                if score is not None and low <= score <= high:
                    total -= 1
            return total

    def apply(self, device_id: str, version: int | None, changes: Changes) -> bool:
        """Commit ``changes`` if the device's state is still at ``version`` (None: not read);
        False, changing nothing, if another item committed first."""
        with self._lock:
            current = self._states.get(device_id, EMPTY)
            if version is not None and current.version != version:
                return False
            if changes.data is not None:
                current = Snapshot(current.version + 1, changes.data)
            elif version is None and not changes:
                return True
            self._states[device_id] = current
            self._states.move_to_end(device_id)
            for index, score in changes.marks.items():
                self._indexes.setdefault(index, ScoreIndex()).raise_to(device_id, score)
            if changes.published:
                mine = self._published.setdefault(device_id, {})
                self._published.move_to_end(device_id)
                for name, value in changes.published.items():
                    self._published_bytes += len(value) - len(mine.get(name, b""))
                    mine[name] = value
            while len(self._states) > self.max_devices:
                self._forget(next(iter(self._states)))
            while self._published_bytes > self.max_published_bytes and self._published:
                self._unpublish(next(iter(self._published)))  # the least recently published
            return True

    def _unpublish(self, device_id: str) -> None:  # holds the lock
        values = self._published.pop(device_id, {})
        self._published_bytes -= sum(len(v) for v in values.values())

    def _forget(self, device_id: str) -> None:  # holds the lock
        self._states.pop(device_id, None)
        self._unpublish(device_id)
        for scores in self._indexes.values():
            scores.remove(device_id)

    def published(self, device_id: str, name: str) -> bytes | None:
        with self._lock:
            return self._published.get(device_id, {}).get(name)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._indexes.clear()
            self._published.clear()
            self._published_bytes = 0


# The process's own store: client-only runs, the device's fallback and a server without --state.
LOCAL = MemoryState()


def run_locally(device_id: str, call: Callable[[], Any], ok: Callable[[Any], bool]) -> Any:
    """Run the last task on ``LOCAL`` and commit its changes if ``ok(returned)``; a task that
    lost a race with another thread of this process on the same device runs again."""
    while True:
        state = LOCAL.state(device_id)
        with using(state):
            returned = call()
        if not state.used or not ok(returned):
            return returned
        if LOCAL.apply(device_id, state.version, state.changes(LOCAL.max_state_bytes)):
            return returned
