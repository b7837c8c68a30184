"""What dead writers left is swept, a live writer's never; a lost index is rebuilt from the
identities the disks carry; a disk the cache did not make is never taken for its own."""

from __future__ import annotations

import asyncio
import shutil

from pvmcache_async import CacheSettings, EntryState, ImageCache, Outcome
from pvmcache_async.names import cache_disk_names
from pvmcache_async.storage import DiskIdentity
from pvmcache_async.storage.memory import MemoryVG

from .helpers import image, instance, turns
from .scripted_glance import ScriptedGlance, hold

KiB = 1 << 10


async def plant(vg: MemoryVG, name: str, data: bytes, identity: DiskIdentity | None) -> None:
    """A disk published by another writer (a process of another version, an operator)."""
    partial = await vg.create_partial("p_planted", len(data), identity=identity)
    await partial.write(data)
    await partial.publish(name)


async def reopened(vg: MemoryVG, glance: ScriptedGlance | None = None) -> ImageCache:
    """A new cache on the VG after its state directory (index, locks) was lost."""
    shutil.rmtree(vg.state_dir)
    return ImageCache(vg, glance)


async def test_sweep_removes_a_dead_writers_partial_and_keeps_a_live_ones(
    cache: ImageCache, vg: MemoryVG
) -> None:
    dead = await vg.create_partial("p_deadwriter01", 8)
    await dead.write(b"leftover")
    dead.abandon()  # its process was killed
    live = await vg.create_partial("p_livewriter01", 8)
    assert await cache.sweep() == ["p_deadwriter01"]
    assert sorted(vg.disks) == ["p_livewriter01"]
    await live.discard()


async def test_the_first_deploy_clears_what_a_killed_clone_left(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    killed = await vg.create_partial("t_killedclone1", 8)
    killed.abandon()
    result = await cache.deploy(glance.add(image(8 * KiB)), instance())
    assert sorted(vg.disks) == sorted([result.disk, result.cache_disk])


async def test_a_lost_index_is_rebuilt_from_the_disks_identities(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(16 * KiB)
    img = glance.add(data)
    cached = await cache.ensure(img)
    again = await reopened(vg)  # and no Glance: the disk must be found, not fetched
    try:
        [entry] = await again.entries()
        assert (entry.image_id, entry.cache_disk, entry.state) == (
            img,
            cached.cache_disk,
            EntryState.READY,
        )
        assert entry.digest == glance.records[img].digest
        result = await again.deploy(img, instance())
        assert result.outcome is Outcome.HIT
        assert vg.read(result.disk) == data
    finally:
        await again.close()


async def test_the_rebuild_skips_a_cache_named_disk_without_identity(
    vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(8 * KiB))
    first = next(cache_disk_names(img))
    await plant(vg, first, b"not the image", None)
    cache = ImageCache(vg, glance)
    try:
        assert await cache.entries() == []
        result = await cache.ensure(img)  # the image gets its next name; the disk stays
        assert result.cache_disk != first and result.outcome is Outcome.MISS
        assert vg.read(first) == b"not the image"
    finally:
        await cache.close()


async def test_the_rebuild_skips_a_disk_whose_size_is_not_its_recorded_size(
    vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(8 * KiB)
    img = glance.add(data)
    record = glance.records[img]
    identity = DiskIdentity(img, record.size + 1, record.digest_algo, record.digest)
    await plant(vg, next(cache_disk_names(img)), data, identity)
    cache = ImageCache(vg, glance)
    try:
        assert await cache.entries() == []
    finally:
        await cache.close()


async def test_the_rebuild_skips_a_disk_whose_identity_names_another_image(
    vg: MemoryVG, glance: ScriptedGlance
) -> None:
    a, b = glance.add(image(8 * KiB, seed=1)), glance.add(image(8 * KiB, seed=2))
    record = glance.records[b]
    identity = DiskIdentity(b, record.size, record.digest_algo, record.digest)
    await plant(vg, next(cache_disk_names(a)), glance.data[b], identity)  # a's name, b's data
    cache = ImageCache(vg, glance)
    try:
        assert await cache.entries() == []
        assert (await cache.ensure(b)).cache_disk == next(cache_disk_names(b))
    finally:
        await cache.close()


async def test_rebuild_index_enters_a_disk_the_index_lacks_and_returns_its_name(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    assert await cache.rebuild_index() == []
    data = image(8 * KiB)
    img = glance.add(data)
    record = glance.records[img]
    name = next(cache_disk_names(img))
    await plant(vg, name, data, DiskIdentity(img, record.size, record.digest_algo, record.digest))
    assert await cache.rebuild_index() == [name]
    assert (await cache.ensure(img)).outcome is Outcome.HIT
    assert glance.downloads[img] == 0


async def test_an_ensure_after_the_cache_disk_was_removed_by_hand_downloads_it_again(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(8 * KiB))
    result = await cache.ensure(img)
    await vg.delete(result.cache_disk)
    assert (await cache.ensure(img)).outcome is Outcome.MISS
    assert glance.downloads[img] == 2


async def test_a_second_cache_on_the_vg_joins_the_first_ones_download(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(32 * KiB)
    img = glance.add(data)
    other_glance = ScriptedGlance()
    other_glance.add(data, image_id=img)
    other = ImageCache(vg, other_glance, CacheSettings(lock_poll=0.001))  # another process
    try:
        held = hold(at=4 * KiB)
        glance.plan(img, held)
        first = asyncio.create_task(cache.ensure(img))
        await held.reached.wait()
        second = asyncio.create_task(other.ensure(img))
        await turns()  # it finds the image filling, and waits on the image's lock
        held.release()
        a, b = await first, await second
        assert (a.outcome, b.outcome) == (Outcome.MISS, Outcome.JOINED)
        assert a.cache_disk == b.cache_disk and vg.read(b.cache_disk) == data
        assert (glance.downloads[img], other_glance.downloads[img]) == (1, 0)
    finally:
        await other.close()


async def test_a_sweep_during_a_download_leaves_its_partial_disk_alone(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(32 * KiB)
    img = glance.add(data)
    held = hold(at=8 * KiB)
    glance.plan(img, held)
    download = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    assert await cache.sweep() == []
    held.release()
    assert vg.read((await download).cache_disk) == data
