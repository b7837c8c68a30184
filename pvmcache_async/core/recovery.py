"""Crash recovery: what dead processes left in the VG and the index, cleared; a lost index
rebuilt from the disks' recorded identities.

The kernel drops a dead process's ``flock``, so whoever next holds an image's lock
exclusively knows that no live process is filling it: a ``filling`` entry is then a crash's
leftover (``recover``). Partial disks have names of their writer's own and are held by
it (``storage``): the VG removes a dead writer's and never a live one's. What a row is worth is
the catalog's to say (``catalog.Trust``); recovery acts on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import replace

from pvmcache_async.core.catalog import Catalog, Trust
from pvmcache_async.core.progress import discard_record
from pvmcache_async.models import CacheEntry, EntryState
from pvmcache_async.names import MAX_CACHE_NAMES, cache_disk_names
from pvmcache_async.storage import VolumeGroup

log = logging.getLogger(__name__)


class Recovery:
    """Clears what crashes and tampering left in one VG and its index."""

    def __init__(self, vg: VolumeGroup, catalog: Catalog) -> None:
        self._vg = vg
        self._catalog = catalog

    async def recover(self, image_id: str) -> CacheEntry | None:
        """Under the image's exclusive lock: clear what a dead process left, return a ready entry.

        Holding the lock proves no live process is filling this image, so a ``filling`` entry
        is a leftover of a crash (and its partial disk, whose owner is dead, goes with the
        VG's dead temporaries). A row that is not READY is dropped, a FOREIGN or INVALID one's
        disk left alone, a DAMAGED one's (the image's own, not as recorded) deleted unless it
        passes a rebuild's checks. Then the image's own disk, if one of its cache disk names
        holds it, is adopted again (``Catalog.adopt``: its bytes checked against its recorded
        digest), so a dropped row leaves no disk of the image unknown to the index.
        """
        await asyncio.to_thread(discard_record, self._vg.state_dir, image_id)
        judged = await self._catalog.row(image_id)
        if judged is None:
            return None
        if judged.trust is Trust.FILLING:  # its writer died: give its room back first
            await self.remove_dead_temporaries()
        judged = await self._catalog.check_disk(judged)
        entry = judged.entry
        if judged.trust is Trust.READY and entry is not None:
            if entry.state is EntryState.FILLING:  # published, then died before recording it
                await self._catalog.mark_ready(image_id, time.time())
                entry = replace(entry, state=EntryState.READY)
            return entry
        times = None if entry is None else (entry.created, entry.last_used)
        if judged.trust is Trust.DAMAGED and entry is not None:
            # ours, but not as recorded: it stays only if it passes a rebuild's checks (the
            # row may be what was altered); else it is never handed out. Disk first: a crash
            # in between leaves a row whose disk is gone, not a disk no row names.
            own = await self._catalog.admissible(entry.cache_disk, image_id=image_id, times=times)
            if own is None:
                await self._vg.delete(entry.cache_disk)
            await self._catalog.drop(image_id)
            if own is not None and await self._catalog.insert(own):
                log.warning(
                    "image %s: its disk %s entered the index again", image_id, own.cache_disk
                )
                return own
        else:
            await self._catalog.drop(image_id)
        return await self._adopt_own_disk(image_id, times)

    async def _adopt_own_disk(
        self, image_id: str, times: tuple[float, float] | None
    ) -> CacheEntry | None:
        """Adopt the image's disk under one of its cache disk names, if one passes the checks,
        created and used at ``times`` (a dropped row's; None: now)."""
        names = set(itertools.islice(cache_disk_names(image_id), MAX_CACHE_NAMES))
        for disk in await self._vg.list_disks():
            if disk.name not in names:
                continue
            entry = await self._catalog.adopt(disk.name, disk.size, image_id=image_id, times=times)
            if entry is not None:
                log.warning("image %s: its disk %s entered the index again", image_id, disk.name)
                return entry
        return None

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
        for disk in await self._vg.list_disks():
            if await self._catalog.adopt(disk.name, disk.size) is not None:
                adopted.append(disk.name)
        return adopted
