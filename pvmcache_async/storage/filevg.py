"""The file VG: a directory in which every disk is one regular file named as the disk.

The embedded default backend, which runs anywhere. Files whose names start with a dot are
not disks (``.pvmcache/`` holds the index and the lock files). A partial disk is a file under
a temporary name of its writer's own; publishing hard-links the very file its writer holds open
(``/proc/self/fd``) to the final name (``link`` fails rather than replace an existing file, so
nothing is ever overwritten), then unlinks the temporary name if it still names that file.
Whatever happened to the temporary name meanwhile, only the writer's own bytes are published.

Every temporary disk (a partial download ``p_``, a clone or copy being made ``t_``) is owned
by its writer's open file: the writer holds an exclusive ``flock`` on the file itself, on its
own descriptor, from the moment it creates it (``create_owned``) until the file is published
or unlinked, and only then closes it. Nothing in a state directory says who owns what, so an
``rm`` of ``.pvmcache`` cannot make a live writer's file look dead. The kernel drops the lock
when the writer dies; ``remove_dead_temporaries`` proves a writer dead only by taking that
``flock`` itself (non-blocking) on the file it found, and unlinks the name only if it still
names that very file.

Hostile state: nothing is followed through a symbolic link. Disks are created with
``O_EXCL | O_NOFOLLOW``, opened with ``O_NOFOLLOW``, and a symlink (or anything but a regular
file) under a disk name is refused with an error naming it. Disks are created with mode 0600
(``mode``), as they hold guests' data. A published cache disk records its image's identity in
extended attributes (``user.pvmcache.image_id``, ``.size``, ``.digest``), read back by
``disk_identity``; where the filesystem has no user xattrs it records nothing. ``disk_digest``
hashes a disk's bytes, so a disk is trusted again (a rebuilt index) only if they match.

Space and speed (each choice a ``FileVGSettings`` field, measured in benchmarks/README.md):

* **Room taken up front** (``preallocate``): a partial disk is given its whole size with
  ``fallocate`` when it is made, so it takes its room from the filesystem at once, against
  every other process and download, and a disk too full for it is refused before a byte is
  fetched. Filesystems without ``fallocate`` get a file of that size as one hole instead (the
  cache's own check up front then counts only this process's downloads).
* **Sparse ingest** (``sparse``): a block of zeros arriving from Glance is not written: its
  range is punched out of the preallocated file (``FALLOC_FL_PUNCH_HOLE``; where that fails
  it reads as zeros all the same), so zero runs of a disk image become holes and give their
  room back.
* **Clones** (``clone_method``): ``FICLONE`` (a copy-on-write reflink, constant time on
  XFS/btrfs) where the filesystem supports it, else a hole-aware copy that walks the source's
  data extents with ``SEEK_DATA``/``SEEK_HOLE`` and copies only those with
  ``copy_file_range``, so a clone is as sparse as its source.
* **Early writeback** (``writeback``): each chunk written to a partial disk, and each piece a
  clone copies, has its writeback started at once (``sync_file_range``), so the device writes
  while the network delivers and the fsync before a rename finds little left to do.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiofiles.os

from pvmcache_async.aio import complete_or_undo
from pvmcache_async.errors import DiskExists, InvalidInput, StorageError
from pvmcache_async.locks import private_dir
from pvmcache_async.names import is_temporary_name, temporary_disk_name
from pvmcache_async.storage.base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup
from pvmcache_async.storage.checks import check_disk_name, storage_error
from pvmcache_async.storage.fileio import (
    COPY_CHUNK,
    HOLE_BLOCK,
    copy_range,
    copy_sparse,
    create_owned,
    drop,
    link_new,
    preallocate,
    reflink,
    remove_if_dead,
    start_writeback,
    unlink_if,
    write_sparse,
)

LONGEST_DISK_NAME = 64  # a plain file name, and well within any filesystem's NAME_MAX
WRITEBACK_PIECE = 4 << 20  # a clone starts the writeback of each piece this size as it goes
CLONE_THREADS = 8  # clones at once per VG (the cache allows 8 by default, max_clones)
DISK_MODE = 0o600  # a disk holds a guest's data: readable by its owner only
_XATTR = "user.pvmcache."  # + image_id, size, digest ("algo:hex")
# errors by which setxattr says "no user xattrs here": the disk then records no identity
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
CloneMethod = Literal["auto", "reflink", "sparse", "copy"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileVGSettings:
    """How a file VG writes its disks; the defaults are the product's.

    The benchmark passes the alternatives to measure each choice (``storm --speed``).
    """

    sparse: bool = True  # zero blocks of a download become holes
    clone_method: CloneMethod = "auto"  # FICLONE where it works, else a hole-aware copy
    writeback: bool = True  # start writing each chunk to the device as it lands
    writeback_piece: int = WRITEBACK_PIECE  # with writeback, a clone's pieces are this size
    preallocate: bool = True  # a partial disk takes its whole room when it is made
    mode: int = DISK_MODE  # of every disk made here


def _check_disk(name: str, mode: int) -> None:
    """Refuse what is not a regular file under a disk name (a planted symlink, a directory)."""
    if stat.S_ISLNK(mode):
        raise StorageError(
            f"disk {name} is a symbolic link, not a disk the cache made; refusing it "
            "(remove the link)"
        )
    if not stat.S_ISREG(mode):
        raise StorageError(f"disk {name} is not a regular file; refusing it")


def _set_identity(fd: int, identity: DiskIdentity) -> None:
    """Record ``identity`` in the file's extended attributes (nothing where there are none)."""
    values = {
        "image_id": identity.image_id,
        "size": str(identity.size),
        "digest": f"{identity.digest_algo}:{identity.digest}",
    }
    try:
        for key, value in values.items():
            os.setxattr(fd, _XATTR + key, value.encode())
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise


