"""The memory VG: a volume group whose disks are byte strings in this process's memory.

What it is for: running the cache's core (``ImageCache``) in tests without a file system to
fill, a PowerVM host or a process to kill, as httpcore ships a mock backend. It is a real
implementation of ``storage.base``'s contract, not a stub; the core cannot tell it from
another backend.

What it models, as the contract in ``storage.base`` states it:

* **Atomic publish, never replace**: a disk appears under its name only when
  ``PartialDisk.publish`` or ``clone`` completes, in one step (no await between the check and
  the insert); a taken name raises ``DiskExists`` and the disk there is left as it was.
  Temporary disks are listed like any other disk, as a file VG lists its ``p_`` files.
* **The writer's own bytes**: a partial disk publishes what its own writer wrote; if its
  temporary name was deleted meanwhile (an operator's ``rm``), it is not published.
* **Identity records**: a published cache disk keeps the ``DiskIdentity`` it was created
  with (``disk_identity``); clones and copies record none, as a file VG's clone has no xattrs.
* **Dead temporaries**: each temporary disk has a writer; ``abandon`` stands for that
  writer's death (a SIGKILL): its bytes stay under the temporary name and further calls fail.
  ``remove_dead_temporaries`` removes abandoned ones only, never a live writer's.
* **Space**: ``total`` bytes; every disk and partial disk takes its size. With ``reserves``
  (the default, like a file VG that preallocates) a partial takes its whole size when it is
  made and ``create_partial`` refuses when there is no room; without, room is taken as data is
  written and a write that finds none raises ``InsufficientSpace`` (ENOSPC mid-download).
* **Tees**: ``create_copy`` offers a partial disk for the first deploy's disk (``copies``;
  None without, as a VG whose clones are free).
* **Names**: disk names as strict as PowerVM's (1-15 characters of ``[A-Za-z0-9_]``).
* **Interleaving**: every call that reads or changes a disk yields to the event loop once
  before it acts, as a backend whose work runs on threads lets other tasks run meanwhile.

What it does not model: persistence (a new ``MemoryVG`` is empty, and the disks vanish with
the process), other processes sharing the disks (caches in one process may share one
``MemoryVG``, and then the lock files of ``state_dir`` do keep them apart), durability and
crashes of the host, sparse files and holes, hostile files (symlinks, planted files), slow or
failing hardware (a test subclasses it to inject faults), and the cost of a copy.

``state_dir`` is a real directory: the core keeps its index and lock files there.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pvmcache_async.errors import DiskExists, InsufficientSpace, InvalidInput, StorageError
from pvmcache_async.locks import private_dir
from pvmcache_async.names import MAX_DISK_NAME, temporary_disk_name
from pvmcache_async.storage.base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup
from pvmcache_async.storage.checks import check_disk_name

DEFAULT_TOTAL = 1 << 40  # 1 TiB: room is no concern unless a test says so


def _grown(name: str, have: int, size: int) -> int:
    """How many zeros follow ``have`` bytes in a disk of ``size`` (InvalidInput if smaller)."""
    if size < have:
        raise InvalidInput(f"disk {name}: {size} bytes cannot hold {have}")
    return size - have


@dataclass(slots=True)
class _Disk:
    """One disk: its bytes, or a partial disk's room and writer."""

    data: bytearray
    identity: DiskIdentity | None = None
    writer: MemoryPartialDisk | None = None  # a temporary disk's; None once published
    reserved: int = 0  # a partial's room taken up front (reserves): its size

    @property
    def room(self) -> int:
        return max(len(self.data), self.reserved)


class MemoryPartialDisk(PartialDisk):
    """A disk being filled in memory under a temporary name; its writer is this object."""

    def __init__(self, vg: MemoryVG, name: str, disk: _Disk, identity: DiskIdentity | None) -> None:
        self.name = name
        self._vg = vg
        self._disk: _Disk | None = disk  # None once published or discarded
        self._identity = identity  # recorded with the disk when it is published
        self.abandoned = False  # its writer died (``abandon``)

    def _own(self) -> _Disk:
        """The temporary disk this writer still owns, or a StorageError saying why not."""
        if self.abandoned:
            raise StorageError(f"partial disk {self.name}: its writer is gone")
        disk = self._disk
        if disk is None:
            raise StorageError(f"partial disk {self.name} is already closed")
        if self._vg.disks.get(self.name) is not disk:
            raise StorageError(f"{self.name} was removed while it was written; not publishing it")
        return disk

    async def write(self, chunk: bytes) -> None:
        await asyncio.sleep(0)
        disk = self._own()
        grows = len(disk.data) + len(chunk) - disk.room
        if grows > 0 and grows > (await self._vg.capacity()).free:
            raise InsufficientSpace(
                f"writing partial disk {self.name}: no space left in the volume group"
            )
        disk.data += chunk

    async def rewind(self) -> None:
        await asyncio.sleep(0)
        self._own().data.clear()

    async def publish(self, final_name: str, size: int | None = None) -> None:
        await asyncio.sleep(0)
        disk = self._own()
        check_disk_name(final_name, MAX_DISK_NAME)
        if final_name in self._vg.disks:
            raise DiskExists(f"disk {final_name} already exists in the volume group")
        if size is not None:
            disk.data += bytes(_grown(final_name, len(disk.data), size))
        del self._vg.disks[self.name]
        disk.identity, disk.writer, disk.reserved = self._identity, None, 0
        self._vg.disks[final_name] = disk
        self._disk = None

    async def discard(self) -> None:
        await asyncio.sleep(0)
        if self.abandoned:
            return  # a dead writer does nothing: its disk is left for the sweep
        disk, self._disk = self._disk, None
        if disk is not None and self._vg.disks.get(self.name) is disk:
            del self._vg.disks[self.name]

    def abandon(self) -> None:
        """Its writer dies now (a SIGKILL): the bytes stay under the temporary name, for
        ``remove_dead_temporaries`` to find; later calls of this writer fail (``discard``
        does nothing)."""
        self.abandoned = True


