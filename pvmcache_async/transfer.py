"""The asyncio core: each image is downloaded into the VG once; every deploy clones it.

``ImageCache.ensure(image_id)`` returns the image's cache disk: found in the cache (``hit``),
downloaded by this call (``miss``), or obtained by waiting on a download already under way in
this process or another (``joined``). ``ImageCache.deploy(image_id, instance)`` ensures the
image, then clones the cache disk into the instance's disk; where the VG offers it
(``VolumeGroup.create_copy``), the deploy that starts a download has its disk written by that
download as the bytes pass instead (``tee``), and publishes it once verified.

This module orchestrates; each concern is a module of its own:

* ``ingest``: the miss path (lock, recover, record, room, download, publish), run once per
  image at a time in this process through a ``locks.SingleFlight``;
* ``image_locks``: the lock files of each image across processes, and their life;
* ``tee``, ``space``: the deploy's disk written alongside a download; room for downloads;
* ``catalog``: the index, and what each of its rows is worth (the one place that decides);
* ``recovery``: what crashes left, cleared; a lost index rebuilt from the disks;
* ``eviction``: which images a prune removes (pure functions).

Hostile state: every row of the index is judged by ``catalog.Catalog`` before it is acted on.
A hit is served only from a row whose values are in range, whose cache disk name is one the
cache gives that image (``names.is_cache_disk_name_of``), and whose disk is there at the
recorded size and records (cheaply: xattrs or a label) that image, size and digest; any
other row is dropped, and a disk that is not the image's is left alone, never served (the
deploy downloads into a name of its own). A time ahead of the clock counts as now. An index
that is lost or unreadable is rebuilt from the disks' identities, each disk re-hashed
against its recorded digest before it is trusted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from pvmcache_async.aio import complete_or_undo, finish
from pvmcache_async.core import eviction
from pvmcache_async.core.catalog import Catalog, Trust
from pvmcache_async.core.image_locks import ImageHold, ImageLocks
from pvmcache_async.core.ingest import Ingest, IngestResult, outcome_of
from pvmcache_async.core.progress import ProgressBoard
from pvmcache_async.core.recovery import Recovery
from pvmcache_async.core.tee import TeeTarget
from pvmcache_async.errors import (
    CacheError,
    DiskExists,
    InsufficientSpace,
    InvalidInput,
    StorageError,
    check_disk_fits,
    naming_image,
)
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.locks import SingleFlight
from pvmcache_async.models import (
    CacheEntry,
    DeployResult,
    EnsureResult,
    EntryState,
    Outcome,
    PruneResult,
)
from pvmcache_async.names import (
    InstanceDisks,
    instance_disk_name,
    validate_image_id,
    validate_instance_uuid,
)
from pvmcache_async.storage import PartialDisk, VolumeGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Limits of one ``ImageCache``."""

    max_downloads: int = 4  # images downloaded at once by this process
    max_clones: int = 8  # instance disks cloned at once by this process
    lock_poll: float = 0.005  # first wait between tries of a busy lock file (doubles to 0.1 s)
    # a cold miss writes the first deploy's disk as the bytes pass, where the VG offers it
    # (VolumeGroup.create_copy), instead of cloning the cache disk afterwards
    tee: bool = True

    def __post_init__(self) -> None:
        if self.max_downloads < 1 or self.max_clones < 1:
            raise InvalidInput("max_downloads and max_clones must be at least 1")


