"""A disk uploaded to the VIOS under its writer's partial name, published by a proven rename."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

from pvmcache_async.errors import (
    InvalidInput,
    StorageError,
)
from pvmcache_async.locks import FileLock, OwnerLocks
from pvmcache_async.storage.base import PartialDisk
from pvmcache_async.storage.checks import storage_error
from pvmcache_async.storage.powervm.state import (
    GB,
)
from pvmcache_async.storage.powervm.stream import StreamBuffer

with warnings.catch_warnings():  # pypowervm pulls in eventlet, which warns on stderr at import
    warnings.simplefilter("ignore")
    from pypowervm.helpers import vios_busy
    from pypowervm.tasks import storage as pvm_stg
    from pypowervm.wrappers import vios_file as pvm_vf

if TYPE_CHECKING:
    from pvmcache_async.storage.powervm.backend import PowerVMVG

log = logging.getLogger(__name__)


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

        pypowervm's ``upload_new_vdisk`` in its public steps, so that the disk's creation
        (``crt_vdisk``, an unconditional PUT of the VG) runs under the VG's change lock
        (``PowerVMVG.changing``): the disk, then its File, then the upload, without the VIOS
        busy retry (a retried upload would read the stream again), as pypowervm uploads. A
        failed upload removes the disk; the File is removed whatever happens (a VIOS keeps
        100), and one whose removal failed is tried again by ``remove_dead_temporaries``.
        """
        try:
            t = self._vg.target_sync()
            gb = math.ceil(self.size / GB)
            with self._vg.changing(pypowervm_locks=True):
                self._vg.check_room(self._vg._read_vg(), self.name, gb)  # no other change since
                vdisk = pvm_stg.crt_vdisk(t.adapter, t.vios_uuid, t.vg_uuid, self.name, gb)
            try:
                vio_file = pvm_vf.File.bld(
                    t.adapter,
                    self.name,
                    pvm_vf.FileType.DISK_IMAGE,
                    t.vios_uuid,
                    f_size=self.size,
                    tdev_udid=vdisk.udid,
                ).create()
                try:
                    helpers = [
                        h for h in t.adapter.helpers if h is not vios_busy.vios_busy_retry_helper
                    ]
                    t.adapter.upload_file(vio_file.element, buffer, helpers=helpers)
                finally:
                    self._vg.remove_file(vio_file)
            except BaseException:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    self._vg.delete_sync(self.name, vdisk.udid)
                raise
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
        if size is not None and size < self.size:
            raise InvalidInput(f"disk {final_name}: {size} bytes cannot hold {self.size}")
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
        final_size = self.size if size is None else size
        await self._vg.rename(vdisk.udid, self.name, final_name, self._label, final_size)
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
