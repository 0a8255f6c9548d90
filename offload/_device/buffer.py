"""The durable outage buffer (``--buffer-dir``): items held for the server, kept in SQLite so that
a device that dies or reboots during an outage resends them when it starts again.

Only items that wait for the server while it is away are written (as they are held, and when a
broken stream leaves them unanswered); while a stream is up nothing is, so the common case costs
no disk write. Each write is a transaction synced to disk (WAL, ``synchronous=FULL``): a power cut
loses no held item. A row is deleted when its item ends; an item a run abandons (a second Ctrl-C,
a fatal refusal) stays, for the next start to resend.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ConfigError

FILE_NAME = "held.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    run_id TEXT NOT NULL,
    item INTEGER NOT NULL,
    next_task INTEGER NOT NULL,
    data BLOB NOT NULL,  -- the encoded TaskState, as it is sent
    PRIMARY KEY (run_id, item)
) WITHOUT ROWID
"""


def check_folder(folder: str) -> None:
    """Refuse a ``--buffer-dir`` that cannot keep items, saying what to do."""
    if not Path(folder).is_dir():
        raise ConfigError(
            f"--buffer-dir {folder}: no such folder; create it (it keeps items held for the "
            "server across restarts)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--buffer-dir {folder}: not allowed to write there; give another folder")


@dataclass(frozen=True)
class Held:
    """An item of an earlier run found in the buffer at start."""

    run_id: str
    item: int
    next_task: int
    data: bytes


class DurableBuffer:
    """The held items of every run on this device, in ``folder``/held.sqlite3 (thread-safe)."""

    def __init__(self, folder: str) -> None:
        check_folder(folder)
        self.path = Path(folder) / FILE_NAME
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"--buffer-dir {folder}: cannot keep items there ({exc})") from None
        self._lock = threading.Lock()

    def put(self, run_id: str, item: int, next_task: int, data: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO held VALUES (?, ?, ?, ?)", (run_id, item, next_task, data)
            )

    def delete(self, run_id: str, item: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM held WHERE run_id = ? AND item = ?", (run_id, item))

    def earlier(self, run_id: str) -> dict[str, list[Held]]:
        """The items other runs left, by run, in item order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, item, next_task, data FROM held WHERE run_id != ? "
                "ORDER BY run_id, item",
                (run_id,),
            ).fetchall()
        runs: dict[str, list[Held]] = {}
        for run, item, next_task, data in rows:
            runs.setdefault(run, []).append(Held(run, item, next_task, bytes(data)))
        return runs

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM held").fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._db.close()
