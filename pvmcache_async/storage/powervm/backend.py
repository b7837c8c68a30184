"""The PowerVM volume group: every disk is a virtual disk (logical volume) of a VG on a VIOS.

This module is the backend; ``powervm_spec`` parses the ``powervm:`` spec and logs on,
``powervm_stream`` carries the bytes from the event loop to pypowervm's upload thread.

Driven through the PowerVM REST API with pypowervm, as nova-powervm's localdisk driver was:
``find_vg`` locates the VG, ``upload_new_vdisk`` streams a download into a new disk,
``crt_copy_vdisk`` clones on the server side and ``rm_vg_storage`` deletes. pypowervm blocks,
so every call runs in a worker thread; uploads run in the VG's own small thread pool, so that
long uploads never starve the event loop's default executor.

``upload_new_vdisk`` creates the disk under its name *before* streaming into it, so a download
is uploaded under the partial name and renamed to its ``i_`` name only in ``publish``, after
the digest matched. The stream reaches pypowervm's reading thread through a bounded
``powervm_stream.StreamBuffer``: the download waits while the buffer is full, the upload waits while
it is empty, and the end of the stream is only sent in ``publish``, so an upload whose digest
failed never completes on the server.

Each partial disk has a fresh name of its writer's own, and an owner lock in
``state_dir/owners`` (``locks.OwnerLocks``) held from before the upload creates it until it is
renamed or removed, so ``remove_dead_temporaries`` removes the partials of a dead process and
never a live one's. ``publish`` renames the disk by the udid its own upload created, never by
name. A published cache disk carries the image id as its label: ``disk_identity`` reads it.
It records no digest and cannot read a disk back (``disk_digest``: the default None).

PowerVM sizes disks in whole GB, so a disk is larger than the image it holds. The exact byte
size of each disk this backend filled or cloned is kept beside the index (``state_dir/disks``),
keyed by the disk's udid, so that ``disk_size`` reports the image's size for the core's check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pvmcache_async.core.statefiles import read_json, write_json
from pvmcache_async.errors import (
    CacheError,
    DiskExists,
    InsufficientSpace,
    InvalidInput,
    StorageError,
)
from pvmcache_async.locks import FileLock, OwnerLocks, SharedRead, private_dir
from pvmcache_async.names import MAX_DISK_NAME, PARTIAL_PREFIX, is_temporary_name
from pvmcache_async.storage.base import Capacity, DiskIdentity, DiskInfo, VolumeGroup
from pvmcache_async.storage.checks import cause, check_disk_name, storage_error
from pvmcache_async.storage.powervm.partial import PowerVMPartialDisk
from pvmcache_async.storage.powervm.spec import DEFAULT_BUFFER, connect, parse_spec
from pvmcache_async.storage.powervm.state import (
    GB,
    HTTP_BAD_REQUEST,
    MAX_UPLOADS,
    RECORD_CAP,
    RENAME_TRIES,
    STRAY_AGE,
    TIMED_OUT,
    VG_BINDING,
    VG_LOCK_FILE,
    VOL_GRP_LOCK,
    Target,
    VDiskState,
    VGState,
    disk_name,
    http_status,
    is_etag_mismatch,
    read_record,
    seen_at,
)

with warnings.catch_warnings():  # pypowervm pulls in eventlet, which warns on stderr at import
    warnings.simplefilter("ignore")
    from oslo_concurrency import lockutils
    from pypowervm import const as pvm_const
    from pypowervm import exceptions as pvm_exc
    from pypowervm.tasks import storage as pvm_stg
    from pypowervm.wrappers import managed_system as pvm_ms
    from pypowervm.wrappers import storage as pvm_stor
    from pypowervm.wrappers import vios_file as pvm_vf
    from pypowervm.wrappers import virtual_io_server as pvm_vios

log = logging.getLogger(__name__)
T = TypeVar("T")


assert MAX_DISK_NAME <= pvm_const.MaxLen.VDISK_NAME  # names.py keeps names within PowerVM's


# -- errors and the spec -----------------------------------------------------------------


def open_powervm_vg(rest: str) -> PowerVMVG:
    """``storage.open_vg``'s entry point. Connecting waits until the VG is first used."""
    spec = parse_spec(rest)
    return PowerVMVG(
        lambda: connect(spec),
        spec.vg,
        vios_name=spec.vios,
        system_name=spec.system,
        state_dir=spec.state_dir or spec.default_state_dir(),
        spec=spec.text(),
        buffer_bytes=spec.buffer_bytes,
        claims_dir=spec.claims_dir(),
    )