def _get_identity(path: Path) -> DiskIdentity | None:
    try:
        image_id = os.getxattr(path, _XATTR + "image_id", follow_symlinks=False).decode()
        size = int(os.getxattr(path, _XATTR + "size", follow_symlinks=False))
        algo, _, digest = (
            os.getxattr(path, _XATTR + "digest", follow_symlinks=False).decode().partition(":")
        )
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # no such disk, no xattrs here, or not recorded (not a disk we published)
    if not algo or not digest:  # this VG always records a digest: a part missing is not ours
        return None
    return DiskIdentity(image_id, size, algo, digest)


def _digest_of_file(path: Path, algo: str) -> str:
    """The ``algo`` hex digest of the regular file at ``path`` (never through a link)."""
    # O_NONBLOCK: a FIFO planted in a disk's place must not block the open; refused below
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        _check_disk(path.name, os.fstat(fd).st_mode)
        return hashlib.file_digest(f, algo).hexdigest()


def _resize(fd: int, size: int, preallocating: bool) -> bool:
    """Empty the file, then give it its final size: allocated where the filesystem can (True),
    else as one hole.

    Writes then land inside the file, never past its end: XFS would otherwise preallocate
    beyond the end while the file grows, filling the holes sparse ingest skips (measured in
    benchmarks/README.md, "On XFS with reflink").
    """
    os.ftruncate(fd, 0)
    if preallocating and preallocate(fd, size):
        return True
    os.ftruncate(fd, max(size, 0))
    return False


class FilePartialDisk(PartialDisk):
    """A file VG disk being filled: a file under its writer's own ``p_``/``t_`` name, held by
    the writer's ``flock`` on its open descriptor from creation to publish or discard.

    Writes go at the end, zero runs as holes (punched out of room taken up front); ``publish``
    sets the identity xattrs, fsyncs and links the open file under its final name (never by
    name, never over a disk), then removes its temporary name; ``discard`` unlinks only the
    file this writer created (same inode)."""

    def __init__(
        self,
        vg: FileVG,
        name: str,
        path: Path,
        fd: int,
        size: int,
        preallocated: bool,
        identity: DiskIdentity | None,
    ) -> None:
        self.name = name
        self._vg = vg
        self._path = path
        self._fd: int | None = fd  # holds the file's flock: closed once published or unlinked
        self._size = size
        self._preallocated = preallocated  # its room taken up front: zero runs are punched out
        self._offset = 0
        self._identity = identity
        self._ino = os.fstat(fd).st_ino  # only this file is ever unlinked as this partial

    def _handle(self) -> int:
        if self._fd is None:
            raise StorageError(f"partial disk {self.name} is already closed")
        return self._fd

    def _write_sync(self, fd: int, chunk: bytes) -> None:
        start = self._offset
        settings = self._vg.settings
        if settings.sparse:
            self._offset = write_sparse(fd, self._offset, chunk, punch=self._preallocated)
        else:
            view = memoryview(chunk)
            while view:
                n = os.pwrite(fd, view, self._offset)
                view, self._offset = view[n:], self._offset + n
        if settings.writeback:
            start_writeback(fd, start, self._offset - start)

    async def write(self, chunk: bytes) -> None:
        fd = self._handle()
        try:
            await asyncio.to_thread(self._write_sync, fd, chunk)
        except OSError as exc:
            raise storage_error(f"writing partial disk {self.name}", exc) from exc

    async def rewind(self) -> None:
        fd = self._handle()
        try:
            self._preallocated = await asyncio.to_thread(
                _resize, fd, self._size, self._vg.settings.preallocate
            )
        except OSError as exc:
            raise storage_error(f"rewinding partial disk {self.name}", exc) from exc
        self._offset = 0

    async def publish(self, final_name: str, size: int | None = None) -> None:
        final = self._vg.path_of(final_name)
        fd = self._handle()
        if size is not None and size < self._offset:
            raise InvalidInput(f"disk {final_name}: {size} bytes cannot hold {self._offset}")
        try:
            await asyncio.to_thread(self._publish_sync, fd, final, final_name, size)
        except OSError as exc:
            raise storage_error(f"publishing {self.name} as {final_name}", exc) from exc
        self._fd = None
        os.close(fd)  # published, its temporary name gone: the lock may go

    def _publish_sync(self, fd: int, final: Path, final_name: str, size: int | None) -> None:
        os.ftruncate(fd, self._offset if size is None else size)  # trailing holes count too
        if self._identity is not None:
            _set_identity(fd, self._identity)
        os.fsync(fd)
        link_new(fd, self._path, final, final_name)

    async def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:  # published or discarded already; a name left is not this writer's
            await asyncio.to_thread(unlink_if, self._path, self._ino)
        else:
            await asyncio.to_thread(drop, self._path, fd)


