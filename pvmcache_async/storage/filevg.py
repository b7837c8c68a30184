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
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import aiofiles.os

from pvmcache_async.aio import complete_or_undo
from pvmcache_async.errors import DiskExists, InvalidInput, StorageError
from pvmcache_async.locks import private_dir
from pvmcache_async.names import is_temporary_name, temporary_disk_name
from pvmcache_async.storage.base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup
from pvmcache_async.storage.checks import check_disk_name, storage_error

LONGEST_DISK_NAME = 64  # a plain file name, and well within any filesystem's NAME_MAX
_COPY_CHUNK = 1 << 30  # per copy_file_range call; the kernel copies without user space
HOLE_BLOCK = 64 << 10  # zero runs are detected (and become holes) at this granularity
_ZEROS = bytes(HOLE_BLOCK)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
# errors by which FICLONE says "not here" (other FS, other device, unaligned); then copy
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
WRITEBACK_PIECE = 4 << 20  # a clone starts the writeback of each piece this size as it goes
CLONE_THREADS = 8  # clones at once per VG (the cache allows 8 by default, max_clones)
DISK_MODE = 0o600  # a disk holds a guest's data: readable by its owner only
_XATTR = "user.pvmcache."  # + image_id, size, digest ("algo:hex")
# errors by which setxattr says "no user xattrs here": the disk then records no identity
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
_PROC_FD = Path("/proc/self/fd")
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400  # linux/fcntl.h
CloneMethod = Literal["auto", "reflink", "sparse", "copy"]
log = logging.getLogger(__name__)


