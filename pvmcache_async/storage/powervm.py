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

PowerVM sizes disks in whole GB, so a disk is larger than the image it holds. The exact byte
size of each disk this backend filled or cloned is kept beside the index (``state_dir/disks``),
keyed by the disk's udid, so that ``disk_size`` reports the image's size for the core's check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CacheError, DiskExists, InvalidInput, StorageError
from ..locks import FileLock, OwnerLocks, SharedRead, private_dir
from ..names import MAX_DISK_NAME, PARTIAL_PREFIX, is_temporary_name
from .base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup
from .checks import cause, check_disk_name, storage_error
from .powervm_spec import DEFAULT_BUFFER, connect, parse_spec
from .powervm_stream import StreamBuffer

with warnings.catch_warnings():  # pypowervm pulls in eventlet, which warns on stderr at import
    warnings.simplefilter("ignore")
    from pypowervm import const as pvm_const
    from pypowervm import exceptions as pvm_exc
    from pypowervm.tasks import storage as pvm_stg
    from pypowervm.wrappers import storage as pvm_stor
    from pypowervm.wrappers import virtual_io_server as pvm_vios

log = logging.getLogger(__name__)
T = TypeVar("T")

GB = 1 << 30  # pypowervm's sizes are in GB (GiB: util.convert_bytes_to_gb divides by 1024**3)
MAX_UPLOADS = 3  # pypowervm's own cap (tasks.storage._UPLOAD_SEM); more would only queue
RENAME_TRIES = 10

assert MAX_DISK_NAME <= pvm_const.MaxLen.VDISK_NAME  # names.py keeps names within PowerVM's


# -- errors and the spec -----------------------------------------------------------------


def _is_etag_mismatch(exc: BaseException) -> bool:
    resp = getattr(exc, "response", None)
    return (
        isinstance(exc, pvm_exc.HttpError)
        and getattr(resp, "status", None) == pvm_const.HTTPStatus.ETAG_MISMATCH
    )


def open_powervm_vg(rest: str) -> PowerVMVG:
    """``storage.open_vg``'s entry point. Connecting waits until the VG is first used."""
    spec = parse_spec(rest)
    return PowerVMVG(
        lambda: connect(spec),
        spec.vg,
        vios_name=spec.vios,
        state_dir=spec.state_dir or spec.default_state_dir(),
        spec=spec.text(),
        buffer_bytes=spec.buffer_bytes,
    )


# -- the backend --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    adapter: Any
    vios_uuid: str
    vg_uuid: str


@dataclass(frozen=True, slots=True)
class VDiskState:
    """One virtual disk as a read of the VG found it, as plain values."""

    name: str
    udid: str | None
    capacity_gb: float
    file_format: str | None
    label: str | None = None

    @classmethod
    def of(cls, vdisk: Any) -> VDiskState:
        return cls(
            _disk_name(vdisk), vdisk.udid, vdisk.capacity or 0.0, vdisk.file_format, vdisk.label
        )


def _disk_name(vdisk: Any) -> str:
    # a VDisk's name can come back as /path/to/name (see pypowervm's crt_vdisk)
    return (vdisk.name or "").split("/")[-1]


@dataclass(frozen=True, slots=True)
class VGState:
    """The VG as one GET found it (its disks, its capacity), as plain values made in the worker
    thread: every caller that shares the GET gets this, never pypowervm's wrapper."""

    disks: tuple[VDiskState, ...]
    capacity: Capacity

    @classmethod
    def of(cls, vg_w: Any) -> VGState:
        known = [v for v in (vg_w.available_size, vg_w.free_space) if v is not None]
        free_gb = min(known) if known else 0.0
        # disks are made in whole GB: only whole free GB can hold an image
        capacity = Capacity(total=int((vg_w.capacity or 0.0) * GB), free=math.floor(free_gb) * GB)
        return cls(tuple(VDiskState.of(d) for d in vg_w.virtual_disks), capacity)


