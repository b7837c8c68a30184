"""The lock files of each cached image, and their life: who holds which, and when they go.

Each image has two lock files in the VG's state directory (``locks/``):

* ``<image id>.lock``: exclusive while a download fills the image or a removal deletes its
  cache disk, shared while a deploy clones it;
* ``<image id>.use``: held shared by a deploy from start to end; a removal must take it
  exclusively too (without waiting), so no removal slips in between the download a deploy
  waited for and its clone.

A lock file outlives its holder only while its image is cached: ``hold`` and ``try_hold``
remove it, under the lock, when the holder says the image is not cached (``ImageHold.cached``).
Waiters on a removed file notice and lock a new one (``FileLock``).

A lock file that is not a regular file (a symlink, a FIFO, a directory planted there) is
never used: what waits for it (a deploy) fails with one line naming it, and what only tries
(``try_hold``, ``try_use``: a sweep, a prune) warns and takes it as busy, so the image
is left as it is and the others go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from pvmcache_async.errors import InvalidInput
from pvmcache_async.locks import FileLock, private_dir, try_or_skip
from pvmcache_async.names import validate_image_id


@dataclass(slots=True)
class ImageHold:
    """An image's lock, held exclusively. ``cached`` says whether its lock files stay when
    the hold ends: set it False once the image is known not to be cached."""

    waited: bool  # another holder had it first (another process filling or removing it)
    cached: bool


class ImageLocks:
    """The lock files of every image of one VG, in ``state_dir/locks``."""

    def __init__(self, state_dir: Path, poll: float) -> None:
        self.directory = private_dir(state_dir / "locks")
        self._poll = poll

    def lock(self, image_id: str, *, shared: bool = False) -> FileLock:
        """The image's lock: exclusive to fill or remove it, shared to clone it."""
        return FileLock(self.directory / f"{image_id}.lock", shared=shared, poll=self._poll)

    def use(self, image_id: str, *, shared: bool = False) -> FileLock:
        """The lock a deploy holds shared from start to end; a removal takes it exclusively."""
        return FileLock(self.directory / f"{image_id}.use", shared=shared, poll=self._poll)

    @contextlib.asynccontextmanager
    async def hold(self, image_id: str, *, cached: bool) -> AsyncIterator[ImageHold]:
        """Hold the image's lock exclusively, waiting for it; see ``ImageHold``.

        ``cached`` is what is presumed until the body says otherwise; a body that raises
        leaves it as it stands. A cancelled wait holds nothing.
        """
        lock = self.lock(image_id)
        waited = not lock.try_acquire()
        if waited:
            await lock.acquire()
        held = ImageHold(waited, cached)
        try:
            yield held
        finally:
            self._end(image_id, lock, held)

    @contextlib.contextmanager
    def try_hold(self, image_id: str) -> Iterator[ImageHold | None]:
        """Hold the image's lock exclusively if it is free now (else yield None); never waits.
        The image is presumed cached until the body says otherwise. A lock file that cannot
        be trusted is busy (None), with a warning."""
        lock = self.lock(image_id)
        if not try_or_skip(lock):
            yield None
            return
        held = ImageHold(waited=False, cached=True)
        try:
            yield held
        finally:
            self._end(image_id, lock, held)

    @contextlib.asynccontextmanager
    async def using(self, image_id: str) -> AsyncIterator[None]:
        """Hold the image's use lock shared (a deploy). A deploy that fails leaves no use lock
        file behind for an image that is not cached."""
        use = self.use(image_id, shared=True)
        await use.acquire()
        try:
            yield
        except BaseException:
            use.release()
            self.drop_use_file(image_id)
            raise
        finally:
            use.release()

    def try_use(self, image_id: str) -> FileLock | None:
        """The image's use lock held exclusively if no deploy holds it now (a removal), else
        None; never waits. A use lock file that cannot be trusted is busy, with a warning."""
        use = self.use(image_id)
        return use if try_or_skip(use) else None

    def drop_use_file(self, image_id: str) -> None:
        """Remove the image's use lock file if the image is not cached (it has no lock file)
        and no deploy holds it."""
        if os.path.lexists(self.lock(image_id).path):
            return
        if (use := self.try_use(image_id)) is not None:
            use.unlink_and_release()

    def image_ids(self) -> set[str]:
        """The images that have a lock file of either kind (files not of ours are skipped)."""
        found = set()
        for path in [*self.directory.glob("*.lock"), *self.directory.glob("*.use")]:
            try:
                found.add(validate_image_id(path.name.rpartition(".")[0]))
            except InvalidInput:
                continue
        return found

    def _end(self, image_id: str, lock: FileLock, held: ImageHold) -> None:
        if held.cached:
            lock.release()
            return
        lock.unlink_and_release()
        self.drop_use_file(image_id)