class ImageCache:
    """The image cache of one volume group. Create and use it inside one event loop."""

    def __init__(
        self,
        vg: VolumeGroup,
        glance: GlanceClient | None = None,
        settings: CacheSettings | None = None,
    ) -> None:
        self.vg = vg
        self.settings = settings or CacheSettings()
        self._locks = ImageLocks(vg.state_dir, self.settings.lock_poll)
        self._catalog = Catalog(vg, vg.state_dir / "index.sqlite")
        self._begun: asyncio.Task[None] | None = None
        self.progress = ProgressBoard(vg.state_dir)  # downloads under way, for those watching
        self._recovery = Recovery(vg, self._catalog)
        self._ingest = Ingest(
            vg,
            self._catalog,
            glance,
            self._locks,
            self._recovery,
            self.progress,
            self.settings.max_downloads,
        )
        self._flights: SingleFlight[str, IngestResult] = SingleFlight()
        self._clones = asyncio.Semaphore(self.settings.max_clones)
        self._instance_disks = InstanceDisks()  # the instance disks deploys are making
        self._swept = False

    @property
    def glance(self) -> GlanceClient | None:
        """Where images are downloaded from; None: only what is cached can be deployed."""
        return self._ingest.glance

    @glance.setter
    def glance(self, glance: GlanceClient | None) -> None:
        self._ingest.glance = glance

    # -- the two operations -------------------------------------------------------------

    async def ensure(self, image_id: str) -> EnsureResult:
        """Make sure the image is cached and return its cache disk.

        Concurrent calls for one image share one download (in this process through
        singleflight, across processes through the image's lock file). Cancelling a caller
        does not cancel the download the others wait on. An error reaches every caller
        that shared the download and is not remembered: the next call tries again.
        """
        image_id = validate_image_id(image_id)
        await self._begin()
        with naming_image(image_id):
            return await self._ensure(image_id, None)

    async def deploy(
        self, image_id: str, instance_uuid: str, *, size: int | None = None
    ) -> DeployResult:
        """Ensure the image, then clone its cache disk into a new disk for the instance.

        The instance disk appears only once complete; an existing disk is never replaced.
        The image's use lock, held throughout, keeps any removal from its cache disk. While
        another deploy in this process is making the disk of this instance, or of one whose
        uuid begins with the same 13 characters (the disk's name), this one fails at once,
        before anything is downloaded, with DiskExists naming both (``InstanceDisks``).

        ``size``: the instance disk's size in bytes (a flavor's root disk): the image, then
        zeros. None: the image's size. A size smaller than the image is ``DiskTooSmall``
        (the image stays cached; no instance disk is made). The cache disk is the image's size.
        """
        image_id = validate_image_id(image_id)
        instance = validate_instance_uuid(instance_uuid)
        if size is not None and size < 1:
            raise InvalidInput(f"instance disk size {size} is not positive", image_id=image_id)
        disk = self._instance_disks.claim(instance, image_id=image_id)
        try:
            await self._begin()
            async with self._locks.using(image_id):
                with naming_image(image_id):
                    return await self._deploy(image_id, instance, size)
        finally:
            self._instance_disks.release(disk)

    # -- the steps of a deploy, in order ------------------------------------------------

    async def _deploy(self, image_id: str, instance: str, size: int | None) -> DeployResult:
        """``deploy``, holding the image's use lock: no removal can take its cache disk."""
        start = time.monotonic()
        disk = await self._new_instance_disk(image_id, instance)
        outcome: Outcome | None = None
        fetched = 0
        for attempt in range(3):  # an operator's rm of the cache disk may slip in meanwhile
            target = TeeTarget(disk) if attempt == 0 and self.settings.tee else None
            ensured, copy = await self._ensure_taking(image_id, target)
            # a download on any attempt is this deploy's miss, and all its bytes count
            if outcome is None or ensured.outcome is Outcome.MISS:
                outcome = ensured.outcome
            fetched += ensured.bytes_fetched
            if copy is not None:  # the download wrote this deploy's disk too: no clone
                await self._publish_copy(image_id, copy, disk, size)
                cache_disk: str | None = ensured.cache_disk
            else:
                cache_disk = await self._clone(image_id, disk, size)
            if cache_disk is not None:
                return DeployResult(
                    image_id=image_id,
                    instance=instance,
                    disk=disk,
                    cache_disk=cache_disk,
                    outcome=outcome,
                    bytes_fetched=fetched,
                    seconds=time.monotonic() - start,
                )
        raise CacheError(
            "its cache disk was removed from under the deploy three times "
            "(by something other than this cache's prune)",
            image_id=image_id,
        )

    async def _new_instance_disk(self, image_id: str, instance: str) -> str:
        """The instance's disk name, refused if a disk (or a symlink) is there already."""
        if not self._swept:  # the first deploy clears what clones killed mid-way left
            self._swept = True
            await self._recovery.remove_dead_temporaries()
        disk = instance_disk_name(instance)
        if await self.vg.disk_size(disk) is not None:  # refuses a symlink there too
            raise DiskExists(f"instance {instance} already has a disk {disk}", image_id=image_id)
        return disk

    async def _ensure_taking(
        self, image_id: str, target: TeeTarget | None
    ) -> tuple[EnsureResult, PartialDisk | None]:
        """``ensure``; a download it starts also writes ``target``'s disk: the unpublished
        copy comes back with the result, and publishing it is the caller's."""
        if target is None:
            return await self._ensure(image_id, None), None
        try:
            ensured = await self._ensure(image_id, target)
        except BaseException:
            await target.leave()
            raise
        return ensured, target.take()

    async def _ensure(self, image_id: str, target: TeeTarget | None) -> EnsureResult:
        """``ensure``: the ready entry, or this process's one run of the miss path."""
        start = time.monotonic()
        ingested: IngestResult | None = None
        leader = True
        entry = await self._ready(image_id)
        if entry is not None:
            # also for a deploy, which touches again after its clone: this use shields the
            # image from a prune in the moment before the deploy takes its shared lock
            await self._catalog.touch(image_id, time.time())
        else:
            work = lambda: self._ingest.run(image_id, target)  # noqa: E731
            ingested, leader = await self._flights.do(image_id, work)
            entry = ingested.entry
        outcome = outcome_of(ingested, leader=leader)
        fetched = ingested.fetched if ingested is not None and outcome is Outcome.MISS else 0
        return EnsureResult(image_id, entry.cache_disk, outcome, fetched, time.monotonic() - start)

    async def _clone(self, image_id: str, disk: str, size: int | None) -> str | None:
        """Clone the image's cache disk into ``disk`` (of ``size`` bytes) under its shared
        lock; return the cache disk's name, or None when it was gone (removed by hand since
        it was ensured)."""
        async with self._clones, self._locks.lock(image_id, shared=True):
            entry = await self._ready(image_id)
            if entry is None:
                return None
            check_disk_fits(image_id, entry.size, size)
            # a cancelled deploy leaves no disk: the clone (a thread) ends, then is undone
            await complete_or_undo(
                self._clone_and_record(image_id, entry.cache_disk, disk, size),
                lambda: self.vg.delete(disk),
            )
        return entry.cache_disk

    async def _clone_and_record(
        self, image_id: str, cache_disk: str, disk: str, size: int | None
    ) -> None:
        await self.vg.clone(cache_disk, disk, size)
        await self._touch_or_undo(image_id, disk)

    async def _publish_copy(
        self, image_id: str, copy: PartialDisk, disk: str, size: int | None
    ) -> None:
        try:
            if size is not None and (entry := await self._catalog.ready(image_id)):
                check_disk_fits(image_id, entry.size, size)
            # a cancelled deploy leaves no disk: the publish (threads) ends, then is undone
            await complete_or_undo(copy.publish(disk, size), lambda: self.vg.delete(disk))
        except BaseException:
            await finish(copy.discard())
            raise
        await self._touch_or_undo(image_id, disk)

    async def _touch_or_undo(self, image_id: str, disk: str) -> None:
        """Record the use of a deploy's new disk; a deploy that fails here (the index full)
        leaves no disk behind, so the same instance can be deployed again at once."""
        try:
            await self._catalog.touch(image_id, time.time())
        except BaseException:
            await finish(self.vg.delete(disk))
            raise

    async def _ready(self, image_id: str) -> CacheEntry | None:
        """The image's entry if it may be served (``Trust.READY``: its own disk, as recorded),
        else None: then the miss path's recovery drops the row, never serving the disk."""
        return await self._catalog.ready(image_id)

    # -- the cache's contents -----------------------------------------------------------

    async def entries(self) -> list[CacheEntry]:
        """Every image in the index, ready or being filled by a live process.

        A ``filling`` entry whose image lock is free is what a dead process left, not a
        download: it is cleared (as ``sweep`` would) and not listed. Reads only, otherwise:
        it works on a full VG (the clearing is then left to a later call), and on a read-only
        one (nothing can be cleared there: every entry is listed as it stands)."""
        await self._begin()
        listed = []
        for judged in await self._catalog.rows():
            entry = judged.entry
            if entry is None or judged.trust not in (Trust.READY, Trust.FILLING):
                continue  # never shown: a sweep or the next deploy drops it
            clearable = not self._catalog.read_only and not self._flights.in_flight(entry.image_id)
            if judged.trust is Trust.FILLING and clearable:
                with self._locks.try_hold(entry.image_id) as held:
                    if held is not None:  # nobody is filling it: a dead writer's leftover
                        with contextlib.suppress(StorageError):
                            if (recovered := await self._recovery.recover(entry.image_id)) is None:
                                held.cached = False
                            else:
                                listed.append(recovered)
                        continue
            listed.append(entry)
        return listed

    async def remove(
        self, image_id: str, *, idle_for: float = 0.0, unused_since: float | None = None
    ) -> bool:
        """Remove the image's cache disk if nothing uses it; return whether it was removed.

        Never waits: when a deploy is cloning the image or a download is filling it (in any
        process), nothing is removed. Under the image's exclusive lock, just before deleting,
        the in-use test is repeated (nova libvirt's fix for its bugs 1256838 and 1470437): no
        download of it in flight in this process, and not used in the last ``idle_for``
        seconds nor at or after ``unused_since`` (the moment the caller's in-use snapshot was
        taken: a deploy that began after it is not in the snapshot, but it touched the entry).
        """
        image_id = validate_image_id(image_id)
        await self._begin()
        if self._flights.in_flight(image_id):
            return False
        with self._locks.try_hold(image_id) as held:
            if held is None:
                return False
            # a download may have started meanwhile; it waits for this lock, so keep the image
            if self._flights.in_flight(image_id) or (use := self._locks.try_use(image_id)) is None:
                return False  # ... and a deploy holds the use lock from start to end
            try:
                judged = await self._catalog.row(image_id)
                if judged is None:
                    held.cached = False  # the lock files this call just created go
                    return False
                entry = judged.entry
                if judged.trust in (Trust.FOREIGN, Trust.INVALID):  # drop it, adopt its disk
                    await self._recover_held(image_id, held)
                    return False
                if judged.trust is Trust.FILLING or entry is None:
                    return False
                if time.time() - entry.last_used < idle_for:
                    return False
                # a time ahead of the clock reads as now, but is no use since the snapshot:
                # any use since would have set it right
                used_since = unused_since is not None and entry.last_used >= unused_since
                if used_since and not entry.clock_ahead:
                    return False
                with naming_image(image_id):
                    judged = await self._catalog.check_disk(judged)
                    if judged.trust is Trust.FOREIGN:  # its disk records another image
                        await self._recover_held(image_id, held)
                        return False
                    # disk first: a crash in between leaves an entry whose disk is gone, which
                    # the next ensure recognises, rather than an unknown i_ disk that nothing
                    # removes; and on a full VG, the index can be written once the disk is gone
                    await self.vg.delete(entry.cache_disk)
                    await self._catalog.drop(image_id)
                held.cached = False
            finally:
                use.release()
        log.info("removed cache disk %s of image %s", entry.cache_disk, image_id)
        return True

    async def mark_used(self, image_ids: Collection[str], when: float | None = None) -> None:
        """Record that these images are in use now (nova's manager does this each pass, as
        libvirt's touches its base files), so their minimum age counts from their last use."""
        when = time.time() if when is None else when
        await self._begin()
        for image_id in {validate_image_id(i) for i in image_ids}:
            await self._catalog.touch(image_id, when)

    async def sweep(self) -> list[str]:
        """Remove what dead processes left, and return the names of the disks removed.

        Partial downloads of images whose lock is free (their process died), the index entries
        and lock files that belonged to them, and clones that a crash interrupted. Whatever a
        live process (this one or another) is still doing is left alone.
        """
        await self._begin()
        removed = await self._recovery.remove_dead_temporaries()
        known = {j.image_id: j.trust for j in await self._catalog.rows() if j.image_id}
        # a crash's filling entries, rows not to be trusted (altered to name a disk not the
        # image's, values out of range), lock files
        candidates = {i for i, t in known.items() if t is not Trust.READY}
        for image_id in sorted(candidates | self._locks.image_ids()):
            if self._flights.in_flight(image_id) or known.get(image_id) is Trust.READY:
                continue
            with self._locks.try_hold(image_id) as held:
                if held is None:
                    continue  # a live process is filling, removing or cloning it
                await self._recover_held(image_id, held)
        return removed

    async def prune(
        self,
        *,
        in_use: Collection[str] = (),
        min_age: float = 0.0,
        max_bytes: int | None = None,
        max_count: int | None = None,
        in_use_as_of: float | None = None,
    ) -> PruneResult:
        """Remove cached images nobody uses: first those unused for ``min_age`` seconds, then,
        least recently used first, unused ones until the cache fits ``max_bytes`` and
        ``max_count`` (``eviction``). An image in ``in_use``, or being deployed or downloaded,
        is kept, and so is one used at or after ``in_use_as_of`` (when ``in_use`` was
        determined; default: now), whose users ``in_use`` may not show. Images in ``in_use``
        count as used now.

        Never waits on a busy image (see ``remove``): a slow download delays no pass.
        """
        busy = {validate_image_id(i) for i in in_use}
        if min_age < 0 or (max_bytes is not None and max_bytes < 0) or (max_count or 0) < 0:
            raise InvalidInput("min_age, max_bytes and max_count must not be negative")
        budget = eviction.Budget(max_bytes, max_count)
        as_of = time.time() if in_use_as_of is None else in_use_as_of
        await self.sweep()  # what crashed processes left, before judging sizes and counts
        kept = [e for e in await self.entries() if e.state is EntryState.READY]
        removed: list[str] = []
        now = time.time()
        for entry in eviction.expired(kept, in_use=busy, now=now, min_age=min_age):
            if await self.remove(entry.image_id, idle_for=min_age, unused_since=as_of):
                kept.remove(entry)
                removed.append(entry.cache_disk)
        refused = set(busy)  # images whose removal the budget asked for but that were busy
        while (victim := eviction.over_budget(kept, in_use=refused, budget=budget)) is not None:
            if await self.remove(victim.image_id, unused_since=as_of):
                kept.remove(victim)
                removed.append(victim.cache_disk)
            else:
                refused.add(victim.image_id)
        # after the removals: on a full VG the index can be written only once disks are gone
        await self.mark_used(busy, as_of)
        kept = eviction.least_recently_used(kept)
        return PruneResult(removed=removed, kept=[e.cache_disk for e in kept])

    async def rebuild_index(self) -> list[str]:
        """Enter into the index every cache disk of the VG that it lacks; return their names.

        A disk is entered only when its name has the cache's shape, its recorded identity
        (``VolumeGroup.disk_identity``) names a valid image id for which the cache would give
        that name, and its size is the recorded size; it enters as ``ready``, used now (so a
        prune keeps it for ``min_age``). Run automatically when the index was missing, emptied
        or unreadable (see ``index``); safe to run at any time, in any process."""
        return await self._recovery.rebuild_index()

    async def settle(self) -> None:
        """Wait until the downloads under way in this process have ended, however they end
        (a download whose callers have all left runs on to its end)."""
        await self._flights.settle()

    async def close(self) -> None:
        """Cancel downloads in flight (their partial disks are discarded) and release all."""
        await self._flights.cancel_all()
        if self.glance is not None:
            await self.glance.close()
        await self.vg.close()
        self._catalog.close()

    # -- internals ----------------------------------------------------------------------

    async def _recover_held(self, image_id: str, held: ImageHold) -> None:
        """``Recovery.recover`` under the image's exclusive lock ``held``: its lock files go
        unless the image is left cached."""
        with naming_image(image_id):
            if await self._recovery.recover(image_id) is None:
                held.cached = False

    async def _begin(self) -> None:
        """Before the first call does anything: rebuild an index that was lost (once; callers
        that come meanwhile wait for it, and a cancelled caller does not cancel it)."""
        if self._begun is None:
            self._begun = asyncio.ensure_future(self._rebuild_if_needed())
        begun = self._begun
        try:
            await asyncio.shield(begun)
        except Exception:
            if self._begun is begun:  # e.g. the VG unreachable: the next call tries again
                self._begun = None
            raise

    async def _rebuild_if_needed(self) -> None:
        if not await self._catalog.needs_rebuild():
            return
        try:
            adopted = await self.rebuild_index()
        except InsufficientSpace as exc:  # a full VG: lists and prunes must still work
            log.info("cache index not rebuilt yet (the next process tries again): %s", exc)
            return
        await self._catalog.rebuilt()
        if adopted:
            log.warning("cache index rebuilt from the disks: %s", " ".join(adopted))
