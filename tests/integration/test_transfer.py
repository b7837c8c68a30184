"""The core against a real Glance: one download per image, every deploy a correct clone."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvmcache_async import (
    CacheSettings,
    DiskExists,
    GlanceClient,
    ImageCache,
    ImageNotFound,
    ImageUnavailable,
    InsufficientSpace,
    InvalidInput,
    Outcome,
)
from pvmcache_async.errors import DiskTooSmall
from pvmcache_async.storage.filevg import FileVG, FileVGSettings
from pvmcache_dev.glance import GlanceServer

from ..support import GatedVG, disk_image, holds, vg_files

MiB = 1 << 20


@pytest.fixture
async def cache(tmp_path: Path, glance_server: GlanceServer) -> AsyncIterator[ImageCache]:
    c = ImageCache(FileVG(tmp_path / "vg"), GlanceClient(glance_server.url))
    yield c
    await c.close()


@pytest.fixture
async def gated(tmp_path: Path, glance_server: GlanceServer) -> AsyncIterator[ImageCache]:
    c = ImageCache(GatedVG(tmp_path / "vg"), GlanceClient(glance_server.url))
    yield c
    await c.close()


def _instances(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def test_storm_of_deploys_downloads_each_image_once(
    cache: ImageCache, glance_server: GlanceServer, tmp_path: Path
) -> None:
    images = {glance_server.create_image(disk_image((2 + i) * MiB, seed=i)): i for i in range(3)}
    data = {img: disk_image((2 + i) * MiB, seed=i) for img, i in images.items()}
    plan = [(img, inst) for img in images for inst in _instances(15)]

    results = await asyncio.gather(*(cache.deploy(img, inst) for img, inst in plan))

    for img in images:
        assert glance_server.file_requests(img) == 1
        mine = [r for r in results if r.image_id == img]
        assert [r.outcome for r in mine].count(Outcome.MISS) == 1
        # the rest waited on that download, or (arriving after it) found the disk cached:
        # none of them fetched a byte, and the one that missed fetched the image once
        joined_or_hit = [r.bytes_fetched for r in mine if r.outcome is not Outcome.MISS]
        assert joined_or_hit == [0] * (len(mine) - 1)
        assert sum(r.bytes_fetched for r in mine) == len(data[img])
    for r in results:
        disk = (tmp_path / "vg" / r.disk).read_bytes()
        assert hashlib.sha256(disk).digest() == hashlib.sha256(data[r.image_id]).digest()
    assert len({r.disk for r in results}) == len(plan)


async def test_a_later_deploy_is_a_hit_that_fetches_nothing(
    cache: ImageCache, glance_server: GlanceServer
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=7))
    first = await cache.deploy(img, str(uuid.uuid4()))
    later = await cache.deploy(img, str(uuid.uuid4()))
    assert (first.outcome, later.outcome) == (Outcome.MISS, Outcome.HIT)
    assert later.bytes_fetched == 0
    assert later.cache_disk == first.cache_disk == "i_" + img[:13].replace("-", "_")
    assert glance_server.file_requests(img) == 1


async def test_room_promised_to_a_download_under_way_is_not_promised_again(
    gated: ImageCache, glance_server: GlanceServer
) -> None:
    a, b = (glance_server.create_image(disk_image(MiB, seed=s)) for s in (20, 21))
    vg = gated.vg
    assert isinstance(vg, GatedVG)
    vg.free, vg.gate = MiB + MiB // 2, asyncio.Event()  # room for one of the two, not both
    vg.reserving = False  # the free space it reports is fixed: the cache must count claims
    first = asyncio.create_task(gated.ensure(a))
    await asyncio.wait_for(vg.writing.wait(), 30)  # a's download is under way, nothing written

    with pytest.raises(InsufficientSpace, match="promised to downloads under way") as refused:
        await asyncio.wait_for(gated.ensure(b), 30)
    assert b in str(refused.value)
    assert glance_server.file_requests(b) == 0 and vg.partials_created == 1

    vg.gate.set()
    assert (await first).outcome is Outcome.MISS
    assert (await gated.ensure(b)).outcome is Outcome.MISS  # nothing is promised any more


async def test_an_error_reaches_every_waiter_and_the_next_call_retries(
    gated: ImageCache, glance_server: GlanceServer
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=8))
    vg = gated.vg
    assert isinstance(vg, GatedVG)
    vg.full, vg.gate = True, asyncio.Event()
    vg.gate.set()
    results = await asyncio.gather(*(gated.ensure(img) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, InsufficientSpace) for r in results)
    assert all(f"image {img}: needs {MiB} bytes" in str(r) for r in results)  # why, and which
    assert glance_server.file_requests(img) == 0  # refused before downloading

    vg.full = False
    again = await gated.ensure(img)
    assert again.outcome is Outcome.MISS
    assert glance_server.file_requests(img) == 1


async def test_cancelled_waiters_leave_and_the_rest_get_the_disk(
    gated: ImageCache, glance_server: GlanceServer
) -> None:
    img = glance_server.create_image(disk_image(2 * MiB, seed=9))
    vg = gated.vg
    assert isinstance(vg, GatedVG)
    tasks = [asyncio.create_task(gated.deploy(img, inst)) for inst in _instances(10)]
    await asyncio.wait_for(vg.writing.wait(), 30)  # the download is under way, held
    for t in tasks[:5]:  # the first one started the download: cancel it too
        t.cancel()
    vg.gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in done[:5])
    assert all(r.cache_disk for r in done[5:])  # type: ignore[union-attr]
    assert glance_server.file_requests(img) == 1
    assert vg.partials_created == 1


async def test_closing_mid_download_leaves_nothing_partial_or_published(
    gated: ImageCache, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(2 * MiB, seed=10))
    vg = gated.vg
    assert isinstance(vg, GatedVG)
    task = asyncio.create_task(gated.ensure(img))
    await asyncio.wait_for(vg.writing.wait(), 30)
    assert len(vg_files(tmp_path / "vg")) == 1  # the partial, under a p_ name
    assert not vg_files(tmp_path / "vg")[0].startswith("i_")
    await gated.close()  # cancels the download in flight
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vg_files(tmp_path / "vg") == []
    reopened = ImageCache(FileVG(tmp_path / "vg"))
    assert await reopened.entries() == []
    await reopened.close()


async def test_two_images_sharing_a_name_prefix_are_never_confused(
    cache: ImageCache, glance_server: GlanceServer, tmp_path: Path
) -> None:
    prefix = str(uuid.uuid4())[:24]
    ids = [f"{prefix}{n:012x}" for n in (1, 2)]
    data = [disk_image(MiB, seed=11), disk_image(MiB, seed=12)]
    for image_id, blob in zip(ids, data, strict=True):
        glance_server.create_image(blob, image_id=image_id)
    r = await asyncio.gather(*(cache.deploy(i, str(uuid.uuid4())) for i in ids))
    assert r[0].cache_disk != r[1].cache_disk
    for result, blob in zip(r, data, strict=True):
        assert (tmp_path / "vg" / result.disk).read_bytes() == blob
    again = await cache.deploy(ids[1], str(uuid.uuid4()))
    assert (again.outcome, again.cache_disk) == (Outcome.HIT, r[1].cache_disk)


async def test_an_instance_disk_is_never_overwritten(
    cache: ImageCache, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=13))
    inst = str(uuid.uuid4())
    first = await cache.deploy(img, inst)
    (tmp_path / "vg" / first.disk).write_bytes(b"the instance wrote this")
    with pytest.raises(DiskExists, match="already has a disk"):
        await cache.deploy(img, inst)
    assert (tmp_path / "vg" / first.disk).read_bytes() == b"the instance wrote this"


@pytest.mark.parametrize("method", ["sparse", "copy"])  # a cold deploy: tee / clone
async def test_a_deploy_of_a_size_gives_the_image_then_zeros_and_the_cache_disk_stays_its_size(
    tmp_path: Path, glance_server: GlanceServer, method: str
) -> None:
    data = disk_image(MiB, seed=14)
    img = glance_server.create_image(data)
    vg = FileVG(tmp_path / "vg", FileVGSettings(clone_method=method))  # type: ignore[arg-type]
    cache = ImageCache(vg, GlanceClient(glance_server.url))
    size = 64 * MiB + 5  # any byte count: the file VG keeps it exactly
    try:
        cold = await cache.deploy(img, str(uuid.uuid4()), size=size)
        warm = await cache.deploy(img, str(uuid.uuid4()), size=size)
        plain = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()

    assert (cold.outcome, warm.outcome) == (Outcome.MISS, Outcome.HIT)
    for r in (cold, warm):
        assert holds(tmp_path / "vg" / r.disk, data, size)
        assert (tmp_path / "vg" / r.disk).stat().st_blocks * 512 < 8 * MiB  # zeros as a hole
    assert holds(tmp_path / "vg" / plain.disk, data, len(data))
    assert (tmp_path / "vg" / cold.cache_disk).stat().st_size == len(data)


async def test_a_size_smaller_than_the_image_fails_the_deploy_and_keeps_the_image_cached(
    cache: ImageCache, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=15)
    img = glance_server.create_image(data)
    for _ in range(2):  # cold (the tee's copy is dropped), then warm (no clone is made)
        with pytest.raises(DiskTooSmall, match=f"{MiB - 1} bytes cannot hold") as err:
            await cache.deploy(img, str(uuid.uuid4()), size=MiB - 1)
        assert (err.value.disk_size, err.value.image_size) == (MiB - 1, MiB)
    assert vg_files(tmp_path / "vg") == ["i_" + img[:13].replace("-", "_")]
    assert glance_server.file_requests(img) == 1


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda g: str(uuid.uuid4()), ImageNotFound, "not found"),
        (lambda g: g.create_image(b"\0" * 4096, disk_format="qcow2"), ImageUnavailable, "raw"),
        (lambda g: g.create_image(None), ImageUnavailable, "queued"),
        (lambda g: "../../etc/passwd", InvalidInput, "not a uuid"),
    ],
    ids=["unknown", "not-raw", "no-data", "path-like"],
)
async def test_images_that_cannot_be_cached_fail_clearly_and_leave_nothing(
    cache: ImageCache,
    glance_server: GlanceServer,
    tmp_path: Path,
    make: object,
    error: type[Exception],
    message: str,
) -> None:
    image_id = make(glance_server)  # type: ignore[operator]
    with pytest.raises(error, match=message) as info:
        await cache.deploy(image_id, str(uuid.uuid4()))
    assert "\n" not in str(info.value)
    assert vg_files(tmp_path / "vg") == []
    assert await cache.entries() == []


async def test_bounded_downloads_still_serve_every_image(
    tmp_path: Path, glance_server: GlanceServer
) -> None:
    cache = ImageCache(
        FileVG(tmp_path / "vg"),
        GlanceClient(glance_server.url),
        CacheSettings(max_downloads=1, max_clones=1),
    )
    try:
        imgs = [glance_server.create_image(disk_image(MiB, seed=20 + i)) for i in range(3)]
        results = await asyncio.gather(*(cache.deploy(i, str(uuid.uuid4())) for i in imgs * 3))
        assert sorted(r.outcome for r in results).count(Outcome.MISS) == 3
    finally:
        await cache.close()
