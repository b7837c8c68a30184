"""ImageCache.remove and prune: only images nobody uses go, least recently used first, after
their minimum age, and never one a deploy or a download is busy with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvmcache_async import ImageCache, InvalidInput
from pvmcache_async.names import cache_disk_names
from pvmcache_async.storage.memory import MemoryVG

from .conftest import Clock
from .helpers import image, instance
from .scripted_glance import ScriptedGlance, hold

KiB = 1 << 10
HOUR = 3600.0
DAY = 24 * HOUR


async def cached(cache: ImageCache, glance: ScriptedGlance, size: int, seed: int = 0) -> str:
    """An image added to Glance and cached now; its id."""
    img = glance.add(image(size, seed))
    await cache.ensure(img)
    return img


def disk_of(image_id: str) -> str:
    """The image's cache disk (its first name: no other image here shares its prefix)."""
    return next(cache_disk_names(image_id))


async def ids(cache: ImageCache) -> set[str]:
    return {e.image_id for e in await cache.entries()}


async def test_remove_deletes_an_unused_image_its_disk_and_its_entry(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    assert await cache.remove(img) is True
    assert await cache.entries() == [] and await vg.list_disks() == []
    assert (await vg.capacity()).free == vg.total


async def test_remove_of_an_image_not_cached_removes_nothing(cache: ImageCache) -> None:
    assert await cache.remove("5d7e0c2a-0000-4000-8000-000000000003") is False


async def test_remove_keeps_an_image_whose_download_is_under_way(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(16 * KiB))
    held = hold(at=KiB)
    glance.plan(img, held)
    download = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    assert await cache.remove(img) is False
    held.release()
    result = await download
    assert await ids(cache) == {img}
    assert vg.read(result.cache_disk) == glance.data[img]


class HeldCloneVG(MemoryVG):
    """A memory VG whose clones wait until ``gate`` opens; ``cloning`` is set when one waits."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.gate = asyncio.Event()
        self.cloning = asyncio.Event()

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        self.cloning.set()
        await self.gate.wait()
        await super().clone(source, target, size)


async def test_remove_never_takes_the_cache_disk_a_deploy_is_cloning(
    tmp_path: Path, glance: ScriptedGlance
) -> None:
    vg = HeldCloneVG(tmp_path / "state")
    cache = ImageCache(vg, glance)
    try:
        img = await cached(cache, glance, 16 * KiB)
        deploy = asyncio.create_task(cache.deploy(img, instance()))
        await vg.cloning.wait()
        assert await cache.remove(img) is False
        assert (await cache.prune(max_count=0)).removed == []
        vg.gate.set()
        result = await deploy
        assert vg.read(result.disk) == glance.data[img]
    finally:
        await cache.close()


async def test_remove_keeps_an_image_used_within_idle_for(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    clock.advance(HOUR - 1)
    assert await cache.remove(img, idle_for=HOUR) is False
    clock.advance(1)
    assert await cache.remove(img, idle_for=HOUR) is True


async def test_remove_keeps_an_image_used_at_or_after_unused_since(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    snapshot = clock.now  # the caller's in-use snapshot was taken now
    img = await cached(cache, glance, 8 * KiB)  # and the image was used at that moment
    assert await cache.remove(img, unused_since=snapshot) is False
    assert await cache.remove(img, unused_since=snapshot + 1) is True


async def test_with_no_minimum_age_prune_removes_every_image_not_used_now(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    old = await cached(cache, glance, 8 * KiB, seed=1)
    clock.advance(1)
    now = await cached(cache, glance, 8 * KiB, seed=2)
    result = await cache.prune()
    assert await ids(cache) == {now}
    assert result.removed == [disk_of(old)]


async def test_prune_removes_the_images_unused_for_min_age_and_keeps_younger_ones(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    old = await cached(cache, glance, 8 * KiB, seed=1)
    clock.advance(2 * HOUR)
    young = await cached(cache, glance, 8 * KiB, seed=2)
    clock.advance(HOUR / 2)
    result = await cache.prune(min_age=HOUR)
    assert await ids(cache) == {young}
    assert result.removed == [disk_of(old)]


async def test_an_ensure_counts_as_a_use_that_restarts_the_minimum_age(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    clock.advance(2 * HOUR)
    await cache.ensure(img)  # a hit touches the entry
    clock.advance(HOUR / 2)
    assert (await cache.prune(min_age=HOUR)).removed == []


async def test_prune_to_a_count_removes_the_least_recently_used_first(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    order = []
    for seed in range(3):
        order.append(await cached(cache, glance, 8 * KiB, seed=seed))
        clock.advance(60)
    await cache.ensure(order[0])  # the oldest is used again: now the most recent
    result = await cache.prune(max_count=2, min_age=DAY)  # the budget ignores min_age
    assert await ids(cache) == {order[0], order[2]}
    assert result.removed == [disk_of(order[1])]
    assert result.kept == [disk_of(order[2]), disk_of(order[0])]  # least recently used first


async def test_prune_to_a_byte_budget_removes_until_the_rest_fits(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    sizes = [16 * KiB, 8 * KiB, 4 * KiB]
    imgs = []
    for seed, size in enumerate(sizes):
        imgs.append(await cached(cache, glance, size, seed=seed))
        clock.advance(60)
    await cache.prune(max_bytes=12 * KiB, min_age=DAY)
    assert await ids(cache) == {imgs[1], imgs[2]}


async def test_prune_never_removes_an_image_in_use_even_over_budget(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    a = await cached(cache, glance, 8 * KiB, seed=1)
    clock.advance(60)
    b = await cached(cache, glance, 8 * KiB, seed=2)
    clock.advance(60)
    result = await cache.prune(in_use=[a], max_count=0, min_age=DAY)
    assert await ids(cache) == {a}
    assert result.removed == [disk_of(b)]


async def test_prune_counts_the_images_in_use_as_used_now(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    clock.advance(2 * HOUR)
    await cache.prune(in_use=[img], min_age=HOUR)
    [entry] = await cache.entries()
    assert entry.last_used == clock.now


async def test_prune_keeps_an_image_used_after_the_in_use_snapshot(
    cache: ImageCache, glance: ScriptedGlance, clock: Clock
) -> None:
    snapshot = clock.now - 1  # nova listed its instances a moment before the image was used
    img = await cached(cache, glance, 8 * KiB)
    assert (await cache.prune(max_count=0, in_use_as_of=snapshot)).removed == []
    assert await ids(cache) == {img}


async def test_prune_during_a_download_leaves_it_to_finish(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = glance.add(image(16 * KiB))
    held = hold(at=KiB)
    glance.plan(img, held)
    download = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    assert (await cache.prune(max_count=0)).removed == []
    held.release()
    result = await download
    assert vg.read(result.cache_disk) == glance.data[img]


@pytest.mark.parametrize(
    "limits", [{"min_age": -1.0}, {"max_bytes": -1}, {"max_count": -1}], ids=str
)
async def test_prune_refuses_a_negative_limit_and_removes_nothing(
    cache: ImageCache, glance: ScriptedGlance, limits: dict[str, float]
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    with pytest.raises(InvalidInput, match="must not be negative"):
        await cache.prune(**limits)  # type: ignore[arg-type]
    assert await ids(cache) == {img}


async def test_a_pass_with_nothing_to_do_removes_nothing(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    result = await cache.prune(min_age=DAY)
    assert (result.removed, result.kept) == ([], [disk_of(img)])
    assert await ids(cache) == {img}


async def test_two_removals_racing_for_one_image_remove_it_once(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = await cached(cache, glance, 8 * KiB)
    first, second = await asyncio.gather(cache.remove(img), cache.remove(img))
    assert sorted([first, second]) == [False, True]
    assert await ids(cache) == set()
