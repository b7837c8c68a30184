"""Concurrency primitives: singleflight within a process, file locks across processes.

``SingleFlight`` makes concurrent calls for one key share one execution. ``SharedRead`` makes
concurrent reads of one slow source share one read that began after each of them was asked
for. ``FileLock`` is an advisory ``flock`` on a file, shared or exclusive, that holds between
processes (and between tasks of one process: each holder opens its own file description).
``OwnerLocks`` tells a dead writer's temporary disks from a live one's where the disk has no
local file to lock (the PowerVM VG; a file VG locks the temporary's own file instead).

Lock files and their directories are never followed through a symbolic link: one planted in
the state directory is refused (``UntrustedFile``), so no lock can create or truncate a file
elsewhere, and so is anything else not a regular file (a FIFO, a directory).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from pvmcache_async.core.statefiles import read_only
from pvmcache_async.errors import InsufficientSpace, ReadOnly, StorageError, UntrustedFile

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Runs at most one call per key at a time; callers that arrive meanwhile share its result.

    The work runs in a task of its own, not in the first caller, so that:

    * a caller that is cancelled stops waiting and leaves; the work goes on for the others,
      and goes on to the end even if every caller has left (its result is then discarded);
    * an exception reaches every caller of that flight, and is not remembered: the key is
      released as soon as the work ends, so the next call starts afresh;
    * ``cancel_all`` (used at shutdown) cancels the work itself.
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Return ``(result, leader)``; ``leader`` is True for the caller that started the work.

        ``work`` is called only by the leader. Cancelling a caller never cancels the work.
        """
        task = self._flights.get(key)
        leader = task is None
        if task is None:
            task = asyncio.ensure_future(work())
            self._flights[key] = task
            task.add_done_callback(lambda t, key=key: self._forget(key, t))  # type: ignore[misc]
        # shield: the caller's cancellation ends its wait, not the shared task
        return await asyncio.shield(task), leader

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not logged as lost

    async def settle(self) -> None:
        """Wait until every flight under way now has ended, however it ends; raises nothing.
        Cancelling the caller ends its wait, not the flights (``asyncio.wait`` cancels none)."""
        if self._flights:
            await asyncio.wait(list(self._flights.values()))

    async def cancel_all(self) -> None:
        """Cancel every flight and wait until each has finished its clean-up."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SharedRead(Generic[V]):
    """Concurrent calls share one call of ``read``, and each gets a read begun after it asked.

    Unlike ``SingleFlight``, a caller never joins a read already under way, whose answer may
    predate what the caller has just done (a disk it has just made or removed). It waits for
    the next one, which starts when the current one ends and serves everyone who asked
    meanwhile: at most one read runs at a time, and a caller waits for at most two. As in
    ``SingleFlight``, a read runs in a task of its own: a cancelled caller leaves and the read
    goes on for the others; an exception reaches the callers of that read only.
    """

    def __init__(self, read: Callable[[], Awaitable[V]]) -> None:
        self._read = read
        self._next: asyncio.Future[V] | None = None  # the read the callers now wait for
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self) -> V:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        return await asyncio.shield(waiting)

    async def _run(self) -> None:
        try:
            while self._next is not None:
                serving, self._next = self._next, None  # who asks from now on waits for the next
                try:
                    value = await self._read()
                except asyncio.CancelledError:  # at shutdown: its callers are cancelled too
                    serving.cancel()
                    raise
                except Exception as exc:
                    serving.set_exception(exc)
                    serving.exception()  # nobody may be left to retrieve it
                else:
                    serving.set_result(value)
        finally:
            self._runner = None
            if self._next is not None:  # cancelled at shutdown: nobody is left to read for
                self._next.cancel()
                self._next = None


class FileLock:
    """An advisory ``flock`` on ``path``: exclusive, or shared with other shared holders.

    Each instance is one holder. ``acquire`` polls with a non-blocking ``flock`` so that it
    never blocks the event loop and can be cancelled at any await; a cancelled ``acquire``
    holds nothing. The kernel drops the lock when the holder's process dies, so a crash never
    leaves a lock held. The lock file is never removed while it may be in use: a path that was
    unlinked and recreated between ``open`` and ``flock`` is detected and retried.
    """

    def __init__(
        self, path: Path, *, shared: bool = False, poll: float = 0.005, max_poll: float = 0.1
    ) -> None:
        self.path = path
        self.shared = shared
        self._poll = poll
        self._max_poll = max_poll
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; never waits. A lock file that is not a regular
        file of its own (a symlink, a FIFO, a directory) raises ``UntrustedFile``."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this holder")
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        # O_NONBLOCK: a FIFO planted here must not block the open (it is refused just after)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise _refused(self.path, "lock file", exc) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UntrustedFile(f"lock file {self.path} is not a regular file; refusing it")
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file that was unlinked meanwhile: try again
            os.close(fd)
            return self.try_acquire()
        self._fd = fd
        return True

    async def acquire(self) -> None:
        """Wait until the lock is ours. Cancellation leaves it not held."""
        delay = self._poll
        while not self.try_acquire():
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_poll)

    def release(self) -> None:
        """Release the lock; closing the file description drops the ``flock``."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def unlink_and_release(self) -> None:
        """Remove the lock file, then release it; held exclusively, so no one else holds it.

        A holder waiting on the old file notices it is gone and locks a new one (see
        ``try_acquire``), so removing a held lock file is safe where keeping it is not wanted.
        """
        if self._fd is None or self.shared:
            raise RuntimeError(f"lock {self.path} must be held exclusively to be removed")
        self.path.unlink(missing_ok=True)
        self.release()

    async def __aenter__(self) -> FileLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class OwnerLocks:
    """Owner locks of temporary disks: one lock file per disk name in ``directory``.

    For a backend whose temporary disks have no local file that their writer could lock (the
    PowerVM VG); a file VG's writer locks its temporary's own file (``storage.filevg``). A
    writer holds ``<name>.lock`` exclusively (``own``) from before its temporary disk exists
    until after the disk is gone (``disown``). The kernel drops the lock when the writer dies,
    so a free lock, or none, marks a dead writer's leftover, and a held one a live writer's,
    in any process; ``dead`` takes the locks of the dead ones so their disks can be removed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def own(self, name: str) -> FileLock:
        """Hold the owner lock of disk ``name`` (a fresh name; blocking, worker threads only)."""
        owner = FileLock(self.directory / f"{name}.lock")
        while not owner.try_acquire():  # a fresh name: only a sweep's brief look can hold it
            time.sleep(0.001)
        return owner

    @staticmethod
    def disown(owner: FileLock) -> None:
        """Remove the owner file, then let go (its disk must be gone or published)."""
        owner.unlink_and_release()  # held: a new owner of the name locks a new file

    @staticmethod
    def name_of(owner: FileLock) -> str:
        return owner.path.name.removesuffix(".lock")

    def dead(self, names: Iterable[str], prefixes: tuple[str, ...]) -> list[FileLock]:
        """Hold the owner locks of the disks ``names`` and of the owner files starting with
        ``prefixes`` whose writer is dead; the caller removes each disk, then ``disown``s it.
        A lock held by a live writer, in this process or another, is skipped; so is an owner
        file that is not a regular file (planted: one warning each), and its disk kept."""
        paths = [self.directory / f"{name}.lock" for name in names]
        paths += sorted(p for p in self.directory.glob("*.lock") if p.name.startswith(prefixes))
        held = []
        for path in dict.fromkeys(paths):  # each once, disks first
            owner = FileLock(path)
            if try_or_skip(owner):
                held.append(owner)
        return held


def try_or_skip(lock: FileLock) -> bool:
    """``lock.try_acquire()`` for those that only try (a sweep, a prune): a lock file that
    cannot be trusted (``UntrustedFile``) counts as busy, with one warning naming it."""
    try:
        return lock.try_acquire()
    except UntrustedFile as exc:
        log.warning("%s (skipped)", exc)
        return False


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and check it is a directory, not a symlink.

    For the state directories that hold the index and the lock files: a symlink planted
    there would make the cache create its files wherever it points. On a read-only VG one
    that is missing is not made (nothing could be written in it): it is returned as it is,
    and whatever would write there fails as ``ReadOnly``."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        if not (exc.errno in (errno.EROFS, errno.EACCES) and not os.path.lexists(path)):
            raise _refused(path, "state directory", exc) from None
        return path
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _refused(path, "state directory", exc) from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise StorageError(f"state directory {path} is {what}; refusing to use it")
    return path


def _refused(path: Path, what: str, exc: OSError) -> StorageError:
    if exc.errno == errno.ELOOP:
        return UntrustedFile(f"{what} {path} is a symbolic link; refusing to follow it")
    if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory, a socket
        return UntrustedFile(f"{what} {path} is not a regular file; refusing it")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{what} {path}: no space left in the volume group")
    if exc.errno == errno.EROFS or (exc.errno == errno.ENOENT and read_only(path)):
        return ReadOnly(f"{what} {path}: the volume group is read-only")
    if exc.errno == errno.EACCES:
        return ReadOnly(f"{what} {path}: read-only to this user ({exc.strerror})")
    return StorageError(f"{what} {path}: {exc.strerror or exc}")
