"""System calls on disk files: room, holes, copies, reflinks, writeback, links of open files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import cast

from pvmcache_async.errors import DiskExists, StorageError

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 30  # per copy_file_range call; the kernel copies without user space
HOLE_BLOCK = 64 << 10  # zero runs are detected (and become holes) at this granularity
_ZEROS = bytes(HOLE_BLOCK)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
# errors by which FICLONE says "not here" (other FS, other device, unaligned); then copy
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
_PROC_FD = Path("/proc/self/fd")
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400  # linux/fcntl.h


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


def link_new(fd: int, tmp: Path, final: Path, final_name: str) -> None:
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
    unlink_if(tmp, ino)
    _fsync_dir(final.parent)


def drop(path: Path, fd: int) -> None:
    """Unlink ``path`` if it names the file open as ``fd``, then close ``fd`` (and so drop
    its writer's lock): in this order, no sweep ever sees a live writer's file unlocked."""
    try:
        unlink_if(path, os.fstat(fd).st_ino)
    finally:
        os.close(fd)


def unlink_if(path: Path, ino: int) -> None:
    """Unlink ``path`` if it still names file ``ino``: never a file planted in its place."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == ino:
            os.unlink(path)


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


def copy_range(sfd: int, dfd: int, start: int, end: int, piece: int = COPY_CHUNK) -> None:
    """Copy bytes ``start``..``end`` in the kernel; with a ``piece`` smaller than the default,
    each piece's writeback starts as soon as it is copied (``start_writeback``)."""
    pos = start
    while pos < end:
        n = os.copy_file_range(sfd, dfd, min(piece, end - pos), pos, pos)
        if n == 0:  # the source shrank under us
            raise StorageError("the source disk ended early while it was being cloned")
        if piece < COPY_CHUNK:
            start_writeback(dfd, pos, n)
        pos += n


def copy_sparse(sfd: int, dfd: int, size: int, piece: int = COPY_CHUNK) -> None:
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
        copy_range(sfd, dfd, data, min(hole, size), piece)
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
