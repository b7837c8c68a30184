"""The persistent cache index: one sqlite database per volume group.

It records every cache disk the cache created, with the full image id (disk names hold only a
prefix of it), size, digest, times and state. A disk the index does not know was not created
by the cache: it is never a hit and never removed. The methods are blocking and short; the
core calls them through ``asyncio.to_thread``. One connection, serialised by a lock, serves all
threads of a process; sqlite's own locking (WAL, busy timeout) serialises processes.

State that can be lost: the index is a cache of what the disks themselves record
(``DiskIdentity``). An index that is missing, emptied or unreadable is set aside
(``index.sqlite.corrupt-<time>``) and made anew, and ``needs_rebuild`` stays True until the
cache has re-entered its disks from the VG (``ImageCache``, at its first call).

A full volume group: a WAL database cannot even be read when its shared-memory file cannot be
made (SQLITE_IOERR_SHMSIZE on a full filesystem). Then the index is opened again in
exclusive locking mode, in which sqlite keeps that memory on the heap and needs no file: the
listing and pruning process then has the index to itself (others wait, up to the busy timeout)
until it closes. A write still needs room in the WAL, so the cache deletes disks first and
writes the index after; temporary tables stay in memory. (A rollback journal would need no
such fallback, but costs an fsync'd journal per write, far slower per touch: see
benchmarks/README.md.) The index file and its WAL are never opened through a symbolic link.

A read-only VG (mounted read-only, or not writable by this process): the index is opened
read-only, so listing works; without a shared-memory file (none left, none can be made) it is
read as it stands on disk (``immutable``). A write then fails as ``ReadOnly``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InsufficientSpace, ReadOnly, StorageError
from .models import CacheEntry, EntryState
from .statefiles import read_only

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
_REBUILT = 1  # PRAGMA user_version once the cache has re-entered its disks into this index
_UNREADABLE = {sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT}
log = logging.getLogger(__name__)


def _entry(row: tuple[str, str, int, str, str, float, float, str]) -> CacheEntry:
    return CacheEntry(*row[:7], state=EntryState(row[7]))


class _Unreadable(Exception):
    pass


def _full(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _index_error(path: Path, exc: sqlite3.Error) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        if read_only(path.parent):
            return ReadOnly(f"cache index {path}: the volume group is read-only ({exc})")
        if code & 0xFF == sqlite3.SQLITE_READONLY:
            return ReadOnly(f"cache index {path}: read-only ({exc})")
    # a full filesystem can also surface as an I/O error (e.g. making the journal)
    if code == sqlite3.SQLITE_FULL or (code is not None and code & 0xFF == 10 and _full(path)):
        return InsufficientSpace(
            f"cache index {path}: no space left in the volume group; "
            "remove cache disks first (prune deletes disks before it writes the index)"
        )
    return StorageError(f"cache index {path}: {exc}")


def _refuse_links(path: Path) -> None:
    """The index and its WAL are never opened through a symlink planted in their place."""
    for p in [path, *(path.with_name(path.name + x) for x in ("-journal", "-wal", "-shm"))]:
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise StorageError(f"cache index {p} is not a regular file (a symlink?); refusing it")


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.read_only = read_only(path.parent)  # opened read-only: lists work, writes fail
        _refuse_links(path)
        try:
            try:
                self._db = self._open()
            except sqlite3.OperationalError as exc:
                if self.read_only:  # no shared-memory file can be made: read the file alone
                    log.info("cache index %s: read-only, without shared memory (%s); read as "
                             "it stands on disk", path, exc)  # fmt: skip
                    self._db = self._open(immutable=True)
                    return
                if not _full(path):
                    raise
                log.info("cache index %s: the volume group is full (%s); opened for this "
                         "process alone", path, exc)  # fmt: skip
                self._db = self._open(alone=True)
        except (sqlite3.DatabaseError, _Unreadable) as exc:
            if not isinstance(exc, _Unreadable) and exc.sqlite_errorcode not in _UNREADABLE:
                raise _index_error(path, exc) from exc
            aside = path.with_name(f"{path.name}.corrupt-{time.time():.0f}")
            log.warning("cache index %s is unreadable (%s); set aside as %s, rebuilding it "
                        "from the disks", path, exc, aside.name)  # fmt: skip
            try:
                os.replace(path, aside)
                self._db = self._open()
            except (OSError, sqlite3.Error) as again:
                raise StorageError(f"cache index {path}: unreadable ({exc}); {again}") from again
        except sqlite3.Error as exc:
            raise _index_error(path, exc) from exc

    def _open(self, *, alone: bool = False, immutable: bool = False) -> sqlite3.Connection:
        where: str | Path = self.path
        if self.read_only:
            where = self.path.absolute().as_uri() + (
                "?mode=ro&immutable=1" if immutable else "?mode=ro"
            )
        db = sqlite3.connect(
            where, timeout=60.0, isolation_level=None, check_same_thread=False, uri=self.read_only
        )
        try:
            if alone:  # before the first access: then sqlite needs no shared-memory file
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA temp_store=MEMORY")
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                raise _Unreadable("its integrity check failed")
            db.execute(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """One thread at a time; sqlite's errors become the cache's own."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise _index_error(self.path, exc) from exc

    def needs_rebuild(self) -> bool:
        """Whether this index has not yet had the VG's disks re-entered (new or set aside)."""
        with self._using():
            return bool(self._db.execute("PRAGMA user_version").fetchone()[0] != _REBUILT)

    def rebuilt(self) -> None:
        with self._using():
            self._db.execute(f"PRAGMA user_version = {_REBUILT}")

    def adopt(self, entry: CacheEntry) -> bool:
        """Enter a ready disk found in the VG; False when the image or the name has an entry."""
        return self.insert(entry)

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

    def insert(self, entry: CacheEntry) -> bool:
        """Insert a new entry; False when the image or its cache disk name has one already."""
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
