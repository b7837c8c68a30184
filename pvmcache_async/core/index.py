"""The persistent cache index: one sqlite database per volume group.

It records every cache disk the cache created, with the full image id (disk names hold only a
prefix of it), size, digest, times and state. A disk the index does not know was not created
by the cache: it is never a hit and never removed. The methods are blocking and short; the
core reaches them only through ``catalog.Catalog``, which runs them on a thread and decides
what a row is worth. One connection, serialised by a lock, serves all threads of a process;
sqlite's own locking (WAL, busy timeout) serialises processes.

Rows as read: sqlite is dynamically typed, so an operator's ``UPDATE`` can store any value of
any type in any column. Each row read is range-checked (``_parse``): one out of range or of
the wrong type comes back as a ``BadRow``, never as an entry; a time ahead of the clock is
read as the time of reading (``CacheEntry.clock_ahead``), and a touch sets it right.

State that can be lost: the index is a cache of what the disks themselves record
(``DiskIdentity``). An index that is missing, emptied or unreadable is set aside
(``index.sqlite.corrupt-<time>``, then ``...-<time>.1``: a copy is never replaced) and made
anew, and ``needs_rebuild`` stays True until the cache has re-entered its disks from the VG
(``ImageCache``, at its first call).

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
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pvmcache_async.core.statefiles import read_only
from pvmcache_async.errors import InsufficientSpace, InvalidInput, ReadOnly, StorageError, shown
from pvmcache_async.glance.records import MAX_IMAGE_SIZE
from pvmcache_async.models import CacheEntry, EntryState
from pvmcache_async.names import validate_image_id

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


_LONGEST_TEXT = 256  # of a disk name, a digest algorithm or a hex digest in a row


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row of the index with a value out of range or of the wrong type: never an entry."""

    image_id: str | None  # the row's image id, when that much is a canonical image uuid
    reason: str  # what is wrong with it, for the one warning


def _parse(row: tuple[object, ...], now: float) -> CacheEntry | BadRow:
    """The entry a row of the index records, range-checked; times ahead of ``now`` read as
    ``now`` (flagged ``clock_ahead``)."""
    image_id, cache_disk, size, digest_algo, digest, created, last_used, state = row
    try:
        canonical = validate_image_id(image_id)
    except InvalidInput:
        return BadRow(None, f"image id {shown(image_id)} is not an image uuid")
    if canonical != image_id:
        return BadRow(None, f"image id {shown(image_id)} is not in canonical form")
    for column, text in (("cache_disk", cache_disk), ("digest_algo", digest_algo),
                         ("digest", digest)):  # fmt: skip
        if not isinstance(text, str) or len(text) > _LONGEST_TEXT:
            return BadRow(canonical, f"{column} {shown(text)} is not a short text")
    assert isinstance(cache_disk, str) and isinstance(digest_algo, str) and isinstance(digest, str)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_IMAGE_SIZE:
        return BadRow(canonical, f"size {shown(size)} is not from 1 to {MAX_IMAGE_SIZE} bytes")
    times = []
    for column, value in (("created", created), ("last_used", last_used)):
        # a number, not negative, not NaN; +inf and 1e300 are merely ahead of the clock
        if not isinstance(value, int | float) or math.isnan(value) or value < 0:
            return BadRow(canonical, f"{column} {shown(value)} is not a unix time")
        times.append(float(value))
    if not isinstance(state, str) or state not in {s.value for s in EntryState}:
        return BadRow(canonical, f"state {shown(state)} is not one of filling, ready")
    ahead = any(t > now for t in times)
    return CacheEntry(
        canonical,
        cache_disk,
        size,
        digest_algo,
        digest,
        min(times[0], now),
        min(times[1], now),
        EntryState(state),
        clock_ahead=ahead,
    )


def _set_aside(path: Path) -> Path:
    """Move the index at ``path`` to a name of its own beside it; never replaces a file (two
    copies set aside in the same second get ``-<time>`` and ``-<time>.1``)."""
    stem = f"{path.name}.corrupt-{time.time():.0f}"
    for n in range(1000):
        aside = path.with_name(stem if n == 0 else f"{stem}.{n}")
        try:
            os.link(path, aside)  # fails rather than replace (a rename would replace)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this filesystem: rename to a name free just now
            if os.path.lexists(aside):
                continue
            os.rename(path, aside)
            return aside
        os.unlink(path)
        return aside
    raise OSError(f"{stem} and 999 more copies of it exist already")


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
    """The sqlite index of one VG's cache disks (see the module docstring).

    Blocking calls, each short, serialised within the process by one lock; sqlite serialises
    processes. Every row read comes back as a ``CacheEntry`` whose values were range-checked,
    or as a ``BadRow`` saying what was wrong; what a row is worth is ``Catalog``'s to say."""

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
            try:
                aside = _set_aside(path)
                log.warning("cache index %s is unreadable (%s); set aside as %s, rebuilding it "
                            "from the disks", path, exc, aside.name)  # fmt: skip
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

    def get(self, image_id: str) -> CacheEntry | BadRow | None:
        """The image's row (range-checked, see ``_parse``), or None when it has none."""
        with self._using():
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM images WHERE image_id = ?", (image_id,)
            ).fetchone()
        return _parse(row, time.time()) if row else None

    def entries(self) -> list[CacheEntry | BadRow]:
        """Every row, range-checked (see ``_parse``)."""
        with self._using():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images ORDER BY image_id").fetchall()
        now = time.time()
        return [_parse(r, now) for r in rows]

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
        """Record a use at ``when``: the later of it and the last use, unless the last use is
        ahead of the clock (or not a number), which ``when`` then replaces."""
        with self._using():
            self._db.execute(
                "UPDATE images SET last_used = CASE WHEN typeof(last_used) IN ('integer', 'real')"
                " AND last_used <= ? THEN max(last_used, ?) ELSE ? END WHERE image_id = ?",
                (time.time(), when, when, image_id),
            )

    def delete(self, image_id: str) -> None:
        with self._using():
            self._db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))

    def close(self) -> None:
        with self._using():
            self._db.close()
