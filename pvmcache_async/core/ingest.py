"""The miss path: one image brought into the cache, top to bottom.

Under the image's exclusive lock: recover what a crash left (or find the image cached by
another process meanwhile), record a ``filling`` entry, claim room, download into a partial
disk (and the deploy's own disk alongside, see ``tee``), publish it as the cache disk, mark
the entry ready. Runs as a singleflight's work (``ImageCache``): once per image at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, replace

from pvmcache_async.aio import finish
from pvmcache_async.core.catalog import Catalog
from pvmcache_async.core.image_locks import ImageLocks
from pvmcache_async.core.progress import ProgressBoard
from pvmcache_async.core.recovery import Recovery
from pvmcache_async.core.space import CountedSink, SpaceClaims
from pvmcache_async.core.tee import TeeSink, TeeTarget
from pvmcache_async.errors import DiskExists, NoGlanceEndpoint, StorageError
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.models import CacheEntry, EntryState, ImageInfo, Outcome
from pvmcache_async.names import MAX_CACHE_NAMES, cache_disk_names, partial_disk_name
from pvmcache_async.storage import DiskIdentity, PartialDisk, VolumeGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one run of the miss path found or did."""

    entry: CacheEntry  # ready
    downloaded: bool  # False: another process cached it first (found under the lock)
    waited: bool  # the image's lock was another's first (it was filling or removing it)
    fetched: int  # bytes read from Glance


def outcome_of(ingested: IngestResult | None, *, leader: bool) -> Outcome:
    """How one call obtained the cache disk; ``ingested`` is None when it was ready at once.

    A caller that waited on this process's download under way (not the ``leader``), or on
    another process's (the lock was held), joined it; the leader of a download missed.
    """
    if ingested is None:
        return Outcome.HIT
    if not leader:
        return Outcome.JOINED
    if ingested.downloaded:
        return Outcome.MISS
    return Outcome.JOINED if ingested.waited else Outcome.HIT


class Ingest:
    """Brings images into one VG's cache from Glance, at most ``max_downloads`` at once."""

    def __init__(
        self,
        vg: VolumeGroup,
        catalog: Catalog,
        glance: GlanceClient | None,
        locks: ImageLocks,
        recovery: Recovery,
        progress: ProgressBoard,
        max_downloads: int,
    ) -> None:
        self._vg = vg
        self._catalog = catalog
        self.glance = glance  # may be set later (an endpoint found on first use)
        self._locks = locks
        self._recovery = recovery
        self._progress = progress
        self._downloads = asyncio.Semaphore(max_downloads)
        self._space = SpaceClaims(vg)

    async def run(self, image_id: str, target: TeeTarget | None) -> IngestResult:
        """Cache the image unless another process has; a download this starts also writes
        ``target``'s disk and hands the copy over to it once verified (``TeeTarget``).

        A failure leaves nothing: no entry, no partial disk, no lock file of an uncached image.
        """
        glance = self.glance
        if glance is None:
            raise NoGlanceEndpoint(
                "not cached, and no Glance endpoint to fetch it from "
                "(--glance-url, PVMCACHE_GLANCE_URL)",
                image_id=image_id,
            )
        async with self._downloads, self._locks.hold(image_id, cached=False) as held:
            entry = await self._recovery.recover(image_id)
            if entry is not None:
                held.cached = True
                return IngestResult(entry, downloaded=False, waited=held.waited, fetched=0)
            info = await glance.get_image(image_id)
            entry = await self._record_filling(info)
            try:
                fetched, copy = await self._download(glance, info, entry, target)
            except BaseException:
                await finish(self._catalog.drop(image_id))
                raise
            now = time.time()
            try:
                await self._catalog.mark_ready(image_id, now)
            except BaseException:
                # unrecorded, the published disk would be nobody's (the index is what makes
                # a disk the cache's own), so it goes too
                await finish(self._unpublish(entry))
                if copy is not None:
                    await finish(copy.discard())
                raise
            held.cached = True
            if copy is not None:
                assert target is not None
                await target.hand_over(copy)
        log.info("cached image %s as %s (%d bytes)", image_id, entry.cache_disk, fetched)
        ready = replace(entry, state=EntryState.READY, created=now, last_used=now)
        return IngestResult(ready, downloaded=True, waited=held.waited, fetched=fetched)

    async def _record_filling(self, info: ImageInfo) -> CacheEntry:
        """Record a ``filling`` entry under the first cache disk name that is free."""
        now = time.time()
        for name in itertools.islice(cache_disk_names(info.id), MAX_CACHE_NAMES):
            if await self._vg.disk_size(name) is not None:
                continue  # a disk of another image, or one the cache did not create
            entry = CacheEntry(
                info.id,
                name,
                info.size,
                info.digest_algo,
                info.digest,
                now,
                now,
                EntryState.FILLING,
            )
            if await self._catalog.insert(entry):
                return entry
        raise StorageError(
            f"all {MAX_CACHE_NAMES} cache disk names of the image are taken", image_id=info.id
        )

    async def _download(
        self, glance: GlanceClient, info: ImageInfo, entry: CacheEntry, target: TeeTarget | None
    ) -> tuple[int, PartialDisk | None]:
        """Download into the published cache disk; return the bytes fetched and the target's
        copy, complete but unpublished (None when there was none or it was dropped)."""
        async with self._space.room_for(info) as claim:
            identity = DiskIdentity(info.id, info.size, info.digest_algo, info.digest)
            partial = await self._vg.create_partial(
                partial_disk_name(), info.size, identity=identity
            )
            tee: TeeSink | None = None
            try:
                if target is not None and not target.left:
                    tee = await self._tee(partial, info, target)
                sink = CountedSink(partial if tee is None else tee, claim)
                async with self._progress.meter(info.id, info.size) as meter:
                    fetched = await glance.download(info, meter.sink(sink))
                await self._publish_cache_disk(partial, entry.cache_disk, identity)
            except BaseException:
                await finish(partial.discard())
                if tee is not None and tee.copy is not None:
                    await finish(tee.copy.discard())
                raise
        return fetched, None if tee is None else tee.copy

    async def _tee(
        self, partial: PartialDisk, info: ImageInfo, target: TeeTarget
    ) -> TeeSink | None:
        """A sink that writes the target's disk too, where the VG offers one (else None)."""
        try:
            copy = await self._vg.create_copy(target.disk, info.size)
        except StorageError as exc:  # the deploy will clone instead
            log.info("image %s: no disk written alongside: %s", info.id, exc.message)
            return None
        return None if copy is None else TeeSink(partial, copy, target)

    async def _publish_cache_disk(
        self, partial: PartialDisk, name: str, identity: DiskIdentity
    ) -> None:
        """Publish a verified download as the cache disk ``name``.

        Two writers of one image can overlap only when the lock was taken from under one of
        them (its lock file removed by hand): then the name may already hold the other's
        verified disk of the same image, recorded as such; that one stands, and this copy
        is dropped. Anything else under the name is never replaced (``DiskExists``)."""
        try:
            await partial.publish(name)
        except DiskExists:
            if await self._vg.disk_identity(name) != identity:
                raise
            log.warning(
                "%s already holds image %s, verified by another writer", name, identity.image_id
            )
            await finish(partial.discard())

    async def _unpublish(self, entry: CacheEntry) -> None:
        await self._vg.delete(entry.cache_disk)
        with contextlib.suppress(StorageError):  # left behind, the next recover clears it
            await self._catalog.drop(entry.image_id)