def _probe(directory: Path, count: int, test: Callable[..., bool]) -> bool:
    """What ``test`` says of ``count`` fresh unnamed files in ``directory`` (``O_TMPFILE``:
    none is left behind, even by a crash); False where such files cannot be made."""
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600))
        return test(*fds)
    except OSError:
        return False  # no O_TMPFILE here: the first real use will find out for itself
    finally:
        for fd in fds:
            os.close(fd)


def probe_reflink(directory: Path) -> bool:
    """Whether FICLONE works between two files in ``directory`` (one block of data)."""

    def test(src: int, dst: int) -> bool:
        os.pwrite(src, b"\1" * HOLE_BLOCK, 0)
        return reflink(src, dst)

    return _probe(directory, 2, test)


def _probe_preallocate(directory: Path) -> bool:
    """Whether ``fallocate`` allocates room in ``directory``'s filesystem (one block)."""

    def test(fd: int) -> bool:
        try:
            return preallocate(fd, HOLE_BLOCK)
        except OSError:
            return True  # it tried to allocate and found no room: it does allocate

    return _probe(directory, 1, test)


class FileVG(VolumeGroup):
    """A volume group kept as a directory of regular files."""

    def __init__(
        self, root: Path, settings: FileVGSettings | None = None, *, create: bool = True
    ) -> None:
        if not create and not root.is_dir():
            raise InvalidInput(f"file VG {root}: no such directory")
        self.root = root
        self.settings = settings or FileVGSettings()
        self._reflink_works: bool | None = None  # learnt on the first clone (per VG)
        self._preallocate_works: bool | None = None  # learnt by a probe, then by each partial
        # Clones run on threads of their own: on the loop's small default executor a storm's
        # clones (tens of ms each) would queue every quick stat and index call behind them.
        self._clone_threads = ThreadPoolExecutor(CLONE_THREADS, thread_name_prefix="filevg-clone")
        self.spec = f"file:{root}"
        self.state_dir = root / ".pvmcache"
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"file VG {root}: cannot create it ({exc.strerror})") from exc
        private_dir(self.state_dir)

    def path_of(self, name: str) -> Path:
        """The file of disk ``name``; the name is checked so it can only be a plain file name."""
        check_disk_name(name, LONGEST_DISK_NAME)
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
        path = self.path_of(name)
        try:
            st = await asyncio.to_thread(os.lstat, path)
        except FileNotFoundError:
            return None
        _check_disk(name, st.st_mode)
        return st.st_size

    async def disk_identity(self, name: str) -> DiskIdentity | None:
        if await self.disk_size(name) is None:  # also refuses a symlink
            return None
        return await asyncio.to_thread(_get_identity, self.path_of(name))

    async def create_partial(
        self, name: str, size: int, *, identity: DiskIdentity | None = None
    ) -> PartialDisk:
        return await self._create(name, size, identity)

    async def disk_digest(self, name: str, algo: str) -> str | None:
        path = self.path_of(name)
        try:
            return await asyncio.to_thread(_digest_of_file, path, algo)
        except OSError as exc:
            raise storage_error(f"reading disk {name}", exc) from exc

    async def create_copy(self, target: str, size: int) -> PartialDisk | None:
        await self._check_free(target)  # a bad or taken name fails now, not after the download
        if await asyncio.to_thread(self._reflinks):
            return None  # a reflink clone is free and shares the blocks; a tee would not
        return await self._create(temporary_disk_name(), size, None)

    async def _check_free(self, name: str) -> None:
        if await self.disk_size(name) is not None:
            raise DiskExists(f"disk {name} already exists in the volume group")

    async def _create(self, name: str, size: int, identity: DiskIdentity | None) -> FilePartialDisk:
        path = self.path_of(name)
        made: list[tuple[int, bool]] = []  # the thread's file, for a cancelled call to undo

        async def make() -> None:
            made.append(await asyncio.to_thread(self._new_file, path, size))

        try:  # cancelled, it leaves no file: a live process's file would stay locked for good
            await complete_or_undo(make(), lambda: asyncio.to_thread(drop, path, made[0][0]))
        except FileExistsError:
            raise DiskExists(f"partial disk {name} already exists in the volume group") from None
        except OSError as exc:
            raise storage_error(f"creating partial disk {name}", exc) from exc
        fd, preallocated = made[0]
        if size > 0 and self.settings.preallocate:
            self._preallocate_works = preallocated  # what happened, over what the probe foresaw
        return FilePartialDisk(self, name, path, fd, size, preallocated, identity)

    def _new_file(self, path: Path, size: int) -> tuple[int, bool]:
        """A new temporary disk of ``size`` bytes, owned (``create_owned``); whether its room
        was allocated."""
        fd = create_owned(path, self.settings.mode)
        try:
            return fd, _resize(fd, size, self.settings.preallocate)
        except BaseException as exc:
            drop(path, fd)
            if isinstance(exc, OSError):
                raise storage_error(
                    f"creating partial disk {path.name} of {size} bytes", exc
                ) from exc
            raise

    async def reserves_space(self) -> bool:
        if not self.settings.preallocate:
            return False
        if self._preallocate_works is None:
            self._preallocate_works = await asyncio.to_thread(_probe_preallocate, self.state_dir)
        return self._preallocate_works

    def _reflinks(self) -> bool:
        """Whether clones here will be reflinks: learnt by the first clone, or by a probe."""
        if self.settings.clone_method not in ("auto", "reflink"):
            return False
        if self._reflink_works is None:
            self._reflink_works = probe_reflink(self.state_dir)
        return self._reflink_works

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        src, dst = self.path_of(source), self.path_of(target)
        await self._check_free(target)  # fail before copying rather than after
        tmp = self.path_of(temporary_disk_name())
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._clone_threads, self._clone_sync, src, tmp, dst, target, size
            )
        except OSError as exc:
            raise storage_error(f"cloning {source} to {target}", exc) from exc

    def _copy(self, sfd: int, dfd: int) -> None:
        method = self.settings.clone_method
        if method in ("auto", "reflink") and self._reflink_works is not False:
            if reflink(sfd, dfd):
                self._reflink_works = True
                return
            self._reflink_works = False
            if method == "reflink":
                raise StorageError(f"the filesystem of {self.root} cannot reflink (FICLONE)")
        size = os.fstat(sfd).st_size
        piece = self.settings.writeback_piece if self.settings.writeback else COPY_CHUNK
        if method == "copy":  # a plain full copy: every byte, holes included
            copy_range(sfd, dfd, 0, size, piece)
        else:
            copy_sparse(sfd, dfd, size, piece)

    def _clone_sync(self, src: Path, tmp: Path, dst: Path, target: str, size: int | None) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if size is not None and size < (have := os.fstat(sfd).st_size):
                raise InvalidInput(f"disk {target}: {size} bytes cannot hold {have}")
            dfd = create_owned(tmp, self.settings.mode)  # held, as a partial is, till the end
            try:
                self._copy(sfd, dfd)
                if size is not None:
                    os.ftruncate(dfd, size)  # grown as a hole: zeros after the image
                os.fsync(dfd)
                link_new(dfd, tmp, dst, target)
            finally:
                drop(tmp, dfd)
        finally:
            os.close(sfd)

    async def remove_dead_temporaries(self) -> list[str]:
        return await asyncio.to_thread(self._remove_dead_temporaries)

    def _remove_dead_temporaries(self) -> list[str]:
        with os.scandir(self.root) as entries:
            temps = sorted(e.name for e in entries if is_temporary_name(e.name))
        return [name for name in temps if remove_if_dead(self.root / name)]

    async def delete(self, name: str) -> None:
        try:
            await aiofiles.os.unlink(self.path_of(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(f"deleting disk {name}", exc) from exc

    async def capacity(self) -> Capacity:
        st = await asyncio.to_thread(os.statvfs, self.root)
        return Capacity(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)

    async def close(self) -> None:
        self._clone_threads.shutdown(wait=False, cancel_futures=True)
