"""The Redis store (``--state redis://HOST:PORT/DB``): replicas share device state and answers.

Every item commits in one round trip: a Lua script, run atomically by Redis, that

1. replays the item's answer if it was given before (on any replica) and stops there;
2. checks the device state's version against the one the task read (compare-and-set: a replica
   that lost the race gets the current state back and runs the last task again);
3. writes the new state, the answer and the run's high-water mark together, and expires them.

A replica killed before its commit leaves nothing behind; the device's resend is computed once.
The keys of one device share the hash tag ``{pipeline/device}``, so that the script touches one
Redis Cluster slot; the fleet indexes (``mark``) are sorted sets of their own, updated in the
same round trip (pipelined, not atomically: a mark is a per-device maximum, so repeating it or
keeping the mark of a computation that lost its race changes nothing that matters), and read by
``count`` from a copy each replica refreshes every ``FLEET_REFRESH`` seconds.

Bounds: a device's state is at most ``state_max_bytes``; each run keeps its last
``state_answers`` answers, at most ``RUN_ANSWER_BYTES`` of them; a device keeps at most
``MAX_RUNS`` runs; every key of a device expires ``state_ttl`` seconds after its last item; a
fleet index keeps ``MAX_FLEET`` devices.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._config import ServerConfig
from .._logging import quote
from .._state import Changes, ScoreIndex, Snapshot, State
from .state import Outcome, StoreUnavailable, Verdict

log = logging.getLogger("offload.server")

RUN_ANSWER_BYTES = 4 * 1024 * 1024  # answers kept per device run, serialised (newest always)
MAX_RUNS = 4  # runs of one device whose answers are kept (a rebooted device may resend its last)
MAX_FLEET = 10_000  # devices per fleet index; the lowest scores are dropped first
FLEET_REFRESH = 1.0  # seconds between a replica's reads of the fleet indexes it counts
HEALTH_INTERVAL = 1.0  # seconds between pings while the store is unreachable
CACHE_BYTES = 64 * 1024 * 1024  # device states a replica keeps to skip the read before a commit

# KEYS: 1 state, 2 this run's answers, 3 the device's runs, 4 published values.
# ARGV: 1 item, 2 answer, 3 version read ('' = not read), 4 has new state ('1'/'0'), 5 new state,
# 6 ttl ms, 7 answers kept per run, 8 runs kept, 9 run id, 10 now (ms), 11 answers' key prefix,
# 12 bytes of answers kept per run, then name, value pairs to publish.
COMMIT = """
local item = tonumber(ARGV[1])
local given = redis.call('HGET', KEYS[2], ARGV[1])
if given then return {'replay', given} end
local high = tonumber(redis.call('HGET', KEYS[2], 'h') or '-1')
if item <= high then return {'forgotten', tostring(high)} end
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= version then
  return {'stale', tostring(version), redis.call('HGET', KEYS[1], 'd') or ''}
end
if ARGV[4] == '1' then
  version = version + 1
  redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
-- The run's answers: the last ARGV[7] items, within ARGV[12] bytes (the newest always kept).
local keep, budget = tonumber(ARGV[7]), tonumber(ARGV[12])
local size = tonumber(redis.call('HGET', KEYS[2], 'b') or '0') + #ARGV[2]
local oldest = tonumber(redis.call('HGET', KEYS[2], 'o') or ARGV[1])
if item - oldest > 2 * keep then  -- a jump (items run on the device): at most keep + 4 fields
  for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
    local n = tonumber(f)
    if n and n < item - keep then
      size = size - redis.call('HSTRLEN', KEYS[2], f)
      redis.call('HDEL', KEYS[2], f)
    end
  end
  oldest = item - keep
end
while oldest < item and (oldest <= item - keep or size > budget) do
  local f = string.format('%.0f', oldest)
  size = size - redis.call('HSTRLEN', KEYS[2], f)
  redis.call('HDEL', KEYS[2], f)
  oldest = oldest + 1
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], 'h', ARGV[1], 'b', size, 'o', oldest)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[10], ARGV[9])
local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[8])
if extra > 0 then
  -- the oldest runs' answers: keys of this device's hash tag, so of this slot
  for _, run in ipairs(redis.call('ZRANGE', KEYS[3], 0, extra - 1)) do
    redis.call('DEL', ARGV[11] .. run)
    redis.call('ZREM', KEYS[3], run)
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
if #ARGV > 12 then
  for i = 13, #ARGV, 2 do redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
