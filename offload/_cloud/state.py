"""The server's state store: device states, fleet indexes, published values and (Redis) the
remembered answers, behind one small interface the executor commits each item through.

``memory`` (the default) keeps device state in this process (``offload._state.MemoryState``) and
leaves the remembered answers to the executor; ``redis://`` / ``rediss://`` keeps everything in
Redis (``redis_state.py``), so that replicas share it. See ``docs/state.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .._config import ServerConfig
from .._extras import server_extra
from .._state import LOCAL, Changes, MemoryState, State
from ..exceptions import StateUnavailable as StoreUnavailable

__all__ = ["MemoryStore", "Outcome", "Store", "StoreUnavailable", "Verdict", "open_store"]


class Verdict(enum.Enum):
    COMMITTED = "committed"
    STALE = "stale"  # another item changed the device's state first: run the last task again
    REPLAY = "replay"  # the item was answered before (by this or another replica)
    FORGOTTEN = "forgotten"  # answered before, and the answer has expired


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    answer: bytes = b""  # REPLAY: the serialised ItemResult given before


class Store(Protocol):
    """Where the state of the last task lives; thread-safe."""

    name: str  # for messages and logs: "memory", "redis://host:6379/0"
    remembers_answers: bool  # False: the executor remembers them in its process

    @property
    def reachable(self) -> bool:
        """False from a failed call until the store answers again."""
        ...

    def state(self, device_id: str) -> State:
        """A fresh ``State`` for one item of ``device_id`` (reads lazily)."""
        ...

    def commit(
        self,
        device_id: str,
        run_id: str,
        item: int,
        state: State | None,
        changes: Changes,
        answer: bytes,
    ) -> Outcome:
        """Commit ``changes`` (if ``state`` is still current) with the item's answer, at once."""
        ...

    def published(self, device_id: str, name: str) -> bytes | None: ...

    def add_health_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(reachable)`` whenever the store becomes (un)reachable."""
        ...

    def add_error_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(kind)`` for each failed call: "unreachable", "slow" or "refused"."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """State in this process (``MemoryState``); the executor remembers the answers."""

    remembers_answers = False
    reachable = True

    def __init__(self, states: MemoryState = LOCAL) -> None:
        self.states = states
        self.name = "memory"

    def state(self, device_id: str) -> State:
        return self.states.state(device_id)

    def commit(
        self,
        device_id: str,
        run_id: str,
        item: int,
        state: State | None,
        changes: Changes,
        answer: bytes,
    ) -> Outcome:
        version = state.version if state is not None else None
        if self.states.apply(device_id, version, changes):
            return Outcome(Verdict.COMMITTED)
        return Outcome(Verdict.STALE)

    def published(self, device_id: str, name: str) -> bytes | None:
        return self.states.published(device_id, name)

    def add_health_listener(self, listener: Callable[[bool], None]) -> None:
        pass  # always reachable

    def add_error_listener(self, listener: Callable[[str], None]) -> None:
        pass  # never fails

    def close(self) -> None:
        pass


def open_store(config: ServerConfig) -> Store:
    """The store ``config.state`` names (the Redis one connects lazily, never fails here)."""
    if config.state == "memory":
        # The process's own store: in-process servers and seed-format globals behave alike.
        return MemoryStore(LOCAL)
    server_extra("redis", f"--state {config.state.partition('://')[0]}://")
    from .redis_state import RedisStore  # noqa: PLC0415  (redis-py only when asked for)

    return RedisStore(config)
