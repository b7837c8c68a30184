"""The file VG: a directory in which every disk is one regular file named as the disk.

The embedded default backend, which runs anywhere. Files whose names start with a dot are
not disks (``.pvmcache/`` holds the index and the lock files). A partial disk is a file under
its temporary name; publishing hard-links it to the final name (``link`` fails rather than
replace an existing file, so nothing is ever overwritten) and then unlinks the temporary name.

A clone is copied into a temporary ``t_`` file whose owner holds an exclusive ``flock`` on
``.pvmcache/clones/<name>.lock`` from before the file exists until after it is gone. The kernel
drops the lock when the owner dies, so ``remove_dead_temporaries`` can tell a clone that a
SIGKILL interrupted (lock free, or no lock file) from one still running (lock held).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import secrets
from pathlib import Path

import aiofiles
import aiofiles.os
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from ..errors import DiskExists, InsufficientSpace, InvalidInput, StorageError
from ..names import CLONE_PREFIX, MAX_DISK_NAME
from .base import Capacity, DiskInfo, PartialDisk, VolumeGroup

_DISK_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_COPY_CHUNK = 1 << 30  # per copy_file_range call; the kernel copies without user space


def _storage_error(what: str, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{what}: no space left in the volume group")
    return StorageError(f"{what}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(tmp: Path, final: Path, final_name: str) -> None:
    """Give ``tmp`` the name ``final``, failing rather than replacing, then drop ``tmp``."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise DiskExists(f"disk {final_name} already exists in the volume group") from None
    os.unlink(tmp)
    _fsync_dir(final.parent)


class FilePartialDisk(PartialDisk):
    def __init__(self, vg: FileVG, name: str, path: Path, handle: AsyncBufferedIOBase) -> None:
        self.name = name
        self._vg = vg
        self._path = path
        self._file: AsyncBufferedIOBase | None = handle

    def _handle(self) -> AsyncBufferedIOBase:
        if self._file is None:
            raise StorageError(f"partial disk {self.name} is already closed")
        return self._file

    async def write(self, chunk: bytes) -> None:
        try:
            await self._handle().write(chunk)
        except OSError as exc:
            raise _storage_error(f"writing partial disk {self.name}", exc) from exc

    async def rewind(self) -> None:
        handle = self._handle()
        await handle.seek(0)
        await handle.truncate(0)

    async def publish(self, final_name: str) -> None:
        final = self._vg.path_of(final_name)
        handle = self._handle()
        try:
            await handle.flush()
            await asyncio.to_thread(os.fsync, handle.fileno())
            await handle.close()
            self._file = None
            await asyncio.to_thread(_link_new, self._path, final, final_name)
        except OSError as exc:
            raise _storage_error(f"publishing {self.name} as {final_name}", exc) from exc

    async def discard(self) -> None:
        if self._file is not None:
            handle, self._file = self._file, None
            with contextlib.suppress(OSError):  # the data is thrown away: only unlink matters
                await handle.close()
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.unlink(self._path)


class FileVG(VolumeGroup):
    """A volume group kept as a directory of regular files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = f"file:{root}"
        self.state_dir = root / ".pvmcache"
        self._clone_locks = self.state_dir / "clones"
        try:
            self._clone_locks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"file VG {root}: cannot create it ({exc.strerror})") from exc

    def path_of(self, name: str) -> Path:
        """The file of disk ``name``; the name is checked so it can only be a plain file name."""
        if not _DISK_NAME.fullmatch(name):
            raise InvalidInput(f"disk name {name!r} is not 1-64 characters of [A-Za-z0-9_]")
        return self.root / name

    async def list_disks(self) -> list[DiskInfo]:
        def scan() -> list[DiskInfo]:
            disks = []
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    disks.append(DiskInfo(entry.name, entry.stat(follow_symlinks=False).st_size))
            return sorted(disks, key=lambda d: d.name)

        return await asyncio.to_thread(scan)

    async def disk_size(self, name: str) -> int | None:
        try:
            return (await aiofiles.os.stat(self.path_of(name))).st_size
        except FileNotFoundError:
            return None

    async def create_partial(
        self, name: str, size: int, *, label: str | None = None
    ) -> PartialDisk:
        path = self.path_of(name)
        try:
            handle = await aiofiles.open(path, "xb")
        except FileExistsError:
            raise DiskExists(f"partial disk {name} already exists in the volume group") from None
        except OSError as exc:
            raise _storage_error(f"creating partial disk {name}", exc) from exc
        return FilePartialDisk(self, name, path, handle)

    async def clone(self, source: str, target: str) -> None:
        src, dst = self.path_of(source), self.path_of(target)
        tmp = self.path_of((CLONE_PREFIX + secrets.token_hex(8))[:MAX_DISK_NAME])
        try:
            await asyncio.to_thread(self._clone_sync, src, tmp, dst, target)
        except OSError as exc:
            raise _storage_error(f"cloning {source} to {target}", exc) from exc

    def _own_temp(self, tmp: Path) -> tuple[int, Path]:
        """Lock the owner file of temporary disk ``tmp`` (before ``tmp`` exists)."""
        lock = self._clone_locks / f"{tmp.name}.lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a sweep may have taken it for an orphan and unlinked it before our flock
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd, lock
            except FileNotFoundError:
                pass
            os.close(fd)

    def _clone_sync(self, src: Path, tmp: Path, dst: Path, target: str) -> None:
        if dst.exists():  # fail before copying rather than after
            raise DiskExists(f"disk {target} already exists in the volume group")
        owner, lock = self._own_temp(tmp)
        try:
            sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    while os.copy_file_range(sfd, dfd, _COPY_CHUNK):
                        pass
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                _link_new(tmp, dst, target)
            finally:
                os.close(sfd)
                tmp.unlink(missing_ok=True)
        finally:  # the temporary disk is gone before its owner file: never a live one unowned
            lock.unlink(missing_ok=True)
            os.close(owner)

    async def remove_dead_temporaries(self) -> list[str]:
        return await asyncio.to_thread(self._remove_dead_temporaries)

    def _remove_dead_temporaries(self) -> list[str]:
        removed = []
        with os.scandir(self.root) as entries:
            temps = [e.name for e in entries if e.name.startswith(CLONE_PREFIX)]
        for name in temps:
            lock = self._clone_locks / f"{name}.lock"
            try:
                fd: int | None = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None  # its owner finished meanwhile, or died before this scheme existed
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live clone
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
                    removed.append(name)
                lock.unlink(missing_ok=True)
            finally:
                if fd is not None:
                    os.close(fd)
        # owner files whose temporary disk is gone and whose owner is dead
        for lock in self._clone_locks.glob(f"{CLONE_PREFIX}*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock.unlink(missing_ok=True)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        return removed

    async def delete(self, name: str) -> None:
        try:
            await aiofiles.os.unlink(self.path_of(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(f"deleting disk {name}", exc) from exc

    async def capacity(self) -> Capacity:
        st = await asyncio.to_thread(os.statvfs, self.root)
        return Capacity(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)
