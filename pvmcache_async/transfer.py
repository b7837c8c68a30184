"""The asyncio core: each image is downloaded into the VG once; every deploy clones it.

``ImageCache.ensure(image_id)`` returns the image's cache disk: found in the cache (``hit``),
downloaded by this call (``miss``), or obtained by waiting on a download already under way in
this process or another (``joined``). ``ImageCache.deploy(image_id, instance)`` ensures the
image, then clones the cache disk into the instance's disk; where the VG offers it
(``VolumeGroup.create_copy``), the deploy that starts a download has its disk written by that
download as the bytes pass instead (a tee, see ``_Rider``), and publishes it once verified.

Locking, per image (``locks``):

* in a process, one ``SingleFlight`` per image: one download task, any number of waiters;
* across processes, a lock file per image in the VG's state directory: exclusive while a
  download fills or a removal deletes the cache disk, shared while a deploy clones it;
* and a second one, ``<image id>.use``, that a deploy holds shared from start to end and a
  removal must take exclusively too (without waiting): no removal slips in between the
  download a deploy waited for and its clone, however tight the prune loop.

Crash recovery: the kernel drops a dead process's ``flock``, so whoever next holds an image's
lock exclusively knows that no live process is filling it, and removes the ``filling`` entry a
crash left (``_recover``; ``sweep`` does it for every image). Partial downloads have names of
their writer's own and owner locks (``storage``): the VG removes a dead writer's and never a
live one's (``remove_dead_temporaries``). A lock file outlives its use only while its image is
cached: it is unlinked, under the lock, when a download fails or the image is removed
(``FileLock`` copes with a file unlinked under it).

Hostile state: an index row is acted on only when its cache disk name is one the cache gives
that image (``names.is_cache_disk_name_of``) and the disk's own recorded identity, if any,
names that image; an index that is lost or unreadable is rebuilt from the disks' identities.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .aio import complete_or_undo, finish
from .errors import (
    CacheError,
    DiskExists,
    InsufficientSpace,
    InvalidInput,
    NoGlanceEndpoint,
    StorageError,
)
from .glance import GlanceClient, Sink
from .index import Index
from .locks import FileLock, SingleFlight, private_dir
from .models import (
    CacheEntry,
    DeployResult,
    EnsureResult,
    EntryState,
    ImageInfo,
    Outcome,
    PruneResult,
)
from .names import (
    MAX_CACHE_NAMES,
    cache_disk_names,
    instance_disk_name,
    is_cache_disk_name,
    is_cache_disk_name_of,
    partial_disk_name,
    validate_image_id,
    validate_instance_uuid,
)
from .progress import ProgressBoard, discard_record
from .storage import DiskIdentity, PartialDisk, VolumeGroup

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class _Fill:
    entry: CacheEntry
    outcome: Outcome
    fetched: int


@dataclass(slots=True)
class _Claim:
    """The room a download under way will still take: its size less what it has written."""

    size: int
    written: int = 0


class _Counted:
    """A download's sink that keeps its claim's count of bytes written."""

    def __init__(self, inner: Sink, claim: _Claim) -> None:
        self._inner = inner
        self._claim = claim

    async def write(self, chunk: bytes) -> None:
        await self._inner.write(chunk)
        self._claim.written += len(chunk)

    async def rewind(self) -> None:
        await self._inner.rewind()
        self._claim.written = 0


class _Rider:
    """The disk of the deploy that starts a download, written by that download (a tee).

    The copy changes hands once: a download that succeeds hands it to the deploy, which
    publishes it. A deploy that has left (cancelled, or failed) gets nothing; the download
    then stops writing the copy and discards it, and the shared download goes on.
    """

    def __init__(self, disk: str) -> None:
        self.disk = disk
        self.left = False
        self._copy: PartialDisk | None = None

    async def hand_over(self, copy: PartialDisk) -> None:
        if self.left:
            await finish(copy.discard())
        else:
            self._copy = copy

    def take(self) -> PartialDisk | None:
        copy, self._copy = self._copy, None
        return copy

    async def leave(self) -> None:
        self.left = True
        if (copy := self.take()) is not None:
            await finish(copy.discard())


class _Tee:
    """A download's sink that also fills the rider's copy.

    The copy is a convenience for one deploy, the download is everyone's: a copy that fails
    to write, or whose deploy has left, is dropped, and the download goes on without it.
    """

    def __init__(self, main: PartialDisk, copy: PartialDisk, rider: _Rider) -> None:
        self.main = main
        self.copy: PartialDisk | None = copy
        self._rider = rider

    async def write(self, chunk: bytes) -> None:
        if self.copy is not None and self._rider.left:
            await self._drop("its deploy has left")
        if self.copy is None:
            return await self.main.write(chunk)
        main, copy = await asyncio.gather(
            self.main.write(chunk), self.copy.write(chunk), return_exceptions=True
        )
        if isinstance(copy, BaseException) and not isinstance(copy, StorageError):
            raise copy
        if isinstance(main, BaseException):
            raise main
        if isinstance(copy, StorageError):
            await self._drop(copy.message)

    async def rewind(self) -> None:
        await self.main.rewind()
        if self.copy is not None:
            try:
                await self.copy.rewind()
            except StorageError as exc:
                await self._drop(exc.message)

    async def _drop(self, why: str) -> None:
        assert self.copy is not None
        copy, self.copy = self.copy, None
        log.info("stopped writing %s alongside the download: %s", copy.name, why)
        await finish(copy.discard())


class ImageCache:
    """The image cache of one volume group. Create and use it inside one event loop."""

    def __init__(
        self,
        vg: VolumeGroup,
        glance: GlanceClient | None = None,
        settings: CacheSettings | None = None,
    ) -> None:
        self.vg = vg
        self.glance = glance
        self.settings = settings or CacheSettings()
        self._lock_dir = private_dir(vg.state_dir / "locks")
        self._index = Index(vg.state_dir / "index.sqlite")
        self._begun: asyncio.Task[None] | None = None
        self.progress = ProgressBoard(vg.state_dir)  # downloads under way, for those watching
        self._flights: SingleFlight[str, _Fill] = SingleFlight()
        self._downloads = asyncio.Semaphore(self.settings.max_downloads)
        self._claims: list[_Claim] = []  # room promised to the downloads under way
        self._clones = asyncio.Semaphore(self.settings.max_clones)
        self._swept = False

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
        with _about(image_id):
            return await self._ensure(image_id, None)

    async def _ensure(self, image_id: str, rider: _Rider | None) -> EnsureResult:
        """``ensure``; a download that this call starts also writes ``rider``'s disk."""
        start = time.monotonic()
        entry = await self._ready(image_id)
        if entry is not None:
            # also for a deploy, which touches again after its clone: this use shields the
            # image from a prune in the moment before the deploy takes its shared lock
            await self._db(self._index.touch, image_id, time.time())
            return EnsureResult(
                image_id, entry.cache_disk, Outcome.HIT, 0, time.monotonic() - start
            )
        fill, leader = await self._flights.do(image_id, lambda: self._fill(image_id, rider))
        outcome = fill.outcome if leader else Outcome.JOINED
        fetched = fill.fetched if outcome is Outcome.MISS else 0
        return EnsureResult(
            image_id, fill.entry.cache_disk, outcome, fetched, time.monotonic() - start
        )

    async def deploy(self, image_id: str, instance_uuid: str) -> DeployResult:
        """Ensure the image, then clone its cache disk into a new disk for the instance.

        The instance disk appears only once complete; an existing disk is never replaced.
        """
        image_id = validate_image_id(image_id)
        instance = validate_instance_uuid(instance_uuid)
        await self._begin()
        use = self._image_lock(image_id, shared=True, use=True)
        await use.acquire()
        try:
            with _about(image_id):
                return await self._deploy(image_id, instance)
        except BaseException:
            use.release()
            self._drop_use_file(image_id)
            raise
        finally:
            use.release()

    def _drop_use_file(self, image_id: str) -> None:
        """After a failed deploy: the use lock file goes with an image that is not cached (no
        lock file) unless another deploy holds it."""
        if (self._lock_dir / f"{image_id}.lock").exists():
            return
        use = self._image_lock(image_id, use=True)
        if use.try_acquire():
            try:
                _unlink_held(use)
            finally:
                use.release()

    async def _deploy(self, image_id: str, instance: str) -> DeployResult:
        """``deploy``, holding the image's use lock: no removal can take its cache disk."""
        start = time.monotonic()
        disk = instance_disk_name(instance)
        if not self._swept:  # the first deploy clears what clones killed mid-way left
            self._swept = True
            await self._remove_dead_temporaries()
        if await self.vg.disk_size(disk) is not None:  # refuses a symlink there too
            raise DiskExists(f"instance {instance} already has a disk {disk}", image_id=image_id)
        outcome: Outcome | None = None
        fetched = 0
        for attempt in range(3):  # an operator's rm of the cache disk may slip in meanwhile
            ensured, copy = await self._ensure_for(image_id, disk if attempt == 0 else None)
            # a download on any attempt is this deploy's miss, and all its bytes count
            if outcome is None or ensured.result is Outcome.MISS:
                outcome = ensured.result
            fetched += ensured.bytes_fetched
            if copy is not None:  # the download wrote this deploy's disk too: no clone
                await self._publish_copy(image_id, copy, disk)
                cache_disk = ensured.cache_disk
            else:
                async with self._clones, self._image_lock(image_id, shared=True):
                    entry = await self._ready(image_id)
                    if entry is None:
                        continue
                    # a cancelled deploy leaves no disk: the clone (a thread) ends, then is undone
                    await complete_or_undo(
                        self._clone(image_id, entry.cache_disk, disk), lambda: self.vg.delete(disk)
                    )
                cache_disk = entry.cache_disk
            return DeployResult(
                image_id=image_id,
                instance=instance,
                disk=disk,
                cache_disk=cache_disk,
                result=outcome,
                bytes_fetched=fetched,
                seconds=time.monotonic() - start,
            )
        raise CacheError(
            "its cache disk was removed from under the deploy three times "
            "(by something other than this cache's prune)",
            image_id=image_id,
        )

    # -- the cache's contents -----------------------------------------------------------

    async def entries(self) -> list[CacheEntry]:
        """Every image in the index, ready or being filled by a live process.

        A ``filling`` entry whose image lock is free is what a dead process left, not a
        download: it is cleared (as ``sweep`` would) and not listed. Reads only, otherwise:
        it works on a full VG (the clearing is then left to a later call)."""
        await self._begin()
        listed = []
        for entry in await self._db(self._index.entries):
            if not is_cache_disk_name_of(entry.image_id, entry.cache_disk):
                continue  # altered to name a disk not the image's: never shown, swept away
            if entry.state is EntryState.FILLING and not self._flights.in_flight(entry.image_id):
                lock = self._image_lock(entry.image_id)
                if lock.try_acquire():  # nobody is filling it: a dead writer's leftover
                    try:
                        with contextlib.suppress(StorageError):
                            if (recovered := await self._recover(entry.image_id)) is None:
                                _unlink_held(lock)
                            else:
                                listed.append(recovered)
                    finally:
                        lock.release()
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
        lock = self._image_lock(image_id)
        if not lock.try_acquire():
            return False
        use = self._image_lock(image_id, use=True)
        try:
            # a download may have started meanwhile; it waits for this lock, so keep the image
            if self._flights.in_flight(image_id) or not use.try_acquire():
                return False  # ... and a deploy holds the use lock from start to end
            entry = await self._db(self._index.get, image_id)
            if entry is None:
                _unlink_held(lock)  # the lock file this call just created
                _unlink_held(use)
                return False
            if entry.state is not EntryState.READY:
                return False
            if time.time() - entry.last_used < idle_for:
                return False
            if unused_since is not None and entry.last_used >= unused_since:
                return False
            with _about(image_id):
                if not await self._owns_disk(entry):
                    await self._db(self._index.delete, image_id)  # a row naming another disk
                    return False
                # disk first: a crash in between leaves an entry whose disk is gone, which the
                # next ensure recognises, rather than an unknown i_ disk that nothing removes;
                # and on a full VG, the index can only be written once the disk is gone
                await self.vg.delete(entry.cache_disk)
                await self._db(self._index.delete, image_id)
            _unlink_held(lock)
            _unlink_held(use)
            log.info("removed cache disk %s of image %s", entry.cache_disk, image_id)
            return True
        finally:
            use.release()
            lock.release()

    async def mark_used(self, image_ids: Collection[str], when: float | None = None) -> None:
        """Record that these images are in use now (nova's manager does this each pass, as
        libvirt's touches its base files), so their minimum age counts from their last use."""
        when = time.time() if when is None else when
        await self._begin()
        for image_id in {validate_image_id(i) for i in image_ids}:
            await self._db(self._index.touch, image_id, when)

    async def sweep(self) -> list[str]:
        """Remove what dead processes left, and return the names of the disks removed.

        Partial downloads of images whose lock is free (their process died), the index entries
        and lock files that belonged to them, and clones that a crash interrupted. Whatever a
        live process (this one or another) is still doing is left alone.
        """
        await self._begin()
        removed = await self._remove_dead_temporaries()
        known = {e.image_id: e for e in await self._db(self._index.entries)}
        # a crash's filling entries, and entries altered to name a disk not the image's
        candidates = {i for i, e in known.items() if not _plausible(e)}
        for path in [*self._lock_dir.glob("*.lock"), *self._lock_dir.glob("*.use")]:
            try:
                candidates.add(validate_image_id(path.name.rpartition(".")[0]))
            except InvalidInput:
                continue  # not one of ours
        for image_id in sorted(candidates):
            entry = known.get(image_id)
            if self._flights.in_flight(image_id) or (entry and _plausible(entry)):
                continue
            lock = self._image_lock(image_id)
            if not lock.try_acquire():
                continue  # a live process is filling, removing or cloning it
            try:
                with _about(image_id):
                    if await self._recover(image_id) is None:
                        _unlink_held(lock)
                        use = self._image_lock(image_id, use=True)
                        if use.try_acquire():  # else a deploy is starting: it is its file
                            _unlink_held(use)
                            use.release()
            finally:
                lock.release()
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
        ``max_count``. An image in ``in_use``, or being deployed or downloaded, is kept, and so
        is one used at or after ``in_use_as_of`` (when ``in_use`` was determined; default: now),
        whose users ``in_use`` may not show. Images in ``in_use`` count as used now.

        Never waits on a busy image (see ``remove``): a slow download delays no pass.
        """
        busy = {validate_image_id(i) for i in in_use}
        if min_age < 0 or (max_bytes is not None and max_bytes < 0) or (max_count or 0) < 0:
            raise InvalidInput("min_age, max_bytes and max_count must not be negative")
        as_of = time.time() if in_use_as_of is None else in_use_as_of
        await self.sweep()  # what crashed processes left, before judging sizes and counts
        ready = [e for e in await self.entries() if e.state is EntryState.READY]
        ready.sort(key=lambda e: e.last_used)
        now = time.time()
        removed: list[str] = []
        kept: list[CacheEntry] = []
        for entry in ready:
            old = now - entry.last_used >= min_age
            if (
                entry.image_id not in busy
                and old
                and await self.remove(entry.image_id, idle_for=min_age, unused_since=as_of)
            ):
                removed.append(entry.cache_disk)
            else:
                kept.append(entry)

        def over() -> bool:
            return (max_bytes is not None and sum(e.size for e in kept) > max_bytes) or (
                max_count is not None and len(kept) > max_count
            )

        for entry in list(kept):  # least recently used first
            if not over():
                break
            if entry.image_id not in busy and await self.remove(entry.image_id, unused_since=as_of):
                kept.remove(entry)
                removed.append(entry.cache_disk)
        # after the removals: on a full VG the index can be written only once disks are gone
        await self.mark_used(busy, as_of)
        return PruneResult(removed=removed, kept=[e.cache_disk for e in kept])

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
        self._index.close()

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    async def _db(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _image_lock(self, image_id: str, *, shared: bool = False, use: bool = False) -> FileLock:
        """The image's lock file, or (``use``) the one deploys hold from start to end."""
        return FileLock(
            self._lock_dir / f"{image_id}.{'use' if use else 'lock'}",
            shared=shared,
            poll=self.settings.lock_poll,
        )

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
        if not await self._db(self._index.needs_rebuild):
            return
        try:
            adopted = await self.rebuild_index()
        except InsufficientSpace as exc:  # a full VG: lists and prunes must still work
            log.info("cache index not rebuilt yet (the next process tries again): %s", exc)
            return
        await self._db(self._index.rebuilt)
        if adopted:
            log.warning("cache index rebuilt from the disks: %s", " ".join(adopted))

    async def rebuild_index(self) -> list[str]:
        """Enter into the index every cache disk of the VG that it lacks; return their names.

        A disk is entered only when its name has the cache's shape, its recorded identity
        (``VolumeGroup.disk_identity``) names a valid image id for which the cache would give
        that name, and its size is the recorded size; it enters as ``ready``, used now (so a
        prune keeps it for ``min_age``). Run automatically when the index was missing, emptied
        or unreadable (see ``index``); safe to run at any time, in any process."""
        adopted = []
        now = time.time()
        for disk in await self.vg.list_disks():
            if not is_cache_disk_name(disk.name):
                continue
            identity = await self.vg.disk_identity(disk.name)
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
            if await self._db(self._index.adopt, entry):
                adopted.append(disk.name)
        return adopted

    async def _owns_disk(self, entry: CacheEntry) -> bool:
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
        identity = await self.vg.disk_identity(entry.cache_disk)
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

    async def _remove_dead_temporaries(self) -> list[str]:
        removed = await self.vg.remove_dead_temporaries()
        if removed:
            log.info("removed what dead processes left: %s", " ".join(removed))
        return removed

    async def _ensure_for(
        self, image_id: str, disk: str | None
    ) -> tuple[EnsureResult, PartialDisk | None]:
        """``ensure`` for a deploy; a download it starts may also write ``disk`` (a tee): then
        the unpublished copy comes back with the result, and publishing it is the caller's."""
        if disk is None or not self.settings.tee:
            return await self._ensure(image_id, None), None
        rider = _Rider(disk)
        try:
            ensured = await self._ensure(image_id, rider)
        except BaseException:
            await rider.leave()
            raise
        return ensured, rider.take()

    async def _publish_copy(self, image_id: str, copy: PartialDisk, disk: str) -> None:
        try:
            # a cancelled deploy leaves no disk: the publish (threads) ends, then is undone
            await complete_or_undo(copy.publish(disk), lambda: self.vg.delete(disk))
        except BaseException:
            await finish(copy.discard())
            raise
        await self._touch_or_undo(image_id, disk)

    async def _clone(self, image_id: str, cache_disk: str, disk: str) -> None:
        await self.vg.clone(cache_disk, disk)
        await self._touch_or_undo(image_id, disk)

    async def _touch_or_undo(self, image_id: str, disk: str) -> None:
        """Record the use of a deploy's new disk; a deploy that fails here (the index full)
        leaves no disk behind, so the same instance can be deployed again at once."""
        try:
            await self._db(self._index.touch, image_id, time.time())
        except BaseException:
            await finish(self.vg.delete(disk))
            raise

    async def _ready(self, image_id: str) -> CacheEntry | None:
        """The image's entry if it is ready and its disk is there, else None."""
        entry = await self._db(self._index.get, image_id)
        if entry is None or entry.state is not EntryState.READY:
            return None
        if not is_cache_disk_name_of(image_id, entry.cache_disk):
            return None  # a row altered to name another disk: _recover drops it
        if await self.vg.disk_size(entry.cache_disk) != entry.size:
            return None
        return entry

    async def _fill(self, image_id: str, rider: _Rider | None) -> _Fill:
        """The one download of a flight: runs as its own task (see ``SingleFlight``)."""
        if self.glance is None:
            raise NoGlanceEndpoint(
                "not cached, and no Glance endpoint to fetch it from "
                "(--glance-url, PVMCACHE_GLANCE_URL)",
                image_id=image_id,
            )
        async with self._downloads:
            lock = self._image_lock(image_id)
            waited = not lock.try_acquire()
            if waited:
                await lock.acquire()  # another process is filling or removing this image
            cached = False  # else the lock file goes with the failed attempt
            try:
                entry = await self._recover(image_id)
                if entry is not None:
                    cached = True
                    return _Fill(entry, Outcome.JOINED if waited else Outcome.HIT, 0)
                info = await self.glance.get_image(image_id)
                entry = await self._record_filling(info)
                try:
                    fetched, copy = await self._download(self.glance, info, entry, rider)
                except BaseException:
                    await finish(self._db(self._index.delete, image_id))
                    raise
                now = time.time()
                try:
                    await self._db(self._index.mark_ready, image_id, now)
                except BaseException:
                    # unrecorded, the published disk would be nobody's (the index is what makes
                    # a disk the cache's own), so it goes too
                    await finish(self._unpublish(entry))
                    if copy is not None:
                        await finish(copy.discard())
                    raise
                cached = True
                if copy is not None:
                    assert rider is not None
                    await rider.hand_over(copy)
                log.info("cached image %s as %s (%d bytes)", image_id, entry.cache_disk, fetched)
                return _Fill(
                    replace(entry, state=EntryState.READY, created=now, last_used=now),
                    Outcome.MISS,
                    fetched,
                )
            except StorageError as exc:
                if exc.image_id is None:  # e.g. ENOSPC mid-write, or the index's disk is full
                    raise type(exc)(exc.message, image_id=image_id) from exc
                raise
            finally:
                if not cached:
                    _unlink_held(lock)
                    self._drop_use_file(image_id)
                lock.release()

    async def _unpublish(self, entry: CacheEntry) -> None:
        await self.vg.delete(entry.cache_disk)
        with contextlib.suppress(StorageError):  # left behind, the next _recover clears it
            await self._db(self._index.delete, entry.image_id)

    async def _recover(self, image_id: str) -> CacheEntry | None:
        """Under the image's exclusive lock: clear what a dead process left, return a ready entry.

        Holding the lock proves no live process is filling this image, so a ``filling`` entry
        is a leftover of a crash (and its partial disk, whose owner is dead, goes with the
        VG's dead temporaries). An entry that names a disk not the cache's own is dropped,
        and that disk left alone.
        """
        await asyncio.to_thread(discard_record, self.vg.state_dir, image_id)
        entry = await self._db(self._index.get, image_id)
        if entry is None:
            return None
        if entry.state is EntryState.FILLING:  # its writer died: give its room back first
            await self._remove_dead_temporaries()
        if not await self._owns_disk(entry):
            await self._db(self._index.delete, image_id)
            return None
        size = await self.vg.disk_size(entry.cache_disk)
        if size == entry.size:
            if entry.state is EntryState.FILLING:  # published, then died before recording it
                await self._db(self._index.mark_ready, image_id, time.time())
                entry = replace(entry, state=EntryState.READY)
            return entry
        if size is not None:  # ours, but not what we published: never hand it out
            await self.vg.delete(entry.cache_disk)
        await self._db(self._index.delete, image_id)
        return None

    @contextlib.asynccontextmanager
    async def _space_for(self, info: ImageInfo) -> AsyncIterator[_Claim]:
        """Refuse a download up front unless the VG has room for the image besides what the
        downloads under way have still to write; hold the claim meanwhile.

        A VG whose partial disks reserve their room (``reserves_space``) counts every download
        in its free space, in any process; otherwise this process counts its own claims."""
        counted = await self.vg.reserves_space()
        free = (await self.vg.capacity()).free
        promised = 0 if counted else sum(c.size - c.written for c in self._claims)
        if free - promised < info.size:
            raise InsufficientSpace(
                f"needs {info.size} bytes but the volume group has {free} bytes free"
                + (f", {promised} of them promised to downloads under way" if promised else ""),
                image_id=info.id,
            )
        claim = _Claim(info.size)  # no await since the sum: no other claim slipped in
        self._claims.append(claim)
        try:
            yield claim
        finally:
            self._claims.remove(claim)

    async def _record_filling(self, info: ImageInfo) -> CacheEntry:
        """Record a ``filling`` entry under the first cache disk name that is free."""
        now = time.time()
        for name in itertools.islice(cache_disk_names(info.id), MAX_CACHE_NAMES):
            if await self.vg.disk_size(name) is not None:
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
            if await self._db(self._index.insert, entry):
                return entry
        raise StorageError(
            f"all {MAX_CACHE_NAMES} cache disk names of the image are taken", image_id=info.id
        )

    async def _download(
        self, glance: GlanceClient, info: ImageInfo, entry: CacheEntry, rider: _Rider | None
    ) -> tuple[int, PartialDisk | None]:
        """Download into the published cache disk; return the bytes fetched and the rider's
        copy, complete but unpublished (None when there was none or it was dropped)."""
        async with self._space_for(info) as claim:
            identity = DiskIdentity(info.id, info.size, info.digest_algo, info.digest)
            partial = await self.vg.create_partial(
                partial_disk_name(), info.size, identity=identity
            )
            tee: _Tee | None = None
            try:
                if rider is not None and not rider.left:
                    try:
                        copy = await self.vg.create_copy(rider.disk, info.size)
                    except StorageError as exc:  # the deploy will clone instead
                        log.info("image %s: no disk written alongside: %s", info.id, exc.message)
                        copy = None
                    tee = None if copy is None else _Tee(partial, copy, rider)
                sink = _Counted(partial if tee is None else tee, claim)
                async with self.progress.meter(info.id, info.size) as meter:
                    fetched = await glance.download(info, meter.sink(sink))
                await self._publish_cache_disk(partial, entry.cache_disk, identity)
            except BaseException:
                await finish(partial.discard())
                if tee is not None and tee.copy is not None:
                    await finish(tee.copy.discard())
                raise
        return fetched, None if tee is None else tee.copy

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
            if await self.vg.disk_identity(name) != identity:
                raise
            log.warning(
                "%s already holds image %s, verified by another writer", name, identity.image_id
            )
            await finish(partial.discard())


def _plausible(entry: CacheEntry) -> bool:
    """A ready entry that names one of its image's cache disk names."""
    return entry.state is EntryState.READY and is_cache_disk_name_of(
        entry.image_id, entry.cache_disk
    )


@contextlib.contextmanager
def _about(image_id: str) -> Iterator[None]:
    """A storage failure raised inside names the image (the VG's own errors cannot)."""
    try:
        yield
    except StorageError as exc:
        if exc.image_id is None:
            raise type(exc)(exc.message, image_id=image_id) from exc
        raise


def _unlink_held(lock: FileLock) -> None:
    """Remove a lock file while holding it exclusively; waiters notice and use a new one."""
    assert lock.held and not lock.shared
    lock.path.unlink(missing_ok=True)
