"""The embedded store: one SQLite file in WAL mode.

WAL lets several server processes on one machine read while one writes; every write is one transaction
(atomic, durable across a crash of the process with `synchronous=NORMAL`); `busy_timeout` makes a writer
wait for another instead of failing. A file that exists but was not written by persrec is never touched.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from persrec.config import ConfigError
from persrec.serve.store import ExpertCacheStore, UserHistory, history_from_lists, user_key

FORMAT = "persrec-expert-store-1"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS persrec_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS histories (user TEXT PRIMARY KEY, items TEXT NOT NULL, timestamps TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS caches (user TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
    "covered INTEGER NOT NULL, data BLOB NOT NULL)",
)


class SQLiteStore(ExpertCacheStore):
    def __init__(self, path: Path, cache_dtype: str = "float32") -> None:
        super().__init__(cache_dtype)
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(
                f"--store {self.path}: is a directory; expected a SQLite file persrec may create"
            )
        if not self.path.parent.is_dir():
            raise ConfigError(f"--store {self.path}: the directory {self.path.parent} does not exist")
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            if existed:
                self._check_ours()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._transaction():
                for statement in SCHEMA:
                    self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO persrec_meta VALUES ('format', ?)", (FORMAT,))
        except sqlite3.DatabaseError as error:
            raise ConfigError(
                f"--store {self.path}: not a SQLite database persrec can use ({error})"
            ) from error
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; IMMEDIATE takes the write lock first, so a read-then-write is one step for
        every process sharing the file."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_ours(self) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = "persrec_meta" in tables and self._db.execute(
            "SELECT value FROM persrec_meta WHERE name = 'format'"
        ).fetchone() == (FORMAT,)
        if not ours:
            self._db.close()
            raise ConfigError(
                f"--store {self.path}: the file exists and is not a persrec expert-cache store; "
                "refusing to write into it (give a new path)"
            )

    def history(self, user: Any) -> UserHistory | None:
        with self._lock:
            row = self._db.execute(
                "SELECT items, timestamps FROM histories WHERE user = ?", (user_key(user),)
            ).fetchone()
        return None if row is None else history_from_lists(json.loads(row[0]), json.loads(row[1]))

    def append(self, user: Any, items: Sequence[Any], timestamps: Sequence[int] | None = None) -> int:
        key = user_key(user)
        times = list(timestamps) if timestamps is not None else [None] * len(items)
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT items, timestamps FROM histories WHERE user = ?", (key,)
            ).fetchone()
            old_items, old_times = (json.loads(row[0]), json.loads(row[1])) if row else ([], [])
            new_items, new_times = old_items + list(items), old_times + times
            self._db.execute(
                "INSERT OR REPLACE INTO histories VALUES (?, ?, ?)",
                (key, json.dumps(new_items), json.dumps(new_times)),
            )
        return len(new_items)

    def _get_cache(self, key: str) -> tuple[str, int, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, covered, data FROM caches WHERE user = ?", (key,)
            ).fetchone()
        return None if row is None else (row[0], int(row[1]), bytes(row[2]))

    def _put_cache(self, key: str, fingerprint: str, covered: int, data: bytes) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO caches VALUES (?, ?, ?, ?)", (key, fingerprint, covered, data)
            )

    def delete(self, user: Any) -> bool:
        key = user_key(user)
        with self._lock, self._transaction():
            removed = self._db.execute("DELETE FROM histories WHERE user = ?", (key,)).rowcount
            removed += self._db.execute("DELETE FROM caches WHERE user = ?", (key,)).rowcount
        return removed > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
