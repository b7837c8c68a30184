"""Each image's lock files: held as the cache's protocol says, and gone with an uncached image."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pvmcache_async.core.image_locks import ImageLocks


@pytest.fixture
def locks(tmp_path: Path) -> ImageLocks:
    return ImageLocks(tmp_path, poll=0.001)


def files(locks: ImageLocks) -> list[str]:
    return sorted(p.name for p in locks.directory.iterdir())


async def test_a_hold_on_an_image_found_not_cached_leaves_no_lock_file(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    async with locks.hold(img, cached=True) as held:
        held.cached = False
    assert files(locks) == []


async def test_a_hold_on_a_cached_image_keeps_its_lock_file(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    async with locks.hold(img, cached=False) as held:
        held.cached = True
    assert files(locks) == [f"{img}.lock"]


async def test_a_failed_hold_presumed_uncached_leaves_no_lock_file(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    with pytest.raises(RuntimeError):
        async with locks.hold(img, cached=False):
            raise RuntimeError("the download failed")
    assert files(locks) == []


async def test_a_busy_image_is_not_held_without_waiting(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    async with locks.hold(img, cached=True) as first:
        assert not first.waited
        with locks.try_hold(img) as second:
            assert second is None
    with locks.try_hold(img) as third:
        assert third is not None


async def test_a_failed_deploy_of_an_uncached_image_leaves_no_use_file(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    with pytest.raises(RuntimeError):
        async with locks.using(img):
            raise RuntimeError("the deploy failed")
    assert files(locks) == []


async def test_a_failed_deploy_of_a_cached_image_keeps_the_use_file(locks: ImageLocks) -> None:
    img = str(uuid.uuid4())
    async with locks.hold(img, cached=True):
        pass
    with pytest.raises(RuntimeError):
        async with locks.using(img):
            raise RuntimeError("the clone failed")
    assert files(locks) == [f"{img}.lock", f"{img}.use"]


async def test_an_uncached_image_keeps_the_use_file_of_a_deploy_under_way(
    locks: ImageLocks,
) -> None:
    img = str(uuid.uuid4())
    async with locks.using(img):
        async with locks.hold(img, cached=False):
            pass  # its download failed; the deploy holding the use lock is still on its way out
        assert files(locks) == [f"{img}.use"]