class PowerVMPartialDisk(PartialDisk):
    """A disk being uploaded under its partial name; ``publish`` renames it after the check."""

    def __init__(
        self, vg: PowerVMVG, name: str, size: int, label: str | None, owner: FileLock
    ) -> None:
        self.name = name
        self.size = size
        self._vg = vg
        self._label = label
        self._owner = owner  # held until the disk is renamed or removed
        self._buffer: StreamBuffer | None = None
        self._upload: asyncio.Future[Any] | None = None
        self._closed = False

    @property
    def buffer(self) -> StreamBuffer | None:
        """The current upload's buffer (for tests and diagnostics)."""
        return self._buffer

    def _start(self) -> None:
        self._buffer = StreamBuffer(self._vg.buffer_bytes)
        self._upload = asyncio.get_running_loop().run_in_executor(
            self._vg.upload_executor(), self._run_upload, self._buffer
        )

    def _run_upload(self, buffer: StreamBuffer) -> Any:
        """In an upload thread: create the disk under the partial name and stream into it.

        pypowervm removes the disk itself when the stream fails (``_clean_out_bad_upload``).
        """
        try:
            target = self._vg.target_sync()
            vdisk, _file = pvm_stg.upload_new_vdisk(
                target.adapter,
                target.vios_uuid,
                target.vg_uuid,
                buffer,
                self.name,
                self.size,
                upload_type=pvm_stg.UploadType.IO_STREAM,
            )
        except BaseException as exc:
            buffer.reader_failed(exc)
            raise
        return vdisk

    async def _stop_upload(self, reason: str) -> None:
        """Abort the upload in flight and wait until its thread has let go."""
        if self._buffer is not None:
            self._buffer.abort(reason)
        if self._upload is not None:
            upload, self._upload = self._upload, None
            with contextlib.suppress(Exception):  # the abort itself, or what it interrupted
                await asyncio.shield(upload)

    async def write(self, chunk: bytes) -> None:
        if self._closed:
            raise StorageError(f"partial disk {self.name} is already closed")
        if self._upload is None:
            self._start()
        assert self._buffer is not None
        await self._buffer.put(chunk)

    async def rewind(self) -> None:
        """A stream already sent cannot be taken back: drop the disk and start a new one."""
        if self._closed:
            raise StorageError(f"partial disk {self.name} is already closed")
        if self._upload is None:
            return  # nothing sent yet
        await self._stop_upload("rewound")
        await self._vg.delete(self.name)  # in case pypowervm's own clean-up failed
        self._buffer = None

    async def publish(self, final_name: str, size: int | None = None) -> None:
        if self._closed:
            raise StorageError(f"partial disk {self.name} is already closed")
        if size not in (None, self.size):  # create_copy offers no tee: only cache disks here
            raise InvalidInput(f"partial disk {self.name} is published at its own size")
        self._vg.check_name(final_name)
        written = self._buffer.bytes_written if self._buffer is not None else 0
        if self._buffer is None or self._upload is None or written != self.size:
            raise StorageError(
                f"partial disk {self.name} got {written} bytes, not {self.size}; not publishing it"
            )
        self._buffer.close()  # the end of the stream: only now can the upload complete
        try:
            vdisk = await asyncio.shield(self._upload)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            raise storage_error(f"uploading {self.name} to PowerVM", exc) from exc
        self._upload = None
        await self._vg.rename(vdisk.udid, self.name, final_name, self._label, self.size)
        self._closed = True
        self._vg.release_upload_slot(self)
        OwnerLocks.disown(self._owner)

    async def discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_upload("discarded")
            await self._vg.delete(self.name)
            OwnerLocks.disown(self._owner)  # kept when the delete failed: a sweep retries it
        finally:
            self._vg.release_upload_slot(self)


