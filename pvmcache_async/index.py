"""The persistent cache index: one sqlite database per volume group.

It records every cache disk the cache created, with the full image id (disk names hold only a
prefix of it), size, digest, times and state. A disk the index does not know was not created
by the cache: it is never a hit and never removed. The methods are blocking and short; the
core calls them through ``asyncio.to_thread``. One connection, serialised by a lock, serves all
threads of a process; sqlite's own locking (WAL, busy timeout) serialises processes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import InsufficientSpace, StorageError
from .models import CacheEntry, EntryState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id    TEXT PRIMARY KEY,
    cache_disk  TEXT NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    digest_algo TEXT NOT NULL,
    digest      TEXT NOT NULL,
    created     REAL NOT NULL,
    last_used   REAL NOT NULL,
    state       TEXT NOT NULL
)
"""
_COLUMNS = "image_id, cache_disk, size, digest_algo, digest, created, last_used, state"


def _entry(row: tuple[str, str, int, str, str, float, float, str]) -> CacheEntry:
    return CacheEntry(*row[:7], state=EntryState(row[7]))


def _index_error(path: Path, exc: sqlite3.Error) -> StorageError:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return InsufficientSpace(f"cache index {path}: no space left in the volume group")
    return StorageError(f"cache index {path}: {exc}")


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _index_error(path, exc) from exc
        with self._using():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """One thread at a time; sqlite's errors become the cache's own."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise _index_error(self.path, exc) from exc

    def get(self, image_id: str) -> CacheEntry | None:
        with self._using():
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM images WHERE image_id = ?", (image_id,)
            ).fetchone()
        return _entry(row) if row else None

    def entries(self) -> list[CacheEntry]:
        with self._using():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images ORDER BY image_id").fetchall()
        return [_entry(r) for r in rows]

    def reserve(self, entry: CacheEntry) -> bool:
        """Insert a new entry; False when its cache disk name belongs to another image."""
        with self._using():
            try:
                self._db.execute(
                    f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.image_id,
                        entry.cache_disk,
                        entry.size,
                        entry.digest_algo,
                        entry.digest,
                        entry.created,
                        entry.last_used,
                        entry.state.value,
                    ),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def mark_ready(self, image_id: str, when: float) -> None:
        with self._using():
            self._db.execute(
                "UPDATE images SET state = ?, created = ?, last_used = ? WHERE image_id = ?",
                (EntryState.READY.value, when, when, image_id),
            )

    def touch(self, image_id: str, when: float) -> None:
        with self._using():
            self._db.execute(
                "UPDATE images SET last_used = max(last_used, ?) WHERE image_id = ?",
                (when, image_id),
            )

    def delete(self, image_id: str) -> None:
        with self._using():
            self._db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))

    def close(self) -> None:
        with self._using():
            self._db.close()