return {'committed', tostring(version)}
"""


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore:
    """Device state, fleet indexes, published values and answers in Redis; thread-safe."""

    remembers_answers = True

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = describe(config.state)
        self.prefix = f"offload:{config.pipeline}"
        kwargs: dict[str, Any] = {
            "socket_timeout": config.state_timeout,
            "socket_connect_timeout": config.state_timeout,
            # One retry on a fresh connection (a pooled one broken by a Redis restart); the
            # script is safe to run twice: the second run replays the first's answer.
            "retry": Retry(NoBackoff(), 1),
            "health_check_interval": 0,
        }
        if config.state_password is not None:
            kwargs["password"] = config.state_password
        if config.state.startswith("rediss://") and config.state_tls_ca is not None:
            kwargs["ssl_ca_certs"] = config.state_tls_ca
        self.redis: redis.Redis = redis.Redis.from_url(config.state, **kwargs)
        self._commit = self.redis.register_script(COMMIT)
        self._ttl_ms = int(config.state_ttl * 1000)
        self._cache: OrderedDict[str, Snapshot] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._fleet: dict[str, tuple[float, ScoreIndex]] = {}  # index: (read at, scores)
        self._fleet_lock = threading.Lock()
        self._kept: dict[str, float] = {}  # index: when this replica last trimmed it
        self._reachable = True
        self._listeners: list[Callable[[bool], None]] = []
        self._error_listeners: list[Callable[[str], None]] = []
        self._closed = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="offload-state", daemon=True)
        self._monitor.start()

    # --- keys ----------------------------------------------------------------------------------

    def _device_keys(self, device_id: str, run_id: str) -> tuple[list[str], str]:
        tag = f"{self.prefix}:{{{self.config.pipeline}/{device_id}}}"
        answers = f"{tag}:answers:"
        return [f"{tag}:state", answers + run_id, f"{tag}:runs", f"{tag}:published"], answers

    def _fleet_key(self, index: str) -> str:
        return f"{self.prefix}:fleet:{index}"

    # --- reachability --------------------------------------------------------------------------

    def add_health_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def add_error_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(kind)`` for each failed call: "unreachable" or "slow" (metrics)."""
        self._error_listeners.append(listener)

    def _set_reachable(self, reachable: bool, reason: str = "") -> None:
        with self._lock:
            changed = reachable != self._reachable
            self._reachable = reachable
        if not changed:
            return
        if reachable:
            log.info("event=state-reachable store=%s", quote(self.name))
        else:
            log.warning(
                "event=state-unreachable store=%s reason=%s", quote(self.name), quote(reason)
            )
        for listener in self._listeners:
            listener(reachable)

    @property
    def reachable(self) -> bool:
        return self._reachable

    def _watch(self) -> None:
        """Ping the store at start and every HEALTH_INTERVAL: health follows the answers."""
        while True:
            try:
                self.redis.ping()
            except RedisError as exc:
                self._set_reachable(False, _reason(exc))
            else:
                self._set_reachable(True)
            if self._closed.wait(HEALTH_INTERVAL):
                return

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            kind = "slow" if isinstance(exc, RedisTimeoutError) else "unreachable"
            for listener in self._error_listeners:
                listener(kind)
            self._set_reachable(False, _reason(exc))
            raise StoreUnavailable(
                f"the state store {self.name} is {kind} ({what}: {_reason(exc)}); the item was "
                "not run: resend it (the device keeps it) once the store answers"
            ) from None
        except RedisError as exc:  # a refused command: authentication, a read-only replica
            for listener in self._error_listeners:
                listener("refused")
            raise StoreUnavailable(
                f"the state store {self.name} refused {what}: {_reason(exc)} (check "
                "--state, --state-password and that the server is a writable primary)"
            ) from None

    # --- device state --------------------------------------------------------------------------

    def _cached(self, device_id: str) -> Snapshot | None:
        with self._lock:
            snapshot = self._cache.get(device_id)
            if snapshot is not None:
                self._cache.move_to_end(device_id)
            return snapshot

    def _remember(self, device_id: str, snapshot: Snapshot) -> None:
        with self._lock:
            old = self._cache.pop(device_id, None)
            if old is not None:
                self._cache_bytes -= len(old.data)
            self._cache[device_id] = snapshot
            self._cache_bytes += len(snapshot.data)
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1].data)

    def _load(self, device_id: str) -> Snapshot:
        cached = self._cached(device_id)
        if cached is not None:
            return cached
        key = self._device_keys(device_id, "")[0][0]
        version, data = self._call(
            "reading the device state", lambda: self.redis.hmget(key, "v", "d")
        )
        snapshot = Snapshot(int(version or 0), bytes(data or b""))
        self._remember(device_id, snapshot)
        return snapshot

    def state(self, device_id: str) -> State:
        return State(device_id, lambda: self._load(device_id), self)

    def commit(
        self,
        device_id: str,
        run_id: str,
        item: int,
        state: State | None,
        changes: Changes,
        answer: bytes,
    ) -> Outcome:
        keys, answers_prefix = self._device_keys(device_id, run_id)
        version = state.version if state is not None else None
        args: list[Any] = [
            item,
            answer,
            "" if version is None else version,
            "0" if changes.data is None else "1",
            changes.data or b"",
            self._ttl_ms,
            self.config.state_answers,
            MAX_RUNS,
            run_id,
            int(time.time() * 1000),
            answers_prefix,
            RUN_ANSWER_BYTES,
        ]
        for name, value in changes.published.items():
            args += [name, value]

        def run() -> Any:
            pipe = self.redis.pipeline(transaction=False)
            self._commit(keys=keys, args=args, client=pipe)
            for index, score in changes.marks.items():
                fleet = self._fleet_key(index)
                pipe.zadd(fleet, {device_id: score}, gt=True)
                if self._due(index):  # the cap and the expiry need renewing once a second
                    pipe.zremrangebyrank(fleet, 0, -(MAX_FLEET + 1))
                    pipe.pexpire(fleet, self._ttl_ms)
            return pipe.execute()[0]

        reply = self._call("committing the item", run)
        verdict = Verdict(reply[0].decode())
        if verdict is Verdict.REPLAY:
            return Outcome(verdict, bytes(reply[1]))
        if verdict is Verdict.STALE:
            self._remember(device_id, Snapshot(int(reply[1]), bytes(reply[2])))
        elif verdict is Verdict.COMMITTED and state is not None and state.version is not None:
            data = changes.data
            if data is None:
                current = self._cached(device_id)
                data = current.data if current is not None else b""
            self._remember(device_id, Snapshot(int(reply[1]), data))
        return Outcome(verdict)

    # --- fleet indexes -------------------------------------------------------------------------

    def _due(self, index: str) -> bool:
        """Whether this replica should trim and renew ``index`` now (at most once a second)."""
        now = time.monotonic()
        with self._fleet_lock:
            if now - self._kept.get(index, -math.inf) < FLEET_REFRESH:
                return False
            self._kept[index] = now
            return True

    def _scores(self, index: str) -> ScoreIndex:
        now = time.monotonic()
        with self._fleet_lock:
            read = self._fleet.get(index)
            if read is not None and now - read[0] < FLEET_REFRESH:
                return read[1]
            if read is None and len(self._fleet) >= 64:
                raise ValueError(f"count({index!r}): too many fleet indexes")
        pairs = self._call(
            "reading a fleet index",
            lambda: self.redis.zrange(self._fleet_key(index), 0, -1, withscores=True),
        )
        scores = ScoreIndex({bytes(d).decode(errors="replace"): float(s) for d, s in pairs})
        with self._fleet_lock:
            self._fleet[index] = (now, scores)
        return scores

    def count(self, index: str, low: float, high: float, device_id: str, own: float | None) -> int:
        return self._scores(index).count(low, high, device_id, own)

    def published(self, device_id: str, name: str) -> bytes | None:
        key = self._device_keys(device_id, "")[0][3]
        value = self._call("reading a published value", lambda: self.redis.hget(key, name))
        return None if value is None else bytes(value)

    def close(self) -> None:
        self._closed.set()
        # A ping in flight would read a socket closed under it: it ends within the timeout.
        self._monitor.join(2 * self.config.state_timeout + 1)
        self.redis.close()


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
