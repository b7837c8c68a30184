"""ImageCache.deploy: the instance disk holds the image, appears only once complete, never
replaces a disk, and a deploy that fails or is cancelled leaves none."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvmcache_async import (
    CacheError,
    CacheSettings,
    DiskExists,
    GlanceError,
    ImageCache,
    InvalidInput,
    Outcome,
)
from pvmcache_async.names import instance_disk_name
from pvmcache_async.storage.memory import MemoryVG

from .helpers import image, instance, turns
from .scripted_glance import ScriptedGlance, fail, hold

KiB = 1 << 10


def disk_names(vg: MemoryVG) -> list[str]:
    return sorted(vg.disks)


class CountingVG(MemoryVG):
    """A memory VG that counts its clones."""

    clones = 0

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        self.clones += 1
        await super().clone(source, target, size)


async def test_the_deploy_that_starts_a_download_has_its_disk_written_alongside(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    vg = CountingVG(tmp_path / "state")
    cache = ImageCache(vg, glance)
    try:
        data = image(32 * KiB)
        first = await cache.deploy(img := glance.add(data), instance())
        assert (vg.clones, vg.read(first.disk)) == (0, data)  # written as the bytes passed
        later = await cache.deploy(img, instance())
        assert (vg.clones, vg.read(later.disk)) == (1, data)  # a hit clones
    finally:
        await cache.close()


async def test_a_deploy_of_an_uncached_image_misses_and_its_disk_holds_the_image(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(64 * KiB)
    img = glance.add(data)
    uuid = instance()
    result = await cache.deploy(img, uuid)
    assert (result.outcome, result.bytes_fetched) == (Outcome.MISS, len(data))
    assert result.disk == instance_disk_name(uuid)
    assert vg.read(result.disk) == vg.read(result.cache_disk) == data
    assert disk_names(vg) == sorted([result.disk, result.cache_disk])  # no temporary left


async def test_a_deploy_of_a_cached_image_is_a_hit_that_fetches_nothing(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(32 * KiB)
    img = glance.add(data)
    await cache.ensure(img)
    result = await cache.deploy(img, instance())
    assert (result.outcome, result.bytes_fetched) == (Outcome.HIT, 0)
    assert vg.read(result.disk) == data
    assert glance.downloads[img] == 1


@pytest.mark.parametrize(("tee", "copies"), [(False, True), (True, False), (False, False)])
async def test_without_a_copy_alongside_the_deploy_clones_the_cache_disk(
    tmp_path: Path, glance: ScriptedGlance, tee: bool, copies: bool
) -> None:
    vg = CountingVG(tmp_path / "state", copies=copies)  # copies=False: clones cost nothing
    cache = ImageCache(vg, glance, CacheSettings(tee=tee))
    try:
        data = image(32 * KiB)
        result = await cache.deploy(glance.add(data), instance())
        assert result.outcome is Outcome.MISS
        assert (vg.clones, vg.read(result.disk)) == (1, data)
    finally:
        await cache.close()


async def test_concurrent_deploys_share_one_download_and_each_gets_its_own_disk(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    images = {glance.add(image(48 * KiB, seed=s)): image(48 * KiB, seed=s) for s in range(2)}
    plan = [(img, instance()) for img in images for _ in range(6)]
    results = await asyncio.gather(*(cache.deploy(img, uuid) for img, uuid in plan))
    for img, data in images.items():
        assert glance.downloads[img] == 1
        mine = [r for r in results if r.image_id == img]
        assert [r.outcome for r in mine].count(Outcome.MISS) == 1
        assert [r.bytes_fetched for r in mine if r.outcome is not Outcome.MISS] == [0] * 5
        assert all(vg.read(r.disk) == data for r in mine)
    assert len({r.disk for r in results}) == len(plan)


async def test_a_deploy_never_replaces_the_instances_existing_disk(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(16 * KiB))
    uuid = instance()
    planted = await vg.create_partial("p_planted", 3)
    await planted.write(b"old")
    await planted.publish(instance_disk_name(uuid))
    with pytest.raises(DiskExists, match=uuid) as caught:
        await cache.deploy(img, uuid)
    assert img in str(caught.value)
    assert vg.read(instance_disk_name(uuid)) == b"old"
    assert sum(glance.record_requests.values()) == 0  # refused before Glance was asked


async def test_a_deploy_whose_download_fails_leaves_no_instance_disk(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    glance.plan(img, fail(GlanceError("Glance answered HTTP 500", image_id=img), at=16 * KiB))
    uuid = instance()
    with pytest.raises(GlanceError, match=img):
        await cache.deploy(img, uuid)
    assert disk_names(vg) == []
    again = await cache.deploy(img, uuid)  # the same instance can be deployed at once
    assert again.outcome is Outcome.MISS


async def test_a_cancelled_deploy_leaves_no_instance_disk_and_the_download_goes_on(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    held = hold(at=8 * KiB)
    glance.plan(img, held)
    uuid = instance()
    deploy = asyncio.create_task(cache.deploy(img, uuid))
    await held.reached.wait()
    deploy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deploy
    held.release()
    await cache.settle()
    [entry] = await cache.entries()
    assert disk_names(vg) == [entry.cache_disk]


async def test_a_deploy_whose_cache_disk_was_removed_by_hand_downloads_it_again(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(16 * KiB)
    img = glance.add(data)
    first = await cache.ensure(img)
    await vg.delete(first.cache_disk)  # an operator's rm
    result = await cache.deploy(img, instance())
    assert result.outcome is Outcome.MISS
    assert vg.read(result.disk) == vg.read(result.cache_disk) == data
    assert glance.downloads[img] == 2


async def test_a_cached_image_is_deployed_without_glance(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(16 * KiB)
    img = glance.add(data)
    await cache.ensure(img)
    cache.glance = None  # Glance is gone; what is cached still deploys
    result = await cache.deploy(img, instance())
    assert result.outcome is Outcome.HIT
    assert vg.read(result.disk) == data


async def test_a_deploy_joining_a_download_clones_once_it_is_ready(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(32 * KiB)
    img = glance.add(data)
    held = hold(at=4 * KiB)
    glance.plan(img, held)
    first = asyncio.create_task(cache.deploy(img, instance()))
    await held.reached.wait()
    second = asyncio.create_task(cache.deploy(img, instance()))
    await turns()
    held.release()
    a, b = await first, await second
    assert (a.outcome, b.outcome) == (Outcome.MISS, Outcome.JOINED)
    assert vg.read(a.disk) == vg.read(b.disk) == data


async def test_a_malformed_instance_uuid_is_refused_before_anything_is_asked(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(KiB))
    with pytest.raises(InvalidInput, match="instance uuid"):
        await cache.deploy(img, "b_../../x")
    assert disk_names(vg) == [] and sum(glance.record_requests.values()) == 0


async def test_a_root_disk_of_a_given_size_holds_the_image_then_zeros_on_both_paths(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    vg = CountingVG(tmp_path / "state")
    cache = ImageCache(vg, glance)
    try:
        data = image(32 * KiB)
        img = glance.add(data)
        first = await cache.deploy(img, instance(), size=96 * KiB)  # the tee's copy
        later = await cache.deploy(img, instance(), size=64 * KiB)  # a clone
        assert vg.clones == 1
        assert vg.read(first.disk) == data + bytes(64 * KiB)
        assert vg.read(later.disk) == data + bytes(32 * KiB)
        assert vg.read(first.cache_disk) == data  # the cache disk stays the image's size
    finally:
        await cache.close()


async def test_a_root_disk_smaller_than_its_image_is_refused_and_leaves_no_disk(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    with pytest.raises(CacheError, match=r"smaller|cannot hold"):
        await cache.deploy(img, inst := instance(), size=16 * KiB)
    assert instance_disk_name(inst) not in vg.disks
