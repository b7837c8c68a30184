"""Room in the volume group for the downloads under way: a download is refused up front
unless the VG has room for its image besides what the others have still to write."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pvmcache_async.errors import InsufficientSpace
from pvmcache_async.models import ImageInfo
from pvmcache_async.storage import VolumeGroup
from pvmcache_async.storage.base import Sink


@dataclass(slots=True)
class Claim:
    """The room a download under way will still take: its size less what it has written."""

    size: int
    written: int = 0


class CountedSink:
    """A download's sink that keeps its claim's count of bytes written."""

    def __init__(self, inner: Sink, claim: Claim) -> None:
        self._inner = inner
        self._claim = claim

    async def write(self, chunk: bytes) -> None:
        await self._inner.write(chunk)
        self._claim.written += len(chunk)

    async def rewind(self) -> None:
        await self._inner.rewind()
        self._claim.written = 0


class SpaceClaims:
    """The room promised to this process's downloads under way in one VG."""

    def __init__(self, vg: VolumeGroup) -> None:
        self._vg = vg
        self._claims: list[Claim] = []

    @contextlib.asynccontextmanager
    async def room_for(self, info: ImageInfo) -> AsyncIterator[Claim]:
        """Claim room for the image's download while the body runs, or raise
        ``InsufficientSpace`` without claiming anything.

        A VG whose partial disks reserve their room (``reserves_space``) counts every download
        in its free space, in any process; otherwise this process counts its own claims."""
        counted = await self._vg.reserves_space()
        free = (await self._vg.capacity()).free
        promised = 0 if counted else sum(c.size - c.written for c in self._claims)
        if free - promised < info.size:
            raise InsufficientSpace(
                f"needs {info.size} bytes but the volume group has {free} bytes free"
                + (f", {promised} of them promised to downloads under way" if promised else ""),
                image_id=info.id,
            )
        claim = Claim(info.size)  # no await since the sum: no other claim slipped in
        self._claims.append(claim)
        try:
            yield claim
        finally:
            self._claims.remove(claim)
