"""The cache's catalog: the index of one VG, and the one place that decides what a row is worth.

The index (``index.Index``, blocking sqlite calls) is reached only through ``Catalog``, which
runs each call on a thread. Every row is judged before anyone acts on it (``Trust``):

* ``READY``: a ready row naming one of its image's cache disk names, whose disk is there at
  the recorded size and records (``VolumeGroup.disk_identity``: xattrs or a label, read
  cheaply, never a re-hash) this image, size and digest, or records nothing (an older disk, a
  filesystem without user xattrs). Only such a row is ever served.
* ``FILLING``: a download is (or was, until a crash) writing the image.
* ``FOREIGN``: the row names a disk that is not its image's: not one of its cache disk names,
  or a disk recording another image. The row is dropped; the disk is neither served nor deleted.
* ``DAMAGED``: the image's own disk, but not what was recorded: gone, another size, another
  digest. Never served; recovery deletes it with its row.
* ``INVALID``: a value out of range or of the wrong type (``index.BadRow``). Never acted on
  but to drop the row.

Each row that is not to be trusted, and each time ahead of the clock (read as the time of
reading, ``CacheEntry.clock_ahead``), is one warning per process.

A disk enters the index from the VG (``adopt``: a lost index rebuilt, or the image's own disk
that a dropped row left behind) only when its name has the cache's shape, its recorded
identity names a valid image to which the cache would give that name, its size is the
recorded size, and its bytes hash to the recorded digest (``VolumeGroup.disk_digest``: the
price of trusting a disk again). A backend that records no digest (PowerVM: only the label,
set through its REST API, and no way to read a disk back) has its disks adopted on their
identity alone, with a log line saying so (docs/powervm.md).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pvmcache_async.core.index import BadRow, Index
from pvmcache_async.errors import InvalidInput, StorageError
from pvmcache_async.models import CacheEntry, EntryState
from pvmcache_async.names import is_cache_disk_name, is_cache_disk_name_of, validate_image_id
from pvmcache_async.storage import DiskIdentity, VolumeGroup

log = logging.getLogger(__name__)
T = TypeVar("T")


class Trust(enum.Enum):
    """What a row of the index is worth; see the module docstring."""

    READY = "ready"
    FILLING = "filling"
    FOREIGN = "foreign"
    DAMAGED = "damaged"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Judged:
    """One row of the index and what it is worth."""

    image_id: str | None  # None: a row whose image id is not even a canonical image uuid
    trust: Trust
    entry: CacheEntry | None  # None exactly when the row is INVALID


class Catalog:
    """The index of one VG, judged; the only way to the index, and the only thread crossing."""

    def __init__(self, vg: VolumeGroup, path: Path) -> None:
        self._vg = vg
        self._index = Index(path)
        self._warned: set[tuple[str | None, str]] = set()

    # -- rows, judged ---------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """Whether the index was opened read-only (a read-only VG): nothing can be cleared."""
        return self._index.read_only

    async def row(self, image_id: str) -> Judged | None:
        """The image's row judged by its values alone (no disk looked at); None: no row."""
        row = await self._call(self._index.get, image_id)
        return None if row is None else self._judge_row(row)

    async def rows(self) -> list[Judged]:
        """Every row, judged by its values alone (no disk looked at), by image id."""
        return [self._judge_row(row) for row in await self._call(self._index.entries)]

    async def check_disk(self, judged: Judged) -> Judged:
        """A ready or filling row judged against its disk: READY when the disk is the one
        recorded (a filling row too: published, then its writer died before recording it),
        else FOREIGN or DAMAGED. Any other row comes back as it is."""
        entry = judged.entry
        if entry is None or judged.trust not in (Trust.READY, Trust.FILLING):
            return judged
        size = await self._vg.disk_size(entry.cache_disk)
        identity = None if size is None else await self._vg.disk_identity(entry.cache_disk)
        if identity is not None and identity.image_id != entry.image_id:
            self._warn(
                entry.image_id,
                f"disk {entry.cache_disk} records image {identity.image_id}, but the index "
                f"entry is image {entry.image_id}'s; never served: dropping the entry, "
                "leaving the disk alone",
            )
            return Judged(entry.image_id, Trust.FOREIGN, entry)
        if size != entry.size or (identity is not None and not _agrees(identity, entry)):
            return Judged(entry.image_id, Trust.DAMAGED, entry)
        return Judged(entry.image_id, Trust.READY, entry)

    async def ready(self, image_id: str) -> CacheEntry | None:
        """The image's entry if it is READY (judged against its disk), else None: what a hit
        may serve."""
        judged = await self.row(image_id)
        if judged is None or judged.trust is not Trust.READY:
            return None
        judged = await self.check_disk(judged)
        return judged.entry if judged.trust is Trust.READY else None

    # -- writing --------------------------------------------------------------------------

    async def insert(self, entry: CacheEntry) -> bool:
        """Insert a new entry; False when the image or its cache disk name has one already."""
        return await self._call(self._index.insert, entry)

    async def mark_ready(self, image_id: str, when: float) -> None:
        await self._call(self._index.mark_ready, image_id, when)

    async def touch(self, image_id: str, when: float) -> None:
        """Record a use of the image at ``when`` (a last use ahead of the clock is reset)."""
        await self._call(self._index.touch, image_id, when)

    async def drop(self, image_id: str) -> None:
        """Delete the image's row (its disk is the caller's to deal with, first)."""
        await self._call(self._index.delete, image_id)

    async def needs_rebuild(self) -> bool:
        return await self._call(self._index.needs_rebuild)

    async def rebuilt(self) -> None:
        await self._call(self._index.rebuilt)

    def close(self) -> None:
        self._index.close()

    # -- disks entering from the VG -------------------------------------------------------

    async def adopt(
        self,
        name: str,
        size: int | None = None,
        *,
        image_id: str | None = None,
        times: tuple[float, float] | None = None,
    ) -> CacheEntry | None:
        """Enter disk ``name`` into the index if the image it records has no row and it is
        ``admissible``; return the entry, or None (not entered)."""
        identity = await self._vg.disk_identity(name) if is_cache_disk_name(name) else None
        if identity is None or await self.row(identity.image_id) is not None:
            return None  # the image has a row: only a row that is dropped makes way
        entry = await self.admissible(name, size, image_id=image_id, times=times)
        if entry is None or not await self._call(self._index.adopt, entry):
            return None
        return entry

    async def admissible(
        self,
        name: str,
        size: int | None = None,
        *,
        image_id: str | None = None,
        times: tuple[float, float] | None = None,
    ) -> CacheEntry | None:
        """The ready entry under which disk ``name`` (of ``size`` bytes as the VG lists it;
        None: looked up) may enter the index, created and used at ``times`` (what a dropped
        row said; default now), or None when it fails a check of the module docstring or
        records another image than ``image_id`` (when given). Reads the whole disk (a hash)."""
        if not is_cache_disk_name(name):
            return None
        identity = await self._vg.disk_identity(name)
        if size is None:
            size = await self._vg.disk_size(name)
        if identity is None or identity.size != size:
            return None
        try:
            recorded = validate_image_id(identity.image_id)
        except InvalidInput:
            return None
        if recorded != identity.image_id or not is_cache_disk_name_of(recorded, name):
            return None
        if image_id is not None and recorded != image_id:
            return None
        if not await self._bytes_agree(name, identity):
            return None
        created, last_used = (time.time(),) * 2 if times is None else times
        return CacheEntry(
            recorded,
            name,
            identity.size,
            identity.digest_algo,
            identity.digest,
            created,
            last_used,
            EntryState.READY,
        )

    async def _bytes_agree(self, name: str, identity: DiskIdentity) -> bool:
        """Whether the disk's bytes hash to its recorded digest (read back through the VG)."""
        if not identity.digest_algo and not identity.digest:
            log.info(
                "disk %s of image %s: adopted on its recorded identity alone (this VG records "
                "no digest to check its bytes against)",
                name,
                identity.image_id,
            )
            return True
        try:
            hashlib.new(identity.digest_algo)
            digest = await self._vg.disk_digest(name, identity.digest_algo)
        except (ValueError, StorageError) as exc:
            log.warning("disk %s: not adopted, its bytes could not be checked: %s", name, exc)
            return False
        if digest is None:
            log.warning("disk %s: not adopted: this VG cannot read it back to check it", name)
            return False
        if digest != identity.digest:
            log.warning(
                "disk %s records image %s with %s digest %s, but its bytes hash to %s; "
                "not adopted, left alone",
                name,
                identity.image_id,
                identity.digest_algo,
                identity.digest,
                digest,
            )
            return False
        return True

    # -- internals ------------------------------------------------------------------------

    def _judge_row(self, row: CacheEntry | BadRow) -> Judged:
        if isinstance(row, BadRow):
            self._warn(
                row.image_id,
                f"index row of image {row.image_id or '(not an image id)'}: {row.reason}; "
                "ignored as damaged",
            )
            return Judged(row.image_id, Trust.INVALID, None)
        if row.clock_ahead:
            self._warn(
                row.image_id,
                f"index entry of image {row.image_id}: a time ahead of the clock, counted as "
                "now (the next use sets it right)",
            )
        if not is_cache_disk_name_of(row.image_id, row.cache_disk):
            self._warn(
                row.image_id,
                f"index entry of image {row.image_id} names disk {row.cache_disk!r}, not one of "
                "its cache disk names; never served: dropping the entry, leaving the disk alone",
            )
            return Judged(row.image_id, Trust.FOREIGN, row)
        if row.state is EntryState.FILLING:
            return Judged(row.image_id, Trust.FILLING, row)
        return Judged(row.image_id, Trust.READY, row)

    def _warn(self, image_id: str | None, message: str) -> None:
        """Log ``message`` once per process (a row is read many times before it is dropped)."""
        if (image_id, message) not in self._warned:
            self._warned.add((image_id, message))
            log.warning("%s", message)

    @staticmethod
    async def _call(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


def _agrees(identity: DiskIdentity, entry: CacheEntry) -> bool:
    """Whether a disk's recorded identity is the entry's (a digest only where one is recorded)."""
    if identity.size != entry.size:
        return False
    if not identity.digest_algo and not identity.digest:
        return True
    return (identity.digest_algo, identity.digest) == (entry.digest_algo, entry.digest)
