"""Emulation, so that a development machine can stand in for a Raspberry Pi on Wi-Fi.

* A slow device: ``SlowDevice(X)``, given to ``run_tasks``, makes local tasks take X times the
  CPU time they use here, by sleeping the difference. It sleeps, so the machine's CPU stays free
  for the server.
* A slow link: ``LinkEmulator`` is a TCP proxy on loopback between the client and the server
  that shapes each direction to a bandwidth (token bucket) and adds half the round-trip time of
  delay. It shapes the real byte stream, so gRPC's flow control and TCP back-pressure behave as
  they would on the real link, and whatever the client measures, it measures for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass

from ..exceptions import ConfigError

_RATE_UNITS = {  # tc's conventions: "bit" units are bits, "bps" units are bytes per second
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
}  # fmt: skip
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_CHUNK = 64 * 1024  # bytes shaped at a time: few enough wake-ups for a Python proxy
_BURST = 0.005  # seconds of transmission the link may catch up on after a late wake-up
# Owed sleep is paid in chunks of what _WORK_PER_SLEEP seconds of work owe, within these bounds.
_WORK_PER_SLEEP = 0.0005
_MIN_SLEEP, _MAX_SLEEP = 0.002, 0.05


class SlowDevice:
    """A device whose CPU is ``factor`` times slower than this machine's, for the tasks it runs.

    A task takes ``factor`` times the CPU time its thread spent on it: time the machine gave to
    other processes or threads (a loaded machine, the GIL) is no work of the device's, and
    stretched it would make the device as slow as the load times the factor. The sleep owed is
    kept and paid between items, once it reaches a chunk (what half a millisecond of work owes,
    2-50 ms), less the time actually slept: a sleep after every short task overshot many times
    over (a loaded machine wakes a sleeper a scheduler tick late, and code after a wake-up runs
    slower on cold caches). The debt is per thread: each thread is its own line of work on the
    emulated device.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._chunk = min(max((factor - 1.0) * _WORK_PER_SLEEP, _MIN_SLEEP), _MAX_SLEEP)
        self._owed = threading.local()

    def clock(self) -> float:
        """The calling thread's CPU time, to pass to ``stretch`` when its task ends."""
        return time.thread_time() if self.factor > 1.0 else 0.0

    def stretch(self, seconds: float, clock: float) -> float:
        """Owe the sleep that makes a task that took ``seconds`` (since ``clock()`` returned
        ``clock``) last ``factor`` times its CPU time; return the task's emulated duration."""
        if self.factor <= 1.0:
            return seconds
        emulated = max(seconds, (time.thread_time() - clock) * self.factor)
        self._owed.debt = getattr(self._owed, "debt", 0.0) + emulated - seconds
        return emulated

    def pay(self, everything: bool = False) -> None:
        """Sleep off this thread's debt if it is a chunk or more (or any of it: ``everything``)."""
        debt = getattr(self._owed, "debt", 0.0)
        if debt > (0.0 if everything else self._chunk):
            began = time.perf_counter()
            time.sleep(debt)
            # Oversleeping is credit, up to _MAX_SLEEP: a machine that stalled for seconds owes
            # the device no burst at full speed.
            self._owed.debt = max(debt - (time.perf_counter() - began), -_MAX_SLEEP)


@dataclass(frozen=True)
class LinkSpec:
    """A link: bandwidth in bytes per second each way, and round-trip time in seconds."""

    bytes_per_second: float
    rtt_seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``RATE[,RTT]``, e.g. ``20mbit,30ms`` or ``500kbit`` (units as in Linux ``tc``)."""
        rate_text, _, rtt_text = text.strip().lower().partition(",")
        rate = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]+)", rate_text.strip())
        if not rate or rate.group(2) not in _RATE_UNITS or float(rate.group(1)) <= 0:
            raise ConfigError(
                f"--emulate-link {text!r}: the rate must be a positive number with a unit "
                f"({', '.join(_RATE_UNITS)}), e.g. 20mbit,30ms"
            )
        rtt = 0.0
        if rtt_text:
            match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(us|ms|s)", rtt_text.strip())
            if not match:
                raise ConfigError(
                    f"--emulate-link {text!r}: the round-trip time must be a number with a unit "
                    "(us, ms, s), e.g. 20mbit,30ms"
                )
            rtt = float(match.group(1)) * _TIME_UNITS[match.group(2)]
        return cls(float(rate.group(1)) * _RATE_UNITS[rate.group(2)], rtt)

    def __str__(self) -> str:
        return f"{self.bytes_per_second * 8 / 1e6:g}mbit,{self.rtt_seconds * 1e3:g}ms"


class LinkEmulator:
    """A shaping TCP proxy: connect to ``target`` (``127.0.0.1:port``) instead of ``upstream``."""

    def __init__(self, upstream: str, link: LinkSpec) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host.strip("[]") or "127.0.0.1", int(port))
        self.link = link
        self._loop = asyncio.new_event_loop()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offload-link", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self._listener)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer),
                self._pump(server_reader, client_writer),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # Closing the emulator cancels its connections: end quietly, as a cut cable would
            # (asyncio's server would otherwise log every cancelled connection as an error).
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry one direction: serialise at the link rate, deliver half an RTT later.

        The next chunk is read only once this one has been "transmitted", so a full link pushes
        back through TCP to the sender, as a real bottleneck does.
        """
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        delivery = asyncio.ensure_future(_deliver(in_flight, writer))
        one_way = self.link.rtt_seconds / 2
        free_at = loop.time()
        try:
            while data := await reader.read(_CHUNK):
                # A bucket of _BURST seconds: the event loop wakes us late by a millisecond or
                # so, and without credit for that the link would run slower than its rate.
                free_at = (
                    max(loop.time() - _BURST, free_at) + len(data) / self.link.bytes_per_second
                )
                await asyncio.sleep(free_at - loop.time())
                in_flight.put_nowait((free_at + one_way, data))
        except (ConnectionError, OSError):
            pass
        in_flight.put_nowait((free_at + one_way, b""))  # end of stream, after everything else
        await delivery

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self._loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                done.result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()


async def _deliver(
    in_flight: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
) -> None:
    """Write chunks, in order, once their propagation delay has passed; b"" ends the stream."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            due, data = await in_flight.get()
            await asyncio.sleep(due - loop.time())
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        writer.close()
