"""ImageCache.ensure: each image downloaded once, shared by every caller, verified, and a
failure that reaches every caller, leaves nothing and is not remembered."""

from __future__ import annotations

import asyncio

import pytest

from pvmcache_async import (
    EntryState,
    GlanceError,
    ImageCache,
    ImageNotFound,
    IntegrityError,
    InvalidInput,
    NoGlanceEndpoint,
    Outcome,
)
from pvmcache_async.storage.memory import MemoryVG

from .helpers import image, turns
from .scripted_glance import ScriptedGlance, fail, hold, restart

KiB = 1 << 10


async def test_the_first_ensure_of_an_image_downloads_it_into_its_cache_disk(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(100 * KiB)
    img = glance.add(data, image_id="3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00")
    result = await cache.ensure(img)
    assert result.outcome is Outcome.MISS
    assert result.bytes_fetched == len(data)
    assert result.cache_disk == "i_3e865d14_8c1e"
    assert vg.read(result.cache_disk) == data


async def test_an_ensure_of_a_cached_image_is_a_hit_that_fetches_nothing(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(40 * KiB))
    first = await cache.ensure(img)
    again = await cache.ensure(img)
    assert (again.outcome, again.bytes_fetched) == (Outcome.HIT, 0)
    assert again.cache_disk == first.cache_disk
    assert glance.downloads[img] == 1


async def test_a_caller_arriving_during_the_download_joins_it(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(64 * KiB))
    held = hold(at=16 * KiB)
    glance.plan(img, held)
    leader = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    joiner = asyncio.create_task(cache.ensure(img))
    await turns()
    held.release()
    first, second = await leader, await joiner
    assert (first.outcome, second.outcome) == (Outcome.MISS, Outcome.JOINED)
    assert (first.bytes_fetched, second.bytes_fetched) == (64 * KiB, 0)
    assert glance.downloads[img] == 1


async def test_many_concurrent_ensures_share_one_download(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(64 * KiB))
    results = await asyncio.gather(*(cache.ensure(img) for _ in range(10)))
    assert glance.downloads[img] == 1
    assert [r.outcome for r in results].count(Outcome.MISS) == 1
    assert sum(r.bytes_fetched for r in results) == 64 * KiB
    assert len({r.cache_disk for r in results}) == 1


async def test_a_cancelled_caller_does_not_cancel_the_download_others_wait_on(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(64 * KiB)
    img = glance.add(data)
    held = hold(at=8 * KiB)
    glance.plan(img, held)
    leader = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    other = asyncio.create_task(cache.ensure(img))
    await turns()
    leader.cancel()  # the caller that started the download leaves
    with pytest.raises(asyncio.CancelledError):
        await leader
    held.release()
    result = await other
    assert result.outcome is Outcome.JOINED
    assert vg.read(result.cache_disk) == data
    assert glance.downloads[img] == 1


async def test_a_download_whose_callers_all_left_runs_to_its_end(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(32 * KiB)
    img = glance.add(data)
    held = hold(at=KiB)
    glance.plan(img, held)
    callers = [asyncio.create_task(cache.ensure(img)) for _ in range(3)]
    await held.reached.wait()
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    held.release()
    await cache.settle()
    later = await cache.ensure(img)
    assert later.outcome is Outcome.HIT
    assert vg.read(later.cache_disk) == data
    assert glance.downloads[img] == 1


async def test_an_error_reaches_every_caller_that_shared_the_download(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    held = hold(at=KiB)
    glance.plan(img, held, fail(GlanceError("Glance answered HTTP 500", image_id=img), at=2 * KiB))
    leader = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    others = [asyncio.create_task(cache.ensure(img)) for _ in range(3)]
    await turns()
    held.release()
    errors = await asyncio.gather(leader, *others, return_exceptions=True)
    assert all(isinstance(e, GlanceError) and img in str(e) for e in errors), errors
    assert glance.downloads[img] == 1


async def test_an_error_is_not_remembered_the_next_call_downloads_again(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    glance.plan(img, fail(GlanceError("Glance answered HTTP 500", image_id=img), at=KiB))
    with pytest.raises(GlanceError):
        await cache.ensure(img)
    result = await cache.ensure(img)
    assert result.outcome is Outcome.MISS
    assert glance.downloads[img] == 2


async def test_a_digest_mismatch_is_an_integrity_error_that_leaves_nothing(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(48 * KiB)
    flipped = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    img = glance.add(data, sends=flipped)
    with pytest.raises(IntegrityError, match="checksum did not match") as caught:
        await cache.ensure(img)
    assert img in str(caught.value)
    assert await vg.list_disks() == []
    assert await cache.entries() == []


async def test_a_body_shorter_than_the_record_is_an_integrity_error_that_leaves_nothing(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(48 * KiB)
    img = glance.add(data, sends=data[:-1])
    with pytest.raises(IntegrityError, match="size") as caught:
        await cache.ensure(img)
    assert img in str(caught.value)
    assert await vg.list_disks() == []
    assert await cache.entries() == []


async def test_a_restart_from_byte_zero_caches_the_image_once_and_counts_both_fetches(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    data = image(64 * KiB)
    img = glance.add(data)
    glance.plan(img, restart(at=40 * KiB))  # the server would not resume: from byte 0 again
    result = await cache.ensure(img)
    assert result.bytes_fetched == 40 * KiB + 64 * KiB
    assert vg.read(result.cache_disk) == data


async def test_an_image_glance_does_not_know_leaves_nothing_and_is_asked_again(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    img = "5d7e0c2a-0000-4000-8000-000000000001"
    with pytest.raises(ImageNotFound, match=img):
        await cache.ensure(img)
    assert await vg.list_disks() == []
    assert await cache.entries() == []
    with pytest.raises(ImageNotFound):
        await cache.ensure(img)
    assert glance.record_requests[img] == 2


async def test_an_uncached_image_without_glance_is_no_glance_endpoint(vg: MemoryVG) -> None:
    cache = ImageCache(vg, None)
    try:
        with pytest.raises(NoGlanceEndpoint, match="no Glance endpoint"):
            await cache.ensure("5d7e0c2a-0000-4000-8000-000000000002")
    finally:
        await cache.close()


@pytest.mark.parametrize(
    "bad", ["", "not-a-uuid", "{3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00}", "../../etc/passwd"]
)
async def test_a_malformed_image_id_is_refused_before_anything_is_asked(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance, bad: str
) -> None:
    with pytest.raises(InvalidInput, match="is not a uuid"):
        await cache.ensure(bad)
    assert sum(glance.record_requests.values()) == 0
    assert await vg.list_disks() == []


async def test_an_image_id_in_capitals_is_the_same_image(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(8 * KiB))
    await cache.ensure(img)
    again = await cache.ensure(img.upper())
    assert (again.image_id, again.outcome) == (img, Outcome.HIT)


async def test_close_cancels_a_download_in_flight_and_leaves_no_partial(
    vg: MemoryVG, glance: ScriptedGlance
) -> None:
    cache = ImageCache(vg, glance)
    img = glance.add(image(32 * KiB))
    held = hold(at=KiB)
    glance.plan(img, held)
    caller = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await vg.list_disks() == []
    assert glance.closed and vg.closed


async def test_an_image_being_downloaded_is_listed_as_filling(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(32 * KiB))
    held = hold(at=KiB)
    glance.plan(img, held)
    caller = asyncio.create_task(cache.ensure(img))
    await held.reached.wait()
    assert [(e.image_id, e.state) for e in await cache.entries()] == [(img, EntryState.FILLING)]
    held.release()
    await caller
    assert [(e.image_id, e.state) for e in await cache.entries()] == [(img, EntryState.READY)]


async def test_a_ready_entry_records_the_images_size_and_digest(
    cache: ImageCache, glance: ScriptedGlance
) -> None:
    img = glance.add(image(20 * KiB))
    await cache.ensure(img)
    [entry] = await cache.entries()
    record = glance.records[img]
    assert (entry.size, entry.digest_algo, entry.digest) == (
        record.size,
        record.digest_algo,
        record.digest,
    )


async def test_two_images_sharing_a_name_prefix_get_distinct_cache_disks(
    cache: ImageCache, vg: MemoryVG, glance: ScriptedGlance
) -> None:
    a = glance.add(image(8 * KiB, seed=1), image_id="3e865d14-8c1e-4c6d-9a1e-000000000001")
    b = glance.add(image(8 * KiB, seed=2), image_id="3e865d14-8c1e-4c6d-9a1e-000000000002")
    first, second = await cache.ensure(a), await cache.ensure(b)
    assert first.cache_disk == "i_3e865d14_8c1e"
    assert second.cache_disk != first.cache_disk and second.cache_disk.startswith("i_")
    assert vg.read(first.cache_disk) == glance.data[a]
    assert vg.read(second.cache_disk) == glance.data[b]
    assert (await cache.ensure(b)).outcome is Outcome.HIT
