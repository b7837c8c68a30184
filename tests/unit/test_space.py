"""Room in the VG: a download is refused up front unless its image fits besides what the
downloads under way have still to write; running out mid-way names the image, leaves nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvmcache_async import ImageCache, InsufficientSpace, Outcome
from pvmcache_async.storage.memory import MemoryVG

from .helpers import image
from .scripted_glance import ScriptedGlance, hold

KiB = 1 << 10


@pytest.mark.parametrize("reserves", [True, False])
async def test_an_image_larger_than_the_free_space_is_refused_before_its_download(
    tmp_path: Path, glance: ScriptedGlance, reserves: bool
) -> None:
    vg = MemoryVG(tmp_path / "state", total=32 * KiB, reserves=reserves)
    cache = ImageCache(vg, glance)
    try:
        img = glance.add(image(33 * KiB))
        with pytest.raises(InsufficientSpace, match=img):
            await cache.ensure(img)
        assert glance.downloads[img] == 0
        assert await vg.list_disks() == [] and await cache.entries() == []
    finally:
        await cache.close()


async def test_room_promised_to_a_download_under_way_is_not_promised_again(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    # partial disks take no room up front here: the cache must count its own claims
    vg = MemoryVG(tmp_path / "state", total=48 * KiB, reserves=False)
    cache = ImageCache(vg, glance)
    try:
        a, b = glance.add(image(32 * KiB, seed=1)), glance.add(image(32 * KiB, seed=2))
        held = hold(at=0)
        glance.plan(a, held)
        first = asyncio.create_task(cache.ensure(a))
        await held.reached.wait()  # a's download is under way, nothing written yet
        with pytest.raises(InsufficientSpace, match="promised to downloads under way") as err:
            await cache.ensure(b)
        assert b in str(err.value) and glance.downloads[b] == 0
        held.release()
        assert (await first).outcome is Outcome.MISS
        assert await cache.remove(a)
        assert (await cache.ensure(b)).outcome is Outcome.MISS  # nothing is promised now
    finally:
        await cache.close()


async def test_running_out_of_room_mid_download_names_the_image_and_leaves_nothing(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    vg = MemoryVG(tmp_path / "state", total=40 * KiB, reserves=False)
    cache = ImageCache(vg, glance)
    try:
        img = glance.add(image(32 * KiB))
        held = hold(at=16 * KiB)
        glance.plan(img, held)
        download = asyncio.create_task(cache.ensure(img))
        await held.reached.wait()
        other = await vg.create_partial("p_otherwriter", 0)  # another process fills the VG
        await other.write(bytes(20 * KiB))
        held.release()
        with pytest.raises(InsufficientSpace, match=img):
            await download
        assert sorted(vg.disks) == ["p_otherwriter"]  # nothing of the cache's is left
        assert await cache.entries() == []
    finally:
        await cache.close()


async def test_a_reserving_vg_counts_every_download_in_its_own_free_space(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    vg = MemoryVG(tmp_path / "state", total=48 * KiB)  # a partial takes its room up front
    cache = ImageCache(vg, glance)
    try:
        a, b = glance.add(image(32 * KiB, seed=1)), glance.add(image(32 * KiB, seed=2))
        held = hold(at=0)
        glance.plan(a, held)
        first = asyncio.create_task(cache.ensure(a))
        await held.reached.wait()
        assert (await vg.capacity()).free == 16 * KiB
        with pytest.raises(InsufficientSpace, match=b) as err:
            await cache.ensure(b)
        assert "promised" not in str(err.value)  # the VG's own count said it: not the cache's
        held.release()
        await first
    finally:
        await cache.close()