class PowerVMVG(VolumeGroup):
    """A volume group of a VIOS, through the PowerVM REST API."""

    def __init__(
        self,
        adapter_factory: Callable[[], Any],
        vg_name: str,
        *,
        state_dir: Path,
        vios_name: str | None = None,
        spec: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER,
    ) -> None:
        self.vg_name = vg_name
        self.vios_name = vios_name
        self.spec = spec or f"powervm:vg={vg_name}" + (f",vios={vios_name}" if vios_name else "")
        self.state_dir = state_dir
        self.buffer_bytes = buffer_bytes
        self._adapter_factory = adapter_factory
        self._target: _Target | None = None
        self._target_lock = threading.Lock()
        self._uploads: concurrent.futures.ThreadPoolExecutor | None = None
        self._upload_slots = asyncio.Semaphore(MAX_UPLOADS)
        self.live: set[PowerVMPartialDisk] = set()  # partial disks not yet published or discarded
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

    def target_sync(self) -> _Target:
        """Connect and find the VG once (blocking: worker threads only)."""
        with self._target_lock:
            if self._target is None:
                adapter = self._adapter_factory()
                try:
                    vios_w, vg_w = pvm_stg.find_vg(adapter, self.vg_name, vios_name=self.vios_name)
                except (pvm_exc.VGNotFound, pvm_exc.VIOSNotFound) as exc:
                    raise StorageError(f"VG {self.spec}: {cause(exc)}") from None
                self._target = _Target(adapter, vios_w.uuid, vg_w.uuid)
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

    @staticmethod
    def _named(vg_w: Any, name: str) -> list[Any]:
        return [d for d in vg_w.virtual_disks if _disk_name(d) == name]

    # -- the exact sizes of the disks this backend filled --------------------------------

    def _record_path(self, name: str) -> Path:
        return self._records / f"{name}.json"

    def _record(self, name: str, udid: str, size: int) -> None:
        path = self._record_path(name)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"udid": udid, "size": size}))
        os.replace(tmp, path)

    def _forget(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)

    def _sized(self, disk: VDiskState) -> int:
        """The exact size this backend recorded for the disk, else its size in whole GB."""
        try:
            record = json.loads(self._record_path(disk.name).read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("udid") == disk.udid and disk.udid:
            size = record.get("size")
            if isinstance(size, int):
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

    async def disk_identity(self, name: str) -> DiskIdentity | None:
        self.check_name(name)
        found = [d for d in await self._disks() if d.name == name and d.label]
        if not found:
            return None
        size = await self._call(f"reading disk {name}", self._sized, found[0])
        return DiskIdentity(str(found[0].label), size)

    async def remove_dead_temporaries(self) -> list[str]:
        seen = {d.name for d in await self._disks() if is_temporary_name(d.name)}
        dead = await asyncio.to_thread(self.owners.dead, sorted(seen), (PARTIAL_PREFIX,))
        removed = []
        for owner in dead:
            name = OwnerLocks.name_of(owner)
            try:
                if name in seen:
                    await self.delete(name)
                    removed.append(name)
            finally:
                OwnerLocks.disown(owner)
        return removed

    async def rename(
        self, udid: str, name: str, final_name: str, label: str | None, size: int
    ) -> None:
        """Rename disk ``udid`` (now ``name``) to ``final_name``; retry on etag mismatch."""

        def rename() -> None:
            for _ in range(RENAME_TRIES):
                vg_w = self._read_vg()
                if self._named(vg_w, final_name):
                    raise DiskExists(f"disk {final_name} already exists in the volume group")
                disk = next((d for d in vg_w.virtual_disks if d.udid == udid), None)
                if disk is None:
                    raise StorageError(f"disk {name} (udid {udid}) vanished before its rename")
                disk.name = final_name
                if label is not None:
                    disk._label(label)  # a second record of the image id, beside the index
                try:
                    vg_w.update()
                except pvm_exc.HttpError as exc:
                    if _is_etag_mismatch(exc):
                        log.debug("etag mismatch renaming %s to %s; retrying", name, final_name)
                        continue  # the VG changed under us: read it again
                    raise
                self._record(final_name, udid, size)
                return
            raise StorageError(
                f"renaming {name} to {final_name}: the VG kept changing ({RENAME_TRIES} tries)"
            )

        await self._call(f"publishing {name} as {final_name}", rename)

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        """A server-side copy (``crt_copy_vdisk``) of ``source`` into a new disk ``target``
        of ``size`` bytes (rounded up to whole GB by pypowervm, as nova-powervm's
        ``crt_copy_vdisk(..., flavor.root_gb)``); the VIOS fills what follows the source."""
        self.check_name(source)
        self.check_name(target)

        seen = await self._disks()  # crt_copy_vdisk reads the VG again, for its update
        if any(d.name == target for d in seen):
            raise DiskExists(f"disk {target} already exists in the volume group")
        found = [d for d in seen if d.name == source]
        if not found:
            raise StorageError(f"cloning {source} to {target}: there is no disk {source}")
        src = found[0]
        before = {d.udid for d in seen}

        def clone() -> None:
            t = self.target_sync()
            have = self._sized(src)
            if size is not None and size < have:
                raise InvalidInput(f"disk {target}: {size} bytes cannot hold {have}")
            try:
                new = pvm_stg.crt_copy_vdisk(
                    t.adapter,
                    t.vios_uuid,
                    t.vg_uuid,
                    src.udid,
                    have,
                    target,
                    d_size=size,
                    file_format=src.file_format,
                )
            except Exception:
                # a copy the server began under the target name must not pass for complete
                with contextlib.suppress(Exception):
                    vg_now = self._read_vg()
                    partial = [d for d in self._named(vg_now, target) if d.udid not in before]
                    if partial:
                        pvm_stg.rm_vg_storage(vg_now, vdisks=partial)
                raise
            self._record(target, new.udid, have if size is None else size)

        await self._call(f"cloning {source} to {target}", clone)

    async def delete(self, name: str) -> None:
        self.check_name(name)

        def delete() -> None:
            vg_w = self._read_vg()
            found = self._named(vg_w, name)
            if found:
                pvm_stg.rm_vg_storage(vg_w, vdisks=found)  # retries on etag mismatch itself
            self._forget(name)

        await self._call(f"deleting disk {name}", delete)

    async def capacity(self) -> Capacity:
        return (await self._state()).capacity

    async def close(self) -> None:
        for partial in list(self.live):  # an upload thread blocked in read() would never end
            await partial.discard()
        if self._uploads is not None:
            pool, self._uploads = self._uploads, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


__all__ = ["PowerVMPartialDisk", "PowerVMVG", "open_powervm_vg"]