def _libc(name: str, *argtypes: type) -> Callable[[int, int, int, int], int] | None:
    """A Linux call that Python's ``os`` does not offer, from libc; None where absent."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_SYNC_FILE_RANGE = _libc(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
# fallocate with its modes: os.posix_fallocate has none, and glibc emulates it by writing
# zeros where the filesystem cannot
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h
# errors by which fallocate says "not on this filesystem" (not "no room")
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


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


def preallocate(fd: int, size: int) -> bool:
    """Give the empty file ``fd`` its ``size``, allocated now (the blocks read as zeros);
    False where the filesystem cannot. Too little room raises ``OSError(ENOSPC)``."""
    if _FALLOCATE is None or size <= 0:
        return False
    if _FALLOCATE(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_FALLOCATE:
        return False
    raise OSError(err, os.strerror(err))


def _punch(fd: int, offset: int, length: int) -> None:
    """Give back the blocks of a range that holds zeros. Best effort: where the filesystem
    cannot, the range keeps its allocated blocks, which read as zeros just the same."""
    if _FALLOCATE is not None and length > 0:
        _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def _linkat_libc() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, bytes, int, bytes, int], int], fn)


# os.link calls link(2), which would link /proc/self/fd/N itself (EXDEV), not the file it names
_LINKAT = _linkat_libc()


def _link_open_file(fd: int, final: Path) -> None:
    """Link the file open as ``fd`` to ``final`` (``linkat`` of ``/proc/self/fd/N`` following
    the magic link), failing with ``FileExistsError`` rather than replacing."""
    assert _LINKAT is not None
    src = str(_PROC_FD / str(fd)).encode()
    if _LINKAT(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(final), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(final))


HAVE_WRITEBACK = _SYNC_FILE_RANGE is not None  # else start_writeback does nothing
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing this range to the device now, without waiting for it.

    Best effort (errors are ignored); durability still comes from the fsync at publish,
    which then finds little left to write: the disk writes while the network delivers.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _check_disk(name: str, mode: int) -> None:
    """Refuse what is not a regular file under a disk name (a planted symlink, a directory)."""
    if stat.S_ISLNK(mode):
        raise StorageError(
            f"disk {name} is a symbolic link, not a disk the cache made; refusing it "
            "(remove the link)"
        )
    if not stat.S_ISREG(mode):
        raise StorageError(f"disk {name} is not a regular file; refusing it")


def create_owned(path: Path, mode: int) -> int:
    """Create the file of a new temporary disk at ``path`` and return it open for writing,
    held by the caller: an exclusive ``flock`` on this descriptor, which the caller keeps until
    the file is published or unlinked (then closes it). Never through a symlink, never an
    existing file (``FileExistsError``). Blocking: worker threads only.

    A sweep may find the file in the instant between its creation and its lock, take it for a
    dead writer's and unlink it; the name then no longer names the file locked here, and the
    file is made again.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        fd = os.open(path, flags, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep looks at the file
            if _names(path, fd):
                os.fchmod(fd, mode)  # exactly the mode asked, whatever the umask
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swept before it was ours: make it again


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open as ``fd`` (not a file unlinked or replaced)."""
    try:
        st, at = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (at.st_dev, at.st_ino)


def remove_if_dead(path: Path) -> bool:
    """Unlink the temporary disk ``path`` if its writer is dead; return whether it was.

    Dead means nobody holds the ``flock`` its writer takes on it (``create_owned``): this
    takes it, without waiting, on the file found at ``path``, and unlinks the name only if it
    still names that file. A live writer's file, in any process, is never touched. What is
    not a regular file (a symlink, a FIFO, a directory planted under a temporary's name) is
    not a disk the cache made: it is left, with one warning.
    """
    try:  # O_NONBLOCK: a FIFO must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # published or discarded meanwhile
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning(
                "temporary disk %s is a symbolic link; refusing to follow it (skipped)", path
            )
        else:
            log.warning("temporary disk %s cannot be opened: %s (skipped)", path, exc.strerror)
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("temporary disk %s is not a regular file; refusing it (skipped)", path)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
        if not _names(path, fd):
            return False  # gone, or made again by a new writer
        os.unlink(path)
        return True
    finally:
        os.close(fd)  # drops the lock: a writer that was about to lock it makes a new file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(fd: int, tmp: Path, final: Path, final_name: str) -> None:
    """Give the file open as ``fd`` (written under ``tmp``) the name ``final``, failing rather
    than replacing; then drop ``tmp`` if it still names that file.

    The link is made from the open file itself, so the file published is the one its writer
    wrote, even if ``tmp`` was removed or replaced meanwhile (an operator's ``rm``, a planted
    file): then it fails, or publishes the writer's own file, never another."""
    ino = os.fstat(fd).st_ino
    try:
        if _LINKAT is not None and _PROC_FD.is_dir():
            _link_open_file(fd, final)
        else:  # no /proc: link by name, after checking the name still holds our file
            if os.lstat(tmp).st_ino != ino:
                raise FileNotFoundError(errno.ENOENT, "replaced", str(tmp))
            os.link(tmp, final, follow_symlinks=False)
    except FileExistsError:
        raise DiskExists(f"disk {final_name} already exists in the volume group") from None
    except FileNotFoundError:  # the writer's file was unlinked under it
        raise StorageError(
            f"{tmp.name} was removed while it was written; not publishing it"
        ) from None
    _unlink_if(tmp, ino)
    _fsync_dir(final.parent)


def _drop(path: Path, fd: int) -> None:
    """Unlink ``path`` if it names the file open as ``fd``, then close ``fd`` (and so drop
    its writer's lock): in this order, no sweep ever sees a live writer's file unlocked."""
    try:
        _unlink_if(path, os.fstat(fd).st_ino)
    finally:
        os.close(fd)


def _unlink_if(path: Path, ino: int) -> None:
    """Unlink ``path`` if it still names file ``ino``: never a file planted in its place."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == ino:
            os.unlink(path)


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


def _run_end(data: bytes, offset: int, stop: int, end: int, zeros: bool) -> int:
    """Where the run of blocks that starts before ``stop`` ends: the first block from ``stop``
    on that is zeros when the run is not, or the other way round (``end`` if none is)."""
    while stop < end:
        nxt = min(end, stop + HOLE_BLOCK)
        if data.startswith(_ZEROS[: nxt - stop], stop - offset) != zeros:
            break
        stop = nxt
    return stop


def write_sparse(fd: int, offset: int, data: bytes, *, punch: bool = False) -> int:
    """Write ``data`` at ``offset``, skipping whole zero blocks (holes); return the new offset.

    Blocks are aligned to the file offset, so a run of zeros in the image lands on whole
    filesystem blocks whatever sizes the chunks arrive in. The caller sets the final size.
    With ``punch`` (a preallocated file) each run of zero blocks is punched out.
    """
    end = offset + len(data)
    pos = offset
    while pos < end:
        # the next block boundary of the file, so holes line up with filesystem blocks
        stop = min(end, (pos // HOLE_BLOCK + 1) * HOLE_BLOCK)
        i, j = pos - offset, stop - offset
        zeros = data.startswith(_ZEROS[: j - i], i)  # memcmp, no copy
        stop = _run_end(data, offset, stop, end, zeros)
        if zeros:
            if punch:
                _punch(fd, pos, stop - pos)
            pos = stop
            continue
        # a run of data blocks: written in one call
        view = memoryview(data)[pos - offset : stop - offset]
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
    return end


class FilePartialDisk(PartialDisk):
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
        _link_new(fd, self._path, final, final_name)

    async def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:  # published or discarded already; a name left is not this writer's
            await asyncio.to_thread(_unlink_if, self._path, self._ino)
        else:
            await asyncio.to_thread(_drop, self._path, fd)


def _copy_range(sfd: int, dfd: int, start: int, end: int, piece: int = _COPY_CHUNK) -> None:
    """Copy bytes ``start``..``end`` in the kernel; with a ``piece`` smaller than the default,
    each piece's writeback starts as soon as it is copied (``start_writeback``)."""
    pos = start
    while pos < end:
        n = os.copy_file_range(sfd, dfd, min(piece, end - pos), pos, pos)
        if n == 0:  # the source shrank under us
            raise StorageError("the source disk ended early while it was being cloned")
        if piece < _COPY_CHUNK:
            start_writeback(dfd, pos, n)
        pos += n


def copy_sparse(sfd: int, dfd: int, size: int, piece: int = _COPY_CHUNK) -> None:
    """Copy only the data extents of ``sfd`` (SEEK_DATA/SEEK_HOLE); holes stay holes."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(sfd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is one hole
                break
            raise
        hole = os.lseek(sfd, data, os.SEEK_HOLE)
        _copy_range(sfd, dfd, data, min(hole, size), piece)
        pos = hole
    os.ftruncate(dfd, size)


def reflink(sfd: int, dfd: int) -> bool:
    """Clone ``sfd`` into ``dfd`` copy-on-write (FICLONE); False where the FS cannot."""
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


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
            await complete_or_undo(make(), lambda: asyncio.to_thread(_drop, path, made[0][0]))
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
            _drop(path, fd)
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
        piece = self.settings.writeback_piece if self.settings.writeback else _COPY_CHUNK
        if method == "copy":  # a plain full copy: every byte, holes included
            _copy_range(sfd, dfd, 0, size, piece)
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
                _link_new(dfd, tmp, dst, target)
            finally:
                _drop(tmp, dfd)
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
