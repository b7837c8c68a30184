"""Crash recovery: what dead processes left in the VG and the index, cleared; a lost index
rebuilt from the disks' recorded identities.

The kernel drops a dead process's ``flock``, so whoever next holds an image's lock
exclusively knows that no live process is filling it: a ``filling`` entry is then a crash's
leftover (``recover``). Partial disks have names of their writer's own and are held by
it (``storage``): the VG removes a dead writer's and never a live one's. An index row is acted
on only when its cache disk name is one the cache gives that image and the disk's recorded
identity, if any, names that image (``owns_disk``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from .errors import InvalidInput
from .index import Index
from .models import CacheEntry, EntryState
from .names import is_cache_disk_name, is_cache_disk_name_of, validate_image_id
from .progress import discard_record
from .storage import VolumeGroup

log = logging.getLogger(__name__)


def plausible(entry: CacheEntry) -> bool:
    """A ready entry that names one of its image's cache disk names."""
    return entry.state is EntryState.READY and is_cache_disk_name_of(
        entry.image_id, entry.cache_disk
    )


class Recovery:
    """Clears what crashes left in one VG and its index."""

    def __init__(self, vg: VolumeGroup, index: Index) -> None:
        self._vg = vg
        self._index = index

    async def recover(self, image_id: str) -> CacheEntry | None:
        """Under the image's exclusive lock: clear what a dead process left, return a ready entry.

        Holding the lock proves no live process is filling this image, so a ``filling`` entry
        is a leftover of a crash (and its partial disk, whose owner is dead, goes with the
        VG's dead temporaries). An entry that names a disk not the cache's own is dropped,
        and that disk left alone.
        """
        await asyncio.to_thread(discard_record, self._vg.state_dir, image_id)
        entry = await asyncio.to_thread(self._index.get, image_id)
        if entry is None:
            return None
        if entry.state is EntryState.FILLING:  # its writer died: give its room back first
            await self.remove_dead_temporaries()
        if not await self.owns_disk(entry):
            await asyncio.to_thread(self._index.delete, image_id)
            return None
        size = await self._vg.disk_size(entry.cache_disk)
        if size == entry.size:
            if entry.state is EntryState.FILLING:  # published, then died before recording it
                await asyncio.to_thread(self._index.mark_ready, image_id, time.time())
                entry = replace(entry, state=EntryState.READY)
            return entry
        if size is not None:  # ours, but not what we published: never hand it out
            await self._vg.delete(entry.cache_disk)
        await asyncio.to_thread(self._index.delete, image_id)
        return None

    async def owns_disk(self, entry: CacheEntry) -> bool:
        """Whether the entry's cache disk is the cache's own disk of that image: a name the
        cache gives that image, and no recorded identity naming another (older disks have
        none). Checked before a disk named by the index is deleted."""
        if not is_cache_disk_name_of(entry.image_id, entry.cache_disk):
            log.warning(
                "index entry of image %s names disk %r, not one of its cache disk names; "
                "dropping the entry, leaving the disk alone",
                entry.image_id,
                entry.cache_disk,
            )
            return False
        identity = await self._vg.disk_identity(entry.cache_disk)
        if identity is not None and identity.image_id != entry.image_id:
            log.warning(
                "disk %s records image %s, but the index entry is image %s's; "
                "dropping the entry, leaving the disk alone",
                entry.cache_disk,
                identity.image_id,
                entry.image_id,
            )
            return False
        return True

    async def remove_dead_temporaries(self) -> list[str]:
        """Remove the partial disks and clones of dead writers; return their names."""
        removed = await self._vg.remove_dead_temporaries()
        if removed:
            log.info("removed what dead processes left: %s", " ".join(removed))
        return removed

    async def rebuild_index(self) -> list[str]:
        """Enter into the index every cache disk of the VG that it lacks; return their names.

        See ``ImageCache.rebuild_index`` for which disks enter."""
        adopted = []
        now = time.time()
        for disk in await self._vg.list_disks():
            if not is_cache_disk_name(disk.name):
                continue
            identity = await self._vg.disk_identity(disk.name)
            if identity is None or disk.size != identity.size:
                continue
            try:
                image_id = validate_image_id(identity.image_id)
            except InvalidInput:
                continue
            if not is_cache_disk_name_of(image_id, disk.name):
                continue
            entry = CacheEntry(
                image_id,
                disk.name,
                identity.size,
                identity.digest_algo,
                identity.digest,
                now,
                now,
                EntryState.READY,
            )
            if await asyncio.to_thread(self._index.adopt, entry):
                adopted.append(disk.name)
        return adopted
