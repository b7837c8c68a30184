"""A cold deploy's own disk is written as the image streams in (a tee): no clone afterwards.

Only the deploy that starts a download rides on it; deploys that join it clone as before. The
copy never costs the shared download anything: a copy that cannot be written, or whose deploy
was cancelled, is dropped and the download goes on.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvmcache_async import GlanceClient, ImageCache, InsufficientSpace, Outcome
from pvmcache_async.names import CLONE_PREFIX
from pvmcache_async.storage.base import PartialDisk
from pvmcache_async.storage.filevg import FileVG, FileVGSettings
from pvmcache_async.transfer import CacheSettings
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import FaultProxy, stall
from ..support import PassedPartial, disk_image, vg_files

MiB = 1 << 20


class _FillingPartial(PassedPartial):
    """A real file-VG partial disk that reports a full disk once ``fail_after`` bytes came."""

    def __init__(self, inner: PartialDisk, fail_after: int) -> None:
        super().__init__(inner)
        self._left = fail_after

    async def write(self, chunk: bytes) -> None:
        self._left -= len(chunk)
        if self._left < 0:
            raise InsufficientSpace(f"writing partial disk {self.name}: no space left")
        await self._inner.write(chunk)


class _VG(FileVG):
    """A file VG that counts its clones; ``copy_fails_after`` fills the disk under copies.

    Hole-aware copies, never reflinks, so that the tee is offered whatever filesystem the
    tests run on (a reflink VG prefers its constant-time clones)."""

    def __init__(self, root: Path, copy_fails_after: int | None = None) -> None:
        super().__init__(root, FileVGSettings(clone_method="sparse"))
        self.clones = 0
        self.copies = 0
        self._fails_after = copy_fails_after

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        self.clones += 1
        await super().clone(source, target, size)

    async def create_copy(self, target: str, size: int) -> PartialDisk | None:
        copy = await super().create_copy(target, size)
        self.copies += copy is not None
        if copy is None or self._fails_after is None:
            return copy
        return _FillingPartial(copy, self._fails_after)


@pytest.fixture
async def proxy(glance_server: GlanceServer) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(glance_server.url).start()
    yield p
    await p.close()


def _cache(vg: FileVG, url: str, **settings: bool) -> ImageCache:
    return ImageCache(vg, GlanceClient(url, chunk_size=256 << 10), CacheSettings(**settings))


def _assert_only(root: Path, data: bytes, cache_disk: str, disks: list[str]) -> None:
    """The VG holds the cache disk and these instance disks, each the image; nothing else."""
    assert vg_files(root) == sorted([cache_disk, *disks])
    for disk in [cache_disk, *disks]:
        assert (root / disk).read_bytes() == data, disk


async def test_a_cold_deploy_writes_its_disk_during_the_download_and_clones_nothing(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(3 * MiB, seed=70)
    img = glance_server.create_image(data)
    vg = _VG(tmp_path / "vg")
    cache = _cache(vg, glance_server.url)
    try:
        cold = await cache.deploy(img, str(uuid.uuid4()))
        assert cold.outcome is Outcome.MISS and cold.bytes_fetched == len(data)
        assert (vg.copies, vg.clones) == (1, 0)
        # written sparse like the cache disk: the image's zero runs are holes in it too
        assert os.stat(vg.path_of(cold.disk)).st_blocks * 512 < len(data) * 0.8

        warm = await cache.deploy(img, str(uuid.uuid4()))
        assert warm.outcome is Outcome.HIT and (vg.copies, vg.clones) == (1, 1)
    finally:
        await cache.close()
    _assert_only(tmp_path / "vg", data, cold.cache_disk, [cold.disk, warm.disk])


async def test_only_the_deploy_that_starts_the_download_rides_on_it(
    glance_server: GlanceServer, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = disk_image(2 * MiB, seed=71)
    img = glance_server.create_image(data)
    vg = _VG(tmp_path / "vg")
    cache = _cache(vg, proxy.url)
    try:
        results = await asyncio.gather(*(cache.deploy(img, str(uuid.uuid4())) for _ in range(6)))
    finally:
        await cache.close()
    assert [r.outcome for r in results].count(Outcome.MISS) == 1
    assert len(proxy.file_gets(img)) == 1
    assert (vg.copies, vg.clones) == (1, 5)
    _assert_only(tmp_path / "vg", data, results[0].cache_disk, [r.disk for r in results])


async def test_a_starting_deploy_cancelled_mid_download_leaves_no_disk_and_the_rest_go_on(
    glance_server: GlanceServer, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = disk_image(3 * MiB, seed=72)
    img = glance_server.create_image(data)
    proxy.plan(img, stall(after=MiB))
    root = tmp_path / "vg"
    vg = _VG(root)
    cache = _cache(vg, proxy.url)
    try:
        leader = asyncio.create_task(cache.deploy(img, str(uuid.uuid4())))
        for _ in range(3000):  # the download is under way, and writing the leader's disk too
            if proxy.stalled.is_set() and any(n.startswith(CLONE_PREFIX) for n in vg_files(root)):
                break
            await asyncio.sleep(0.01)
        others = [asyncio.create_task(cache.deploy(img, str(uuid.uuid4()))) for _ in range(3)]
        await asyncio.sleep(0.05)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        proxy.release_stalls()
        results = await asyncio.gather(*others)
    finally:
        await cache.close()
    assert [r.outcome for r in results] == [Outcome.JOINED] * 3
    assert len(proxy.file_gets(img)) == 1  # the cancellation did not restart the download
    assert (vg.copies, vg.clones) == (1, 3)
    _assert_only(root, data, results[0].cache_disk, [r.disk for r in results])


async def test_a_copy_that_cannot_be_written_is_dropped_and_the_deploy_clones_instead(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(3 * MiB, seed=73)
    img = glance_server.create_image(data)
    vg = _VG(tmp_path / "vg", copy_fails_after=MiB)
    cache = _cache(vg, glance_server.url)
    try:
        cold = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()
    assert cold.outcome is Outcome.MISS and (vg.copies, vg.clones) == (1, 1)
    _assert_only(tmp_path / "vg", data, cold.cache_disk, [cold.disk])


async def test_with_the_tee_off_the_first_deploy_clones_like_the_rest(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=74)
    img = glance_server.create_image(data)
    vg = _VG(tmp_path / "vg")
    cache = _cache(vg, glance_server.url, tee=False)
    try:
        cold = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()
    assert cold.outcome is Outcome.MISS and (vg.copies, vg.clones) == (0, 1)
    _assert_only(tmp_path / "vg", data, cold.cache_disk, [cold.disk])
