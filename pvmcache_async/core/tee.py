"""The tee: the download that a deploy starts writes that deploy's disk as the bytes pass.

``TeeTarget`` is the deploy's side (the disk it wants, and the copy handed to it once the
download is verified); ``TeeSink`` is the download's side (a sink that writes the cache
disk's partial and the copy together). The copy is a convenience for one deploy, the
download is everyone's: a copy that fails, or whose deploy has left, is dropped, and the
download goes on without it.
"""

from __future__ import annotations

import asyncio
import logging

from pvmcache_async.aio import finish
from pvmcache_async.errors import StorageError
from pvmcache_async.storage import PartialDisk

log = logging.getLogger(__name__)


class TeeTarget:
    """The disk of the deploy that starts a download, to be written by that download.

    The copy changes hands once: a download that succeeds hands it over (``hand_over``), and
    the deploy takes it (``take``) to publish it. A deploy that has left (cancelled, or
    failed) gets nothing: a copy handed over after it left, or not yet taken, is discarded.
    """

    def __init__(self, disk: str) -> None:
        self.disk = disk
        self.left = False
        self._copy: PartialDisk | None = None

    async def hand_over(self, copy: PartialDisk) -> None:
        if self.left:
            await finish(copy.discard())
        else:
            self._copy = copy

    def take(self) -> PartialDisk | None:
        copy, self._copy = self._copy, None
        return copy

    async def leave(self) -> None:
        self.left = True
        if (copy := self.take()) is not None:
            await finish(copy.discard())


class TeeSink:
    """A download's sink that writes the cache disk's partial and the target's copy."""

    def __init__(self, main: PartialDisk, copy: PartialDisk, target: TeeTarget) -> None:
        self.main = main
        self.copy: PartialDisk | None = copy  # None once dropped
        self._target = target

    async def write(self, chunk: bytes) -> None:
        if self.copy is not None and self._target.left:
            await self._drop("its deploy has left")
        if self.copy is None:
            return await self.main.write(chunk)
        main, copy = await asyncio.gather(
            self.main.write(chunk), self.copy.write(chunk), return_exceptions=True
        )
        if isinstance(copy, BaseException) and not isinstance(copy, StorageError):
            raise copy
        if isinstance(main, BaseException):
            raise main
        if isinstance(copy, StorageError):
            await self._drop(copy.message)

    async def rewind(self) -> None:
        await self.main.rewind()
        if self.copy is not None:
            try:
                await self.copy.rewind()
            except StorageError as exc:
                await self._drop(exc.message)

    async def _drop(self, why: str) -> None:
        assert self.copy is not None
        copy, self.copy = self.copy, None
        log.info("stopped writing %s alongside the download: %s", copy.name, why)
        await finish(copy.discard())