class MemoryVG(VolumeGroup):
    """A volume group kept in memory; see the module docstring for what it models."""

    def __init__(
        self,
        state_dir: Path,
        *,
        total: int = DEFAULT_TOTAL,
        reserves: bool = True,
        copies: bool = True,
    ) -> None:
        self.spec = f"memory:{state_dir}"
        self.state_dir = private_dir(state_dir)
        self.total = total
        self.reserves = reserves
        self.copies = copies
        self.disks: dict[str, _Disk] = {}  # every disk by name, temporaries included
        self.closed = False

    def read(self, name: str) -> bytes:
        """The bytes of disk ``name`` (for tests); StorageError when there is none."""
        disk = self.disks.get(name)
        if disk is None:
            raise StorageError(f"disk {name} does not exist in the volume group")
        return bytes(disk.data)

    async def list_disks(self) -> list[DiskInfo]:
        await asyncio.sleep(0)
        return [DiskInfo(name, d.room) for name, d in sorted(self.disks.items())]

    async def disk_size(self, name: str) -> int | None:
        await asyncio.sleep(0)
        check_disk_name(name, MAX_DISK_NAME)
        disk = self.disks.get(name)
        return None if disk is None else disk.room

    async def disk_identity(self, name: str) -> DiskIdentity | None:
        await asyncio.sleep(0)
        check_disk_name(name, MAX_DISK_NAME)
        disk = self.disks.get(name)
        return None if disk is None else disk.identity

    async def disk_digest(self, name: str, algo: str) -> str | None:
        await asyncio.sleep(0)
        check_disk_name(name, MAX_DISK_NAME)
        disk = self.disks.get(name)
        return None if disk is None else hashlib.new(algo, disk.data).hexdigest()

    async def create_partial(
        self, name: str, size: int, *, identity: DiskIdentity | None = None
    ) -> PartialDisk:
        return await self._create(name, size, identity)

    async def create_copy(self, target: str, size: int) -> PartialDisk | None:
        if await self.disk_size(target) is not None:  # a taken name fails now, not after
            raise DiskExists(f"disk {target} already exists in the volume group")
        if not self.copies:
            return None
        return await self._create(temporary_disk_name(), size, None)

    async def _create(
        self, name: str, size: int, identity: DiskIdentity | None
    ) -> MemoryPartialDisk:
        await asyncio.sleep(0)
        check_disk_name(name, MAX_DISK_NAME)
        if name in self.disks:
            raise DiskExists(f"partial disk {name} already exists in the volume group")
        reserved = size if self.reserves else 0
        free = self._free()
        if reserved > free:
            raise InsufficientSpace(
                f"creating partial disk {name} of {size} bytes: no space left in the "
                f"volume group ({free} bytes free)"
            )
        disk = self.disks[name] = _Disk(bytearray(), reserved=reserved)
        disk.writer = MemoryPartialDisk(self, name, disk, identity)
        return disk.writer

    async def reserves_space(self) -> bool:
        return self.reserves

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        await asyncio.sleep(0)
        check_disk_name(source, MAX_DISK_NAME)
        check_disk_name(target, MAX_DISK_NAME)
        disk = self.disks.get(source)
        if disk is None or disk.writer is not None:
            raise StorageError(f"cloning {source} to {target}: no such disk")
        if target in self.disks:
            raise DiskExists(f"disk {target} already exists in the volume group")
        if len(disk.data) > self._free():
            raise InsufficientSpace(f"cloning {source} to {target}: no space left")
        grown = 0 if size is None else _grown(target, len(disk.data), size)
        self.disks[target] = _Disk(bytearray(disk.data) + bytes(grown))

    async def delete(self, name: str) -> None:
        await asyncio.sleep(0)
        check_disk_name(name, MAX_DISK_NAME)
        self.disks.pop(name, None)

    async def capacity(self) -> Capacity:
        await asyncio.sleep(0)
        return Capacity(total=self.total, free=self._free())

    def _free(self) -> int:
        return max(0, self.total - sum(d.room for d in self.disks.values()))

    async def remove_dead_temporaries(self) -> list[str]:
        await asyncio.sleep(0)
        dead = [n for n, d in self.disks.items() if d.writer is not None and d.writer.abandoned]
        for name in dead:
            del self.disks[name]
        return sorted(dead)

    async def close(self) -> None:
        self.closed = True