# -- the backend --------------------------------------------------------------------------


class PowerVMVG(VolumeGroup):
    """A volume group of a VIOS, through the PowerVM REST API."""

    def __init__(
        self,
        adapter_factory: Callable[[], Any],
        vg_name: str,
        *,
        state_dir: Path,
        vios_name: str | None = None,
        system_name: str | None = None,
        spec: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER,
        claims_dir: Path | None = None,
    ) -> None:
        self.vg_name = vg_name
        self.vios_name = vios_name
        self.system_name = system_name
        self.spec = spec or f"powervm:vg={vg_name}" + (f",vios={vios_name}" if vios_name else "")
        self.state_dir = state_dir
        self.buffer_bytes = buffer_bytes
        self._adapter_factory = adapter_factory
        self._target: Target | None = None
        self._target_lock = threading.Lock()
        self._uploads: concurrent.futures.ThreadPoolExecutor | None = None
        self._upload_slots = asyncio.Semaphore(MAX_UPLOADS)
        self.live: set[PowerVMPartialDisk] = set()  # partial disks not yet published or discarded
        self.waiting_changes = 0  # changes waiting for the change lock (for tests, diagnostics)
        self._counting = threading.Lock()
        # the reads that change nothing share one GET of the VG (a slow REST call, and a deploy
        # storm asks it hundreds of times at once); changes read it afresh for their etag
        self._state: SharedRead[VGState] = SharedRead(
            lambda: self._call("reading the volume group", lambda: VGState.of(self._read_vg()))
        )
        self._records = state_dir / "disks"
        try:
            self._records.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"VG {self.spec}: cannot create the state directory {state_dir} ({exc.strerror})"
            ) from exc
        private_dir(state_dir)
        self.owners = OwnerLocks(private_dir(state_dir / "owners"))
        self._files = private_dir(state_dir / "files")  # uploads' Files left on the server
        self._strays = private_dir(state_dir / "strays")  # temporaries without an owner file
        self._timed_out = private_dir(state_dir / "timed_out")  # copies the client gave up on
        self._claims = None if claims_dir is None else private_dir(claims_dir)

    # -- plumbing -----------------------------------------------------------------------

    def upload_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._uploads is None:
            self._uploads = concurrent.futures.ThreadPoolExecutor(
                MAX_UPLOADS, thread_name_prefix="pvmcache-upload"
            )
        return self._uploads

    def release_upload_slot(self, partial: PowerVMPartialDisk) -> None:
        self.live.discard(partial)
        self._upload_slots.release()

    def target_sync(self) -> Target:
        """Connect and find the VG once (blocking: worker threads only)."""
        with self._target_lock:
            if self._target is None:
                adapter = self._adapter_factory()
                vios_w, vg_w = self._find(adapter)
                self._bind(vios_w, vg_w)
                self._target = Target(adapter, vios_w.uuid, vg_w.uuid)
            return self._target

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except CacheError:
            raise
        except Exception as exc:
            raise storage_error(f"VG {self.spec}: {what}", exc) from exc

    def _read_vg(self) -> Any:
        t = self.target_sync()
        return pvm_stor.VG.get(
            t.adapter, t.vg_uuid, parent_type=pvm_vios.VIOS, parent_uuid=t.vios_uuid
        )

    def check_name(self, name: str) -> None:
        check_disk_name(name, pvm_const.MaxLen.VDISK_NAME)

    @contextlib.contextmanager
    def changing(self, *, pypowervm_locks: bool = False) -> Iterator[None]:
        """Every change of the VG runs inside (blocking: worker threads only).

        pypowervm's ``crt_vdisk`` PUTs the VG it read without If-Match: a change made by
        anyone between its GET and its PUT is lost (a rename undone, a new disk dropped).
        So every change holds the state directory's ``vg.lock`` (every thread and process
        of this host on this VG) and pypowervm's own ``vol_grp_lock`` (every thread of this
        process, code that is not ours included), in that order. ``pypowervm_locks``: the
        body calls a pypowervm task that takes ``vol_grp_lock`` itself (it is not reentrant).
        """
        lock = FileLock(self.state_dir / VG_LOCK_FILE)
        delay = 0.001
        with self._counting:
            self.waiting_changes += 1
        try:
            while not lock.try_acquire():
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            with self._counting:
                self.waiting_changes -= 1
        try:
            if pypowervm_locks:
                yield
            else:
                with lockutils.lock(VOL_GRP_LOCK):
                    yield
        finally:
            lock.release()

    def check_room(self, vg_w: Any, name: str, gb: int) -> None:
        """Refuse a disk of ``gb`` GB that the VG (as read under the change lock) cannot hold:
        ``InsufficientSpace``, not the VIOS's error after the fact."""
        free = VGState.of(vg_w).capacity.free
        if gb * GB > free:
            raise InsufficientSpace(
                f"disk {name} needs {gb} GB but the volume group has {free // GB} GB free"
            )

    def remove_file(self, vio_file: Any) -> None:
        """Remove an upload's File (a VIOS keeps 100); one that cannot be removed now is
        recorded, for ``remove_dead_temporaries`` to try again."""
        try:
            vio_file.adapter.delete(vio_file.schema_type, root_id=vio_file.uuid, service="web")
        except pvm_exc.HttpNotFound:
            pass
        except Exception as exc:
            log.warning("the File %s of an upload is left (%s); retried later", vio_file.uuid, exc)
            (self._files / vio_file.uuid).touch()
        else:
            (self._files / vio_file.uuid).unlink(missing_ok=True)

    def _dead_candidates(self, disks: dict[str, VDiskState]) -> list[str]:
        """The temporary disks that may be removed if their owner lock is free: those with
        an owner file, and strays (no owner file) seen for ``STRAY_AGE`` (``_strays``)."""
        owned = [n for n in sorted(disks) if (self.owners.directory / f"{n}.lock").exists()]
        now = time.time()
        old = []
        for name in sorted(set(disks) - set(owned)):
            first = read_record(self._strays, name, "stray record")
            if first is None or first.get("udid") != disks[name].udid:
                log.info("disk %s has no owner here; left until it is %d s old", name, STRAY_AGE)
                write_json(self._strays, f"{name}.json", {"udid": disks[name].udid, "seen": now})
            elif seen_at(first) > now:  # a time ahead of the clock: counted from now
                write_json(self._strays, f"{name}.json", {"udid": disks[name].udid, "seen": now})
            elif now - seen_at(first) >= STRAY_AGE:
                old.append(name)
        for record in self._strays.glob("*.json"):  # strays gone meanwhile
            if record.stem not in disks:
                record.unlink(missing_ok=True)
        return owned + old

    def _find(self, adapter: Any) -> tuple[Any, Any]:
        """The VIOS and the VG the spec names, and only it: pypowervm's ``find_vg`` takes the
        first VG of that name on any VIOS of any managed system of an HMC. Here the managed
        system must be named (``system=``) where there are several, and a VG name found on
        more than one VIOS needs ``vios=``."""
        systems = pvm_ms.System.get(adapter)
        if self.system_name is not None:
            systems = [m for m in systems if m.system_name == self.system_name]
            if not systems:
                raise StorageError(f"VG {self.spec}: no managed system {self.system_name}")
        elif len(systems) > 1:
            names = ", ".join(sorted(m.system_name for m in systems))
            raise InvalidInput(
                f"VG {self.spec}: the REST server manages {len(systems)} systems ({names}); "
                "name one (system=)"
            )
        vioses = pvm_vios.VIOS.get(adapter, parent=systems[0])
        if self.vios_name is not None:
            vioses = [v for v in vioses if v.name == self.vios_name]
            if not vioses:
                raise StorageError(f"VG {self.spec}: no VIOS {self.vios_name}")
        hits = [
            (v, g)
            for v in vioses
            for g in pvm_stor.VG.get(adapter, parent=v)
            if g.name == self.vg_name
        ]
        if not hits:
            raise StorageError(f"VG {self.spec}: no volume group {self.vg_name}")
        if len(hits) > 1:
            names = ", ".join(sorted(v.name for v, _ in hits))
            raise InvalidInput(
                f"VG {self.spec}: a volume group {self.vg_name} is on VIOSes {names}; "
                "name one (vios=)"
            )
        return hits[0]

    def _bind(self, vios_w: Any, vg_w: Any) -> None:
        """Tie the state directory to the VG it serves (by uuid), and the VG to one state
        directory on this host (``claims_dir``): two spellings of one VG never get two
        indexes and two sets of owner locks, and two VGs never share one."""
        mine = {"vios": vios_w.uuid, "vg": vg_w.uuid}
        path = self.state_dir / VG_BINDING
        bound = read_json(self.state_dir, VG_BINDING, dict, what="VG binding", cap=RECORD_CAP)
        if bound is None and os.path.lexists(path):
            raise StorageError(f"VG {self.spec}: {path} is unreadable (see the warning)")
        if bound is not None and bound != mine:
            raise StorageError(
                f"VG {self.spec}: the state directory {self.state_dir} belongs to another "
                f"volume group (uuid {bound.get('vg') if isinstance(bound, dict) else '?'}); "
                "give this one a state_dir of its own"
            )
        if bound is None:
            write_json(self.state_dir, VG_BINDING, mine)
        if self._claims is None:
            return
        claim = self._claims / str(vg_w.uuid)
        here = str(self.state_dir.resolve())
        for _ in range(2):
            try:
                os.symlink(here, claim)
                return
            except FileExistsError:
                other = os.readlink(claim)
            if other == here:
                return
            if Path(other, VG_BINDING).exists():
                raise StorageError(
                    f"VG {self.spec}: volume group {vg_w.name} is already cached on this host "
                    f"with the state directory {other}: use that one (state_dir={other})"
                )
            claim.unlink(missing_ok=True)  # a state directory removed since: claim it anew
        raise StorageError(f"VG {self.spec}: cannot claim {claim}")

    def _remove_timed_out(self) -> list[str]:
        """Remove the disks of copies that timed out on the client, ``TIMED_OUT`` seconds
        after: by then the VIOS has ended the copy (pypowervm gives a copy 60 minutes)."""
        removed = []
        for record in sorted(self._timed_out.glob("*.json")):
            marked = read_record(self._timed_out, record.stem, "timed-out copy record")
            seen = 0.0 if marked is None else seen_at(marked)
            if seen > time.time():  # a time ahead of the clock: counted from now
                write_json(self._timed_out, record.name, {"seen": time.time()})
                continue
            if time.time() - seen < TIMED_OUT:
                continue
            vg_w = self._read_vg()
            if self._named(vg_w, record.stem):
                self.delete_sync(record.stem)
                removed.append(record.stem)
            record.unlink(missing_ok=True)
        return removed

    def _remove_left_files(self) -> None:
        target = self.target_sync()
        for left in sorted(self._files.iterdir()):
            with contextlib.suppress(Exception):
                target.adapter.delete(pvm_vf.File.schema_type, root_id=left.name, service="web")
                left.unlink()

    def delete_sync(self, name: str, udid: str | None = None) -> None:
        """Remove disk ``name`` (only the one of ``udid`` if given), under the change lock."""
        with self.changing(pypowervm_locks=True):
            vg_w = self._read_vg()
            found = [d for d in self._named(vg_w, name) if udid is None or d.udid == udid]
            if found:
                pvm_stg.rm_vg_storage(vg_w, vdisks=found)  # retries on etag mismatch itself
            self._forget(name)

    @staticmethod
    def _named(vg_w: Any, name: str) -> list[Any]:
        return [d for d in vg_w.virtual_disks if disk_name(d) == name]

    # -- the exact sizes of the disks this backend filled --------------------------------

    def _record_path(self, name: str) -> Path:
        return self._records / f"{name}.json"

    def _record(self, name: str, udid: str, size: int) -> None:
        write_json(self._records, f"{name}.json", {"udid": udid, "size": size})

    def _forget(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)

    def _sized(self, disk: VDiskState) -> int:
        """The exact size this backend recorded for the disk, else its size in whole GB."""
        record = read_record(self._records, disk.name, "disk size record")
        if record is not None and record.get("udid") == disk.udid and disk.udid:
            size = record.get("size")
            if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 1 << 50:
                return size
        return round(disk.capacity_gb * GB)

    async def _disks(self) -> tuple[VDiskState, ...]:
        """The VG's disks as a read begun after this call saw them."""
        return (await self._state()).disks

    # -- the protocol -------------------------------------------------------------------

    async def list_disks(self) -> list[DiskInfo]:
        seen = await self._disks()

        def sized() -> list[DiskInfo]:
            return sorted((DiskInfo(d.name, self._sized(d)) for d in seen), key=lambda d: d.name)

        return await self._call("listing disks", sized)

    async def disk_size(self, name: str) -> int | None:
        self.check_name(name)
        found = [d for d in await self._disks() if d.name == name]
        if not found:
            return None
        return await self._call(f"reading disk {name}", self._sized, found[0])

    async def create_partial(
        self, name: str, size: int, *, identity: DiskIdentity | None = None
    ) -> PowerVMPartialDisk:
        """Start a disk under the partial ``name``; the image id of ``identity`` becomes its
        label on publish (the exact size is recorded beside the index, the digest is not)."""
        self.check_name(name)
        if size < 1:
            raise InvalidInput(f"partial disk {name}: size {size} is not positive")
        if math.ceil(size / GB) * GB > (free := (await self.capacity()).free):
            raise InsufficientSpace(
                f"partial disk {name} needs {math.ceil(size / GB)} GB but the volume group has "
                f"{free // GB} GB free"
            )
        owner = await asyncio.to_thread(self.owners.own, name)
        try:
            if await self.disk_size(name) is not None:
                raise DiskExists(f"partial disk {name} already exists in the volume group")
            await self._upload_slots.acquire()  # held until publish or discard
        except BaseException:
            OwnerLocks.disown(owner)
            raise
        label = None if identity is None else identity.image_id
        partial = PowerVMPartialDisk(self, name, size, label, owner)
        self.live.add(partial)
        return partial

    async def reserves_space(self) -> bool:
        """True: ``crt_vdisk`` allocates a disk's whole size when the upload starts, so the
        VG's free space already leaves out every download under way (counted once)."""
        return True

    async def disk_identity(self, name: str) -> DiskIdentity | None:
        self.check_name(name)
        found = [d for d in await self._disks() if d.name == name and d.label]
        if not found:
            return None
        size = await self._call(f"reading disk {name}", self._sized, found[0])
        return DiskIdentity(str(found[0].label), size)

    async def remove_dead_temporaries(self) -> list[str]:
        """Remove the partial disks whose writer is dead: its owner file exists and is free.

        A missing owner file proves nothing here: the writer may be a process using another
        state directory, or another host (an HMC and a NovaLink reach one VIOS). Our own
        writers create their owner file before the disk and remove it after the disk is gone
        or renamed, so a disk of ours is never without one. Such a stray is left alone, and
        removed only once this state directory has seen it, same udid, for ``STRAY_AGE``.
        """
        await self._call("removing the Files of failed uploads", self._remove_left_files)
        removed = await self._call("removing timed-out copies", self._remove_timed_out)
        disks = {d.name: d for d in await self._disks() if is_temporary_name(d.name)}
        names = await self._call("looking at the owners", self._dead_candidates, disks)
        seen = set(names)
        dead = await asyncio.to_thread(self.owners.dead, names, (PARTIAL_PREFIX,))
        for owner in dead:
            name = OwnerLocks.name_of(owner)
            try:
                if name in seen:
                    await self.delete(name)
                    removed.append(name)
            finally:
                OwnerLocks.disown(owner)
        return removed

    def _taken_elsewhere(self, name: str) -> str | None:
        """The other VG of this VIOS that holds a disk ``name``, if one does: AIX names
        logical volumes per VIOS, not per VG, so such a name cannot be made here."""
        t = self.target_sync()
        for vg_w in pvm_stor.VG.get(t.adapter, parent_type=pvm_vios.VIOS, parent_uuid=t.vios_uuid):
            if vg_w.uuid != t.vg_uuid and self._named(vg_w, name):
                return str(vg_w.name)
        return None

    def _check_free_sync(self, vg_w: Any, name: str) -> None:
        if self._named(vg_w, name):
            raise DiskExists(f"disk {name} already exists in the volume group")
        if (other := self._taken_elsewhere(name)) is not None:
            raise DiskExists(f"disk {name} already exists on this VIOS, in volume group {other}")

    async def rename(
        self, udid: str, name: str, final_name: str, label: str | None, size: int
    ) -> None:
        """Rename disk ``udid`` (now ``name``) to ``final_name`` of ``size`` bytes (grown to
        that many whole GB if it is smaller, in the same update); retry on etag mismatch.

        The rename is proven, not assumed: the VG that the update returned (and, if that
        disagrees, a fresh read) must show the disk of ``udid`` under ``final_name``. Where
        the VIOS ignores the rename, or refuses it (HTTP 400), the verified disk is published
        by a server-side copy into ``final_name`` instead (``_publish_by_copy``), and the
        partial removed."""

        gb = math.ceil(size / GB)  # a disk published larger than its upload grows with it

        def renamed(vg_w: Any) -> bool:
            return any(
                d.udid == udid and disk_name(d) == final_name and (d.capacity or 0) >= gb
                for d in vg_w.virtual_disks
            )

        def rename() -> bool:
            with self.changing():
                for _ in range(RENAME_TRIES):
                    vg_w = self._read_vg()
                    self._check_free_sync(vg_w, final_name)
                    disk = next((d for d in vg_w.virtual_disks if d.udid == udid), None)
                    if disk is None:
                        raise StorageError(f"disk {name} (udid {udid}) vanished before its rename")
                    disk.name = final_name
                    if (have := math.ceil(disk.capacity or 0)) < gb:
                        self.check_room(vg_w, final_name, gb - have)
                        disk.capacity = gb  # as nova-powervm's extend_disk grows a disk
                    if label is not None:
                        disk._label(label)  # a second record of the image id, beside the index
                    try:
                        after = vg_w.update()
                    except pvm_exc.HttpError as exc:
                        if is_etag_mismatch(exc):
                            log.debug("etag mismatch renaming %s to %s; retrying", name, final_name)
                            continue  # the VG changed under us: read it again
                        if http_status(exc) == HTTP_BAD_REQUEST:  # refused as such
                            log.warning(
                                "the VIOS refused to rename %s to %s (%s); publishing a copy",
                                name,
                                final_name,
                                cause(exc),
                            )
                            return False
                        raise
                    if not (renamed(after) or renamed(self._read_vg())):
                        log.warning(
                            "the VIOS did not rename %s to %s; publishing a copy of it instead",
                            name,
                            final_name,
                        )
                        return False
                    self._record(final_name, udid, size)
                    return True
            raise StorageError(
                f"renaming {name} to {final_name}: the VG kept changing ({RENAME_TRIES} tries)"
            )

        if not await self._call(f"publishing {name} as {final_name}", rename):
            await self._call(
                f"publishing {name} as {final_name} (a copy: the VIOS ignored the rename)",
                self._publish_by_copy,
                udid,
                name,
                final_name,
                label,
                size,
            )

    def _publish_by_copy(
        self, udid: str, name: str, final_name: str, label: str | None, size: int
    ) -> None:
        """Publish the verified disk ``udid`` (``name``) as a server-side copy into
        ``final_name``, then remove it. The copy is trusted only once it is complete: its size
        record (what ``disk_size`` reports exactly) and its label are written after the copy
        returned, and a disk under a cache disk's name without them is not handed out."""
        with self.changing(pypowervm_locks=True):
            vg_w = self._read_vg()
            found = [d for d in vg_w.virtual_disks if d.udid == udid]
            if not found:
                raise StorageError(f"disk {name} (udid {udid}) vanished before it was published")
            new = self._copy_sync(vg_w, VDiskState.of(found[0]), size, final_name, size)
        if label is not None:
            with self.changing():
                vg_w = self._read_vg()
                for d in vg_w.virtual_disks:
                    if d.udid == new.udid:
                        d._label(label)
                try:
                    vg_w.update()
                except pvm_exc.Error as exc:  # the index still knows the image; only a rebuild
                    log.warning("no label on %s (%s): a lost index would not find it", name, exc)
        self._record(final_name, new.udid, size)
        self.delete_sync(name, udid)

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        """A server-side copy (``crt_copy_vdisk``) of ``source`` into a new disk ``target``
        of ``size`` bytes (rounded up to whole GB by pypowervm, as nova-powervm's
        ``crt_copy_vdisk(..., flavor.root_gb)``); the VIOS fills what follows the source.

        The copy is one VG update, under the change lock (``changing``) for all of it: the
        VIOS answers once the copy is made, and ``crt_vdisk`` PUTs without If-Match."""
        self.check_name(source)
        self.check_name(target)

        seen = await self._disks()  # a quick refusal before taking the change lock
        if any(d.name == target for d in seen):
            raise DiskExists(f"disk {target} already exists in the volume group")
        if not any(d.name == source for d in seen):
            raise StorageError(f"cloning {source} to {target}: there is no disk {source}")

        def clone() -> None:
            with self.changing(pypowervm_locks=True):
                vg_w = self._read_vg()
                found = self._named(vg_w, source)
                if not found:
                    raise StorageError(f"cloning {source} to {target}: there is no disk {source}")
                src = VDiskState.of(found[0])
                have = self._sized(src)
                if size is not None and size < have:
                    raise InvalidInput(f"disk {target}: {size} bytes cannot hold {have}")
                new = self._copy_sync(vg_w, src, have, target, size)
            self._record(target, new.udid, have if size is None else size)

        await self._call(f"cloning {source} to {target}", clone)

    def _copy_sync(
        self, vg_w: Any, src: VDiskState, have: int, target: str, size: int | None
    ) -> Any:
        """``crt_copy_vdisk`` of ``src`` (``have`` bytes) into ``target`` of ``size`` bytes,
        in the VG as read under the change lock (``changing(pypowervm_locks=True)``, held)."""
        t = self.target_sync()
        self._check_free_sync(vg_w, target)
        self.check_room(vg_w, target, math.ceil(max(have, size or 0) / GB))
        before = {d.udid for d in vg_w.virtual_disks}
        try:
            return pvm_stg.crt_copy_vdisk(
                t.adapter,
                t.vios_uuid,
                t.vg_uuid,
                src.udid,
                have,
                target,
                d_size=size,
                file_format=src.file_format,
            )
        except pvm_exc.TimeoutError:
            # the VIOS may still be copying: removing the disk now could pull it from under
            # the copy. It is marked, and removed by a later sweep (TIMED_OUT).
            write_json(self._timed_out, f"{target}.json", {"seen": time.time()})
            raise
        except Exception:
            # a copy the server began under the target name must not pass for complete
            with contextlib.suppress(Exception):
                vg_now = self._read_vg()
                partial = [d for d in self._named(vg_now, target) if d.udid not in before]
                if partial:
                    pvm_stg.rm_vg_storage(vg_now, vdisks=partial)
            raise

    async def delete(self, name: str) -> None:
        self.check_name(name)
        await self._call(f"deleting disk {name}", self.delete_sync, name)

    async def capacity(self) -> Capacity:
        return (await self._state()).capacity

    async def close(self) -> None:
        for partial in list(self.live):  # an upload thread blocked in read() would never end
            await partial.discard()
        if self._uploads is not None:
            pool, self._uploads = self._uploads, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


__all__ = ["PowerVMPartialDisk", "PowerVMVG", "open_powervm_vg"]
